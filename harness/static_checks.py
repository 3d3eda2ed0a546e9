"""Static checks: a spec against each model's config.json (a GGUF file's header) and
tokenizer.json, before any weights load; `sources.locate` says where those files are. Reads
JSON files, file headers and tokenizers only: no torch, no model code, so `harness validate`
can promise both. Every problem is a SpecError naming the file, line, field and the valid range.

Optional models whose files are missing are left alone here (their claims become skips);
hub models not in the local cache are left for load time.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from harness import tl_checkpoints
from harness.errors import HarnessError, SpecError
from harness.files import MAX_CONFIG_BYTES, UnreadableFile, read_regular_text, regular_file_problem
from harness.kinds.base import index_problems
from harness.sites import missing_reason
from harness.sources import base_of, locate

REMOTE_CODE_FLAGS = "--allow-remote-code (harness) or --harness-allow-remote-code (pytest)"


@dataclass(frozen=True)
class ModelFacts:
    """What a spec may ask of one model, read from its files."""

    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_mlp: int | None = None
    n_ctx: int | None = None
    vocab: int | None = None
    traits: frozenset | None = None   # sites.model_traits, where the config says (else None)
    tokenizer: object = None          # tokenizers.Tokenizer, when tokenizer.json exists
    lengths: dict = field(default_factory=dict, compare=False)   # text -> tokens, memoized

    def count(self, text: str) -> int:
        """Tokens of `text` (no special tokens); without a tokenizer only empty-or-not."""
        if self.tokenizer is None:
            return len(text)
        if text not in self.lengths:
            self.lengths[text] = len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self.lengths[text]


def check_spec(spec, allow_remote_code: bool = False) -> list[SpecError]:
    """Every static problem of `spec` (resolved prompts) against its models' files."""
    errors: list[SpecError] = []
    facts: dict[str, ModelFacts | None] = {}
    for name, source in spec.models.items():
        if source.trust_remote_code and not allow_remote_code:
            errors.append(spec.error(("models", name, "trust_remote_code"),
                                     "`trust_remote_code: true` would run Python code from the "
                                     "model's folder; a spec alone cannot allow that: pass "
                                     + REMOTE_CODE_FLAGS))
        try:
            facts[name] = _facts_of(spec, name)
        except SpecError as exc:
            facts[name] = None
            if not source.optional:
                errors.append(exc)
    if errors:
        return errors
    for index, claim in enumerate(spec.claims):
        if claim.skip:
            continue
        for name in dict.fromkeys(claim.sized_models()):
            if name in facts and facts[name] is not None:
                errors += _check_claim(spec, index, claim, name, facts[name])
    return list({str(e): e for e in errors}.values())


# ----------------------------------------------------------------------------- model files

def _facts_of(spec, name: str) -> ModelFacts | None:
    """What a model's files say (a `train:` model has its base model's shapes); None when
    they are not on disk here (a hub model outside the cache, a loop of `train:` bases)."""
    name = base_of(spec.models, name)
    if name is None:
        return None
    found = locate(spec.models[name], spec.directory)
    if found.problem:
        raise spec.error(("models", name, found.kind), found.problem)
    if found.gguf_file is not None:
        from harness import gguf_files

        try:
            header = gguf_files.read_header(found.gguf_file)
            return ModelFacts(**gguf_files.facts(found.gguf_file, header),
                              tokenizer=gguf_files.light_tokenizer(found.gguf_file, header))
        except HarnessError as exc:
            raise spec.error(("models", name, found.kind), str(exc)) from None
    if found.directory is None:
        return None
    return _read_facts(spec, name, found.directory)


def _read_config(directory: Path) -> dict:
    """A model folder's config.json as a dict; HarnessError saying why it cannot be read."""
    config_file = directory / "config.json"
    try:
        config = json.loads(read_regular_text(config_file, MAX_CONFIG_BYTES))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise HarnessError(f"{directory} has no config.json; a model folder is what "
                           "`save_pretrained` writes") from None
    except UnreadableFile as exc:
        raise HarnessError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read {config_file}: {exc}") from None
    return config


