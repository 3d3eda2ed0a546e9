"""GGUF files as a model source (`gguf: FILE`, and packaged zoo models such as `smollm2-135m`).

Two halves. Light (no torch, no tensor bytes read): `read_header` walks the file's header with
`struct` over a memory map, using the `gguf` package's constants for the format, for the static
checks' facts (`facts`) and for a `tokenizers.Tokenizer` built from the vocabulary it carries
(`light_tokenizer`, cached by the header's content). `gguf.GGUFReader` would do the same but
builds an object per vocabulary entry: 3.8 s on the 98 MB SmolLM2 file, against ~0.1 s here.

Heavy (torch, at load time only): `converted_folder` loads the file once through transformers'
GGUF support (`from_pretrained(folder, gguf_file=NAME)`, dequantized to the source's dtype) and
saves safetensors + config.json (with `architectures`, without the GGUF quantization config) +
the tokenizer into the content-addressed cache (key: the file's sha256, the dtype, the library
versions). The folder appears in one rename (`store.cached_build`): a killed conversion leaves
nothing half-written; two processes converting the same file at once take turns under the
cache's lock, and the second reads the first one's folder; later loads are a safetensors load.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

from harness.errors import HarnessError, ModelUnavailable

CONVERSION_VERSION = 1    # bump when the saved folder's layout changes
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q").unpack_from
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


class GgufHeader(NamedTuple):
    """What a GGUF file says before its tensor bytes."""

    path: Path
    metadata: dict      # key -> value (string arrays not asked for: their length)
    tensors: list       # (name, ggml type id, element count, offset from data_start)
    data_start: int
    header_end: int     # end of the tensor table: the bytes that describe the file
    size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Reads a memory-mapped file from a position; running past the end is a truncation."""

    def __init__(self, data, pos: int = 0):
        self.data, self.pos = data, pos

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.data, self.pos)   # struct.error past the end
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        if length > len(self.data) - self.pos:
            raise struct.error("string past the end")
        start, self.pos = self.pos, self.pos + length
        return bytes(self.data[start:self.pos]).decode("utf-8", "replace")

    def strings(self, count: int, keep: bool):
        """An array of strings (a vocabulary: ~50,000), or only walked past when not kept."""
        data, pos, values = self.data, self.pos, []
        for _ in range(count):
            (length,) = _LENGTH(data, pos)
            if keep:
                values.append(bytes(data[pos + 8:pos + 8 + length]).decode("utf-8", "replace"))
            pos += 8 + length
        if pos > len(data):
            raise struct.error("strings past the end")
        self.pos = pos
        return values if keep else count

    def value(self, value_type: int, keep_strings: bool):
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("<IQ")
            if count > len(self.data) - self.pos:
                raise struct.error("array past the end")
            if element_type in _SCALARS:
                return list(self.unpack(f"<{count}{_SCALARS[element_type][1]}"))
            if element_type == _STRING:
                return self.strings(count, keep_strings)
            raise ValueError(f"an array of value type {element_type}")
        raise ValueError(f"a value of type {value_type}")


def read_header(path: Path, arrays=()) -> GgufHeader:
    """The header of a GGUF file (metadata and tensor table; string arrays named in `arrays`
    read in full); HarnessError saying why when it is not a GGUF file or is cut short."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(4)
            if head != b"GGUF":
                raise HarnessError(f"{path} is not a GGUF file (it starts with {head!r}; a "
                                   "GGUF file starts with b'GGUF')")
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        cursor = _Cursor(data, 4)
        version, tensor_count, kv_count = cursor.unpack("<IQQ")
        if version not in (2, 3):
            raise HarnessError(f"{path} is GGUF version {version}; transformers reads "
                               "versions 2 and 3")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            (value_type,) = cursor.unpack("<I")
            metadata[key] = cursor.value(value_type, key in arrays)
        tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            (n_dims,) = cursor.unpack("<I")
            dims = cursor.unpack(f"<{n_dims}Q")
            ggml_type, offset = cursor.unpack("<IQ")
            count = 1
            for dim in dims:
                count *= dim
            tensors.append((name, ggml_type, count, offset))
        header_end = cursor.pos
        alignment = metadata.get("general.alignment", 32) or 32
        data_start = -(-cursor.pos // alignment) * alignment
    except struct.error:
        raise HarnessError(f"{path} is truncated: its header ends before the metadata and "
                           f"tensor table do ({size} bytes); download or copy it again") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path} is corrupt: its header holds {exc}") from None
    finally:
        data.close()
    end = data_start
    for name, ggml_type, count, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except ValueError:
            raise HarnessError(f"{path}: tensor {name} has ggml type {ggml_type}, which the "
                               "gguf package does not know") from None
        end = max(end, data_start + offset + count // block * type_size)
    if end > size:
        raise HarnessError(f"{path} is truncated ({size:,} bytes; its tensor table needs "
                           f"{end:,}); download or copy it again")
    return GgufHeader(path, metadata, tensors, data_start, header_end, size)


def facts(path: Path, header: GgufHeader | None = None) -> dict:
    """The sizes a spec may ask of the model in a GGUF file, read from its header: layers,
    heads, key/value heads, MLP width, context length, vocabulary (None where it does not say).
    Keyed as `static_checks.ModelFacts`' fields."""
    header = header or read_header(path)
    meta, arch = header.metadata, header.architecture

    def size(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, list):     # per-layer counts (some architectures): the largest
            value = max(value, default=None)
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and value > 0 else None

    tokens = meta.get("tokenizer.ggml.tokens")
    heads = size("attention.head_count")
    return {"n_layers": size("block_count"), "n_heads": heads,
            "n_kv_heads": size("attention.head_count_kv") or heads,
            "d_mlp": size("feed_forward_length"), "n_ctx": size("context_length"),
            "vocab": size("vocab_size") or (tokens if isinstance(tokens, int) else None)}


