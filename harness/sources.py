"""Where a model source's files are: the one resolver every part of the harness asks (static
checks, `harness validate`, model loading, training, the GGUF source), and the identity that
cache keys derive from. Light: no torch, no model code, no weights read.

A source (`spec.ModelSource`: hf / path / zoo / gguf / train) becomes a `Located`: what
`transformers` reads (a folder or a hub id), the folder on disk now (for config.json,
tokenizer.json and weight headers), the GGUF file (read through its header, converted to a
folder when loaded), why it is not there, and the arguments `from_pretrained` gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError

SOURCE_FIELDS = ("hf", "path", "zoo", "train", "gguf")


@dataclass(frozen=True)
class Located:
    """Where one model source's files are."""

    kind: str                       # the source field that names it: hf, path, zoo, gguf, train
    key: str                        # identity of the weights: equal keys, equal models
    target: str | None = None       # what transformers reads (folder or hub id); None: built
    directory: Path | None = None   # a model folder on disk now (config.json, tokenizer.json)
    gguf_file: Path | None = None   # a GGUF file (static facts from its header)
    problem: str | None = None      # why the files are not there (the model is unavailable)
    load_args: dict = field(default_factory=dict, compare=False)   # from_pretrained arguments

    @property
    def tokenizer_file(self) -> Path | None:
        """tokenizer.json on disk (a folder's, or a hub model's in the local cache), for the
        light token checks; None when there is none (a GGUF file carries its own: see
        `gguf_files.light_tokenizer`)."""
        if self.directory is not None:
            path = self.directory / "tokenizer.json"
            return path if path.is_file() else None
        if self.kind == "hf":
            return cached_hub_tokenizer(self.target, self.load_args.get("revision"))
        return None

    @property
    def weight_files(self) -> list[Path]:
        """The weight files on disk: a folder's safetensors (else .bin) files, or the GGUF."""
        if self.gguf_file is not None:
            return [self.gguf_file]
        return [] if self.directory is None else weight_files(self.directory)


def weight_files(directory: Path) -> list[Path]:
    """A model folder's weight files: its safetensors files, else its .bin files."""
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))


def source_identity(source, spec_dir: Path | None = None) -> str:
    """Every field of a source that decides its weights and numbers (so a new field changes
    it), not where or whether it loads; local paths made absolute when `spec_dir` is given."""
    data = source.model_dump(exclude={"optional", "device"}, exclude_none=True)
    for name in ("path", "gguf"):
        if data.get(name) and spec_dir is not None:
            data[name] = str((Path(spec_dir) / data[name]).resolve())
    return json.dumps(data, sort_keys=True)


def source_key(source, spec_dir: Path) -> str:
    """A stable identity of the weights a source names (paths made absolute): the key of a
    session's loaded models, tokenizers and locations."""
    return source_identity(source, spec_dir)


def locate(source, spec_dir: Path) -> Located:
    """The files of `source` (a `spec.ModelSource`), without reading any of them but to see
    whether they are there; a `train:` source has no files until it is built."""
    spec_dir = Path(spec_dir)
    key = source_key(source, spec_dir)
    args = load_args(source)
    kind = source.kind
    if kind == "zoo":
        from harness.zoo.store import zoo_location

        try:
            found = zoo_location(source.zoo)
        except HarnessError as exc:
            return Located(kind, key, problem=str(exc), load_args=args)
        if found.suffix == ".gguf":
            return Located(kind, key, gguf_file=found, load_args=args)
        return Located(kind, key, str(found), found, load_args=args)
    if kind == "path":
        path = (spec_dir / source.path).resolve()
        if not path.is_dir():
            return Located(kind, key, problem=f"checkpoint directory {path} does not exist "
                           f"(`path:` is relative to the spec's folder, {spec_dir})",
                           load_args=args)
        return Located(kind, key, str(path), path, load_args=args)
    if kind == "gguf":
        from harness.files import regular_file_problem

        path = (spec_dir / source.gguf).resolve()
        problem = regular_file_problem(path)     # a FIFO would block the header read
        if problem:
            return Located(kind, key, problem=problem, load_args=args)
        if not path.is_file():
            return Located(kind, key, problem=f"GGUF file {path} does not exist (`gguf:` is "
                           f"relative to the spec's folder, {spec_dir})", load_args=args)
        return Located(kind, key, gguf_file=path, load_args=args)
    if kind == "hf":
        return Located(kind, key, source.hf, cached_hub_dir(source.hf, source.revision),
                       load_args=args)
    return Located(kind, key, load_args=args)   # train: built by its recipe


def load_args(source) -> dict:
    """The `from_pretrained` arguments a source decides (dtype by name: torch maps it)."""
    return {"revision": source.revision, "trust_remote_code": source.trust_remote_code,
            "dtype": source.dtype}


def locate_name(name: str) -> str:
    """A recipe's model name (`harness.train`: zoo name, local folder or hub id) -> what
    transformers reads. A zoo GGUF is converted first (that part needs torch)."""
    from harness.zoo.store import ZOO_MODELS, zoo_location

    if name in ZOO_MODELS:
        found = zoo_location(name)
        if found.suffix == ".gguf":
            from harness.gguf_files import converted_folder

            return str(converted_folder(found, "float32"))
        return str(found)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def cached_hub_dir(repo: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model whose config.json is cached, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an odd hub id: leave it for load time
        return None
    return Path(found).parent if isinstance(found, str) else None


def cached_hub_tokenizer(repo: str, revision: str | None) -> Path | None:
    """tokenizer.json of a hub model in the local cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "tokenizer.json", revision=revision)
    except Exception:  # noqa: BLE001
        return None
    return Path(found) if isinstance(found, str) else None


def base_of(models: dict, name: str) -> str | None:
    """The model whose files a model of a spec has: a `train:` model has its base's shapes
    and tokenizer; None when the chain names no model of the spec or loops."""
    seen = {name}
    while models[name].train is not None:
        name = models[name].train.base
        if name in seen or name not in models:
            return None
        seen.add(name)
    return name