def folder_problem(directory: Path) -> str | None:
    """What the static checks find wrong with a local model folder's files (config.json, its
    size fields, the weight headers, the layers they hold), or None. Loading asks it first, so
    an optional model with a broken folder is unavailable for this reason instead of failing
    in transformers."""
    try:
        config = _read_config(directory)
    except HarnessError as exc:
        return str(exc)
    return _config_problem(directory, config)


def _config_problem(directory: Path, config: dict) -> str | None:
    """folder_problem of a folder whose config.json has been read."""
    config_file = directory / "config.json"
    problem = implausible_size(config_file, config) or config_field_problem(config_file, config)
    if problem:
        return problem
    tl_config = tl_checkpoints.read_config(directory)
    problem = weights_problem(directory, tl_format=tl_config is not None)
    if problem:
        return problem
    n_layers = _first(tl_config, "n_layers") if tl_config is not None else \
        _first(config, "n_layer", "num_hidden_layers", "num_layers")
    return layers_problem(directory, n_layers)


def _read_facts(spec, name: str, directory: Path) -> ModelFacts:
    loc = ("models", name)
    try:
        config = _read_config(directory)
    except HarnessError as exc:
        raise spec.error(loc, str(exc)) from None
    problem = _config_problem(directory, config)
    if problem:
        raise spec.error(loc, problem)
    tl_config = tl_checkpoints.read_config(directory)
    if tl_config is not None:
        return _tl_facts(tl_config, _read_tokenizer(spec, loc, directory))
    n_heads = _first(config, "n_head", "num_attention_heads")
    n_embd = _first(config, "n_embd", "hidden_size", "d_model")
    d_mlp = _first(config, "n_inner", "intermediate_size", "ffn_dim", "d_mlp")
    if d_mlp is None and config.get("model_type") == "gpt2" and n_embd:
        d_mlp = 4 * n_embd
    return ModelFacts(
        n_layers=_first(config, "n_layer", "num_hidden_layers", "num_layers"),
        n_heads=n_heads, n_kv_heads=_first(config, "num_key_value_heads") or n_heads,
        d_mlp=d_mlp, n_ctx=_first(config, "n_positions", "max_position_embeddings", "n_ctx"),
        vocab=_first(config, "vocab_size"), tokenizer=_read_tokenizer(spec, loc, directory))


def _tl_facts(config: dict, tokenizer) -> ModelFacts:
    """Facts of a TransformerLens config.json (harness/tl_checkpoints.py)."""
    from types import SimpleNamespace

    from harness.sites import model_traits

    attn_only = bool(config.get("attn_only"))
    n_heads = _first(config, "n_heads")
    return ModelFacts(
        n_layers=_first(config, "n_layers"), n_heads=n_heads,
        n_kv_heads=_first(config, "n_key_value_heads") or n_heads,
        d_mlp=None if attn_only else _first(config, "d_mlp"), n_ctx=_first(config, "n_ctx"),
        vocab=_first(config, "d_vocab"), tokenizer=tokenizer,
        traits=frozenset(model_traits(SimpleNamespace(**config))))


# Sizes these checks read from an HF or a TransformerLens config.json: an integer each, or
# null / absent (unknown here, as is a sentinel such as an attention-only model's d_mlp -1).
SIZE_FIELDS = ("n_head", "num_attention_heads", "n_embd", "hidden_size", "d_model", "n_inner",
               "intermediate_size", "ffn_dim", "d_mlp", "n_layer", "num_hidden_layers",
               "num_layers", "num_key_value_heads", "n_positions", "max_position_embeddings",
               "n_ctx", "vocab_size", "n_heads", "n_layers", "n_key_value_heads", "d_vocab")