# ----------------------------------------------------------------------------- tokenizer

def light_tokenizer(path: Path, header: GgufHeader | None = None):
    """The `tokenizers.Tokenizer` the file carries, built by transformers' own GGUF tokenizer
    conversion (no torch) from the header's vocabulary, and kept as tokenizer.json in the cache
    under the header's sha256 (the header holds the whole tokenizer)."""
    from tokenizers import Tokenizer

    cached = _tokenizer_cache(path, header or read_header(path))
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    header = read_header(path, TOKENIZER_ARRAYS)
    tokenizer = build_tokenizer(header)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=cached.parent)
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tokenizer


def build_tokenizer(header: GgufHeader):
    """transformers' conversion of a GGUF vocabulary into a fast tokenizer, fed from our
    header reader (transformers' own reader imports torch)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: header.metadata[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in header.metadata}
    if not isinstance(tokenizer_dict.get("tokens"), list):
        raise HarnessError(f"{header.path} carries no tokenizer (no tokenizer.ggml.tokens)")
    try:
        tokenizer, _ = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for odd vocabularies
        raise HarnessError(f"{header.path}: transformers cannot build its tokenizer: "
                           f"{type(exc).__name__}: {exc}") from None
    return tokenizer


def _tokenizer_cache(path: Path, header: GgufHeader) -> Path:
    from harness.zoo.store import cache_root

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(header.header_end))
    return cache_root() / "gguf-tokenizers" / f"{digest.hexdigest()[:24]}.json"


# ----------------------------------------------------------------------------- conversion

def supported_problem(header: GgufHeader) -> str | None:
    """Why transformers cannot load this file (its architecture, or a quantization it cannot
    dequantize), naming what it supports; None when it can. Imports transformers."""
    from gguf.constants import GGMLQuantizationType
    from transformers.integrations.gguf.dequant import _DEQUANT, GGML_NAME
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    legacy = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    arch = header.architecture
    if arch not in legacy | set(GGUF_ARCHS):
        return (f"{header.path}: transformers cannot load GGUF architecture '{arch}'; it loads "
                f"{', '.join(sorted(legacy | set(GGUF_ARCHS)))}")
    if arch in GGUF_ARCHS:      # transformers' own dequantization kernels
        known = {"F32", "F16", "BF16"} | {GGML_NAME[t] for t in _DEQUANT if t in GGML_NAME}
    else:                       # the legacy loader: the gguf package's numpy dequantization
        from gguf.quants import _type_traits

        known = {"F32", "F16"} | {t.name for t in _type_traits}
    used = sorted({GGMLQuantizationType(t).name for _, t, _, _ in header.tensors})
    missing = [t for t in used if t not in known]
    if missing:
        return (f"{header.path} holds tensors quantized as {', '.join(missing)}, which "
                f"transformers cannot dequantize for '{arch}'; it dequantizes "
                f"{', '.join(sorted(known))}")
    return None


_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's content (memoized per path, size and modification time)."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def conversion_key(path: Path, dtype: str) -> str:
    """The cache key of a conversion: the file's content, the dtype, the libraries doing it."""
    from importlib.metadata import version

    payload = {"sha256": file_sha256(path), "dtype": dtype, "layout": CONVERSION_VERSION,
               "transformers": version("transformers"), "gguf": version("gguf")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def conversion_folder(path: Path, dtype: str) -> Path:
    """Where the conversion of `path` to `dtype` lives in the cache."""
    from harness.zoo.store import cache_root

    return cache_root() / "gguf" / f"{path.stem}-{dtype}-{conversion_key(path, dtype)}"


def converted_folder(path: Path, dtype: str) -> Path:
    """A model folder (safetensors + config.json + tokenizer) holding the GGUF file's model
    dequantized to `dtype`, converted on the first call and read from the cache after."""
    from harness.zoo.store import cached_build

    path = Path(path).resolve()

    def build(work: Path) -> dict:
        try:
            header = read_header(path)
        except HarnessError as exc:
            raise ModelUnavailable(str(exc)) from None
        problem = supported_problem(header)
        if problem:
            raise ModelUnavailable(problem)
        return convert(path, dtype, work)

    return cached_build(conversion_folder(path, dtype), conversion_key(path, dtype), build,
                        "gguf")


def convert(path: Path, dtype: str, out: Path) -> dict:
    """Load the GGUF file through transformers and save it as a plain model folder in `out`;
    returns what the build report records."""
    import time

    start = time.perf_counter()
    save_tokenizer(path, out)
    model = load_dequantized(path, dtype)
    save_model(model, dtype, out)
    return {"source": str(path), "sha256": file_sha256(path), "dtype": dtype,
            "seconds": round(time.perf_counter() - start, 1)}


def save_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"transformers cannot read the tokenizer of {path}: {exc}") \
            from None
    tokenizer.save_pretrained(str(out))


def load_dequantized(path: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ModelUnavailable(f"transformers cannot load {path}: {exc}") from None


def save_model(model, dtype: str, out: Path) -> None:
    """safetensors (a tied unembedding saved once, as `save_pretrained` does) and a config.json
    that names the architecture (TRL's trainer reads it) and no GGUF quantization."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
