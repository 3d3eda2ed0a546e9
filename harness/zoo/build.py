"""Build the toy world from scratch, cache it by content, and (re)write the shipped artifacts.

`build_world(seed)` runs corpus -> tokenizer -> source LM -> reward model -> RLHF into
`<cache root>/world/<key>`, where the key hashes the recipe configs, the seed and the versions
of torch / transformers / trl / harness. The cache root is `$INTERP_HARNESS_CACHE` or
`~/.cache/interp-harness`. `python -m harness.zoo.build --write-artifacts` rewrites
harness/zoo/artifacts/ from `build_world(seed=0)`, then retrains `toy-reviews-sae` on the new
source (harness/zoo/sae.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from harness.errors import HarnessError, did_you_mean

log = logging.getLogger(__name__)

ZOO_NAMES = ("toy-reviews-source", "toy-reviews-reward", "toy-reviews-rlhf", "toy-induction")
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


def zoo_checkpoint(name: str) -> Path:
    """The shipped checkpoint dir of a zoo model (model + tokenizer, `save_pretrained`)."""
    if name not in ZOO_NAMES:
        raise HarnessError(f"unknown zoo model '{name}'" + did_you_mean(name, ZOO_NAMES))
    path = ARTIFACTS / name
    if not (path / "config.json").is_file():
        from harness.errors import ModelUnavailable
        raise ModelUnavailable(f"zoo model '{name}' is not built: {path} is missing; run "
                               "`python -m harness.zoo.build --write-artifacts`")
    return path


def world_configs(seed: int) -> dict:
    from harness.train import RLHFConfig
    from harness.zoo.induction import InductionConfig
    from harness.zoo.pretrain import RewardConfig, SourceConfig, TokenizerConfig

    return {"tokenizer": TokenizerConfig(), "source": SourceConfig(), "reward": RewardConfig(),
            "rlhf": RLHFConfig(seed=seed), "induction": InductionConfig()}


def world_key(seed: int) -> str:
    cfgs = world_configs(seed)
    return content_key({"seed": seed, **{k: asdict(v) for k, v in cfgs.items()}})


def build_world(seed: int = 0, out_dir: Path | None = None, progress: bool = True
                ) -> dict[str, Path]:
    """Build (or reuse) the three zoo models; returns {zoo name: checkpoint dir}.

    `out_dir=None` -> `<cache root>/world/<key>`. A dir that already holds a finished build
    with the same key is returned at once. Stage timings go to `build_report.json`.
    """
    key = world_key(seed)
    root = Path(out_dir) if out_dir is not None else cache_root() / "world" / key
    paths = {name: root / name for name in ZOO_NAMES}
    report_file = root / "build_report.json"
    if report_file.is_file():
        try:
            if json.loads(report_file.read_text()).get("key") == key:
                return paths
        except json.JSONDecodeError:
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-world-", dir=root.parent))
    try:
        report = _build_into(work, seed, key, progress)
        (work / "build_report.json").write_text(json.dumps(report, indent=2))
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return paths


def _build_into(work: Path, seed: int, key: str, progress: bool) -> dict:
    from dataclasses import replace

    from harness.train import run_rlhf
    from harness.zoo.pretrain import build_tokenizer, train_reward, train_source

    cfgs = world_configs(seed)
    stages: dict[str, float] = {}
    results: dict[str, dict] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = round(time.time() - t0, 2)
        msg = f"[build_world] {name}: {stages[name]:.1f} s"
        log.info(msg)
        if progress:
            print(msg, file=sys.stderr)

    t_all = time.time()
    t0 = time.time()
    tok_dir = work / "tokenizer"
    tokenizer = build_tokenizer(cfgs["tokenizer"], seed, tok_dir)
    stage("tokenizer", t0)

    t0 = time.time()
    source = work / "toy-reviews-source"
    results["source"] = train_source(cfgs["source"], tokenizer, seed, source, progress)
    stage("source", t0)

    t0 = time.time()
    reward = work / "toy-reviews-reward"
    results["reward"] = train_reward(cfgs["reward"], tokenizer, seed, reward, progress)
    stage("reward", t0)

    t0 = time.time()
    rlhf = work / "toy-reviews-rlhf"
    rcfg = replace(cfgs["rlhf"], base=str(source), reward=str(reward))
    rl = run_rlhf(rcfg, rlhf, progress=progress)
    (rlhf / "rlhf_report.json").unlink()     # paths inside it name the temp dir
    results["rlhf"] = {k: rl[k] for k in ("before", "after", "logit_diff", "greedy")}
    results["rlhf"]["final_log"] = rl["history"][-1] if rl["history"] else None
    stage("rlhf", t0)

    t0 = time.time()
    from harness.zoo.induction import train_induction
    results["induction"] = train_induction(cfgs["induction"], seed, work / "toy-induction",
                                           progress)
    stage("induction", t0)
    shutil.rmtree(tok_dir)
    stages["total"] = round(time.time() - t_all, 2)
    return {"key": key, "seed": seed, "versions": versions(), "stage_seconds": stages,
            "configs": {k: asdict(v) for k, v in cfgs.items()}, "results": results}


def write_artifacts(seed: int = 0, progress: bool = True) -> Path:
    """Rebuild the world into a fresh dir and copy the three checkpoints to artifacts/."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_world(seed=seed, out_dir=Path(tmp) / "world", progress=progress)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name, src in paths.items():
            dst = ARTIFACTS / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
        report = json.loads((Path(tmp) / "world" / "build_report.json").read_text())
        report.pop("key")
        (ARTIFACTS / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    from harness.zoo.sae import write_artifacts as write_sae  # trained on the new source

    write_sae(seed, progress)
    return ARTIFACTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.zoo.build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="build dir (default: cache)")
    parser.add_argument("--write-artifacts", action="store_true",
                        help="rewrite harness/zoo/artifacts/ from a fresh build")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.write_artifacts:
        print(write_artifacts(args.seed, progress=not args.quiet))
    else:
        for name, path in build_world(args.seed, args.out, progress=not args.quiet).items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