def config_field_problem(config_file: Path, config: dict) -> str | None:
    """Why a size field of a config.json cannot be read (`n_layer: "two"`), naming the file
    and the field; None when every one present is an integer or null. Loading would
    otherwise fail deep in transformers, or measure a model of the wrong shape."""
    for key in SIZE_FIELDS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            shown = json.dumps(value)
            return (f"{config_file}: field `{key}` is {shown[:40]}, not an integer; "
                    f"fix the model's config.json (e.g. `\"{key}\": 2`)")
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _first(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if _positive_int(value):
            return value
    return None


# Layer and head counts beyond any model: building that many modules would run for hours.
MAX_BLOCKS = 10_000
COUNT_FIELDS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers", "n_head",
                "num_attention_heads", "n_heads", "num_key_value_heads", "n_key_value_heads")


def implausible_size(config_file: Path, config: dict) -> str | None:
    """A layer or head count above MAX_BLOCKS (`n_layer: 1e8`), naming file and field."""
    for key in COUNT_FIELDS:
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and value > MAX_BLOCKS:
            return (f"{config_file}: `{key}` is {value:g}, more than the limit of "
                    f"{MAX_BLOCKS:,}; the config does not describe a model these weights can be")
    return None


def _read_tokenizer(spec, loc: tuple, directory: Path):
    path = directory / "tokenizer.json"
    problem = regular_file_problem(path)
    if problem:
        raise spec.error(loc, problem)
    if not path.is_file():
        return None   # a slow-only tokenizer: transformers checks tokens later
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises its own kinds
        raise spec.error(loc, f"cannot read {path}: {exc}") from None


def weights_problem(directory: Path, tl_format: bool = False) -> str | None:
    """Why the weight files of a folder cannot be complete (safetensors headers only).
    TransformerLens-format folders may hold a `.pth` state dict instead. A FIFO or device
    among its files (a loader would block on it, or read forever) is refused too."""
    for path in sorted(directory.iterdir()):
        problem = None if path.is_dir() else regular_file_problem(path)
        if problem:
            return problem
    safetensors = sorted(directory.glob("*.safetensors"))
    if tl_format and not safetensors and any(directory.glob("*.pth")):
        return None
    if not safetensors and not any(directory.glob("*.bin")) and \
            not any(directory.glob("*.safetensors.index.json")):
        kinds = "*.safetensors or *.pth" if tl_format else "*.safetensors or *.bin"
        return f"{directory} holds no weights ({kinds})"
    for path in safetensors:
        problem = _safetensors_problem(path)
        if problem:
            return f"{path} is {problem}; rebuild or re-download it"
    return None


LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")


def layers_problem(directory: Path, n_layers: int | None) -> str | None:
    """Whether config.json's layer count is the layers the safetensors headers hold: a config
    that says more would have the extra layers randomly initialised, one that says fewer would
    measure a truncated model. Tensor names only (headers, no torch)."""
    names = _tensor_names(directory)
    layers: dict[int, list[str]] = {}
    for name in names:
        match = LAYER_RE.search(name)
        if match:
            layers.setdefault(int(match[1]), []).append(name)
    if n_layers is None or not layers or set(layers) == set(range(n_layers)):
        return None
    missing = sorted(set(range(n_layers)) - set(layers))
    extra = sorted(set(layers) - set(range(n_layers)))
    parts = []
    if missing:
        template = sorted(layers[min(layers)])[0]
        example = LAYER_RE.sub(lambda m: m[0].replace(m[1], str(missing[0])), template, 1)
        parts.append(f"no weights for layer{'s' * (len(missing) > 1)} "
                     f"{', '.join(map(str, missing))} (e.g. no tensor {example})")
    if extra:
        parts.append(f"weights of layer{'s' * (len(extra) > 1)} {', '.join(map(str, extra))} "
                     f"that the config does not have (e.g. {sorted(layers[extra[0]])[0]})")
    return (f"{directory}: config.json says {n_layers} layers, but its safetensors files hold "
            f"layers {min(layers)}..{max(layers)}: {'; '.join(parts)}. The config and the "
            "weights are from different models: fix config.json or save the model again")


def _tensor_names(directory: Path) -> list[str]:
    """Tensor names in a folder's safetensors headers (or its shard index); [] when there is
    nothing readable to compare with."""
    names: list[str] = []
    for index in directory.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError):
            return []
        names += list(weight_map) if isinstance(weight_map, dict) else []
    if names:
        return names
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                (n,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(min(n, 100_000_000)))
        except (OSError, ValueError, struct.error):
            return []
        names += [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    return names


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header size, a JSON header and the tensor bytes: the
    largest end offset in the header must be where the file ends."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                return "truncated or not a safetensors file (header larger than the file)"
            header = json.loads(handle.read(n))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except ValueError:
        return "corrupt (its header is not JSON)"
    if not isinstance(header, dict):
        return "corrupt (its header is not a JSON object)"
    ends = []
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                        for o in offsets) and offsets[0] <= offsets[1]):
            return (f"corrupt (tensor {json.dumps(name)[:60]} has data_offsets "
                    f"{json.dumps(offsets)[:40]}, not [begin, end] byte offsets)")
        ends.append(offsets[1])
    if 8 + n + max(ends, default=0) > size:
        return f"truncated ({size} bytes, its header needs {8 + n + max(ends)})"
    return None


# ----------------------------------------------------------------------------- claims

def _check_claim(spec, index: int, claim, name: str, facts: ModelFacts) -> list[SpecError]:
    errors: list[SpecError] = []

    def add(loc: tuple, message: str) -> None:
        errors.append(spec.error(("claims", index) + loc, message))

    for loc, site_name in claim.sites():
        why = missing_reason(site_name, facts.traits) if facts.traits is not None else None
        if why:
            add(loc, f"model '{name}' has no site '{site_name}': {why}")
    sizes = {"n_layers": facts.n_layers, "n_heads": facts.n_heads,
             "n_kv_heads": facts.n_kv_heads, "d_mlp": facts.d_mlp, "d_vocab": facts.vocab}
    for loc, message in index_problems(claim, sizes, name):   # the kind names its indices
        add(loc, message)
    _check_prompts(spec, claim, name, facts, add)
    return errors


def _check_prompts(spec, claim, name: str, facts: ModelFacts, add) -> None:
    """Empty prompts, prompts longer than the context, positions outside the prompts."""
    prompts = spec.claim_prompts(claim)
    bos = claim.prepend_bos if claim.prepend_bos is not None else spec.defaults.prepend_bos
    lengths = []
    for prompt in prompts:
        for text in (prompt.text, prompt.corrupt) if prompt.corrupt else (prompt.text,):
            n = facts.count(text) + bool(bos)
            lengths.append(n)
            if n == 0:
                add((), f"prompt {text!r} ({_where(prompt)}) has no tokens and "
                    "`prepend_bos: false`, so it has no final token to read; write some text "
                    "or set `prepend_bos: true`")
                return
    extra = claim.generated_tokens()
    longest = max(lengths, default=0)
    if facts.tokenizer is not None and facts.n_ctx and longest + extra > facts.n_ctx:
        what = f"{longest} tokens" + (f" + max_new_tokens {extra}" if extra else "")
        add(("max_new_tokens",) if extra and longest <= facts.n_ctx else (),
            f"the longest prompt is {what}, more than model '{name}' reads ({facts.n_ctx} "
            "positions); shorten the prompts (e.g. `first_words:`)"
            + (" or `max_new_tokens`" if extra else ""))
    if facts.tokenizer is not None and lengths:   # the claim's token positions
        for loc, message in index_problems(claim, {"shortest_prompt": min(lengths)}, name):
            add(loc, message)


def _where(prompt) -> str:
    from harness.yamlsource import format_loc

    return format_loc(prompt.loc) or "the spec"
