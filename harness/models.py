"""Model sources -> TransformerLens bridges (compatibility mode), offline-first.

Every source ends as a local directory or a hub id that `transformers` can read; RL checkpoints
with a value head load as their base language model, like the seed's
`trainer.model.base_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from harness import tl_checkpoints
from harness.errors import HarnessError, ModelUnavailable
from harness.hub import hub_offline, hub_reachable
from harness.plain_hf import module_copy, plain_copy
from harness.sources import load_args, locate, source_identity, source_key, weight_files
from harness.spec import ModelSource

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "resolve_location", "source_key"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALUE_HEAD_PREFIXES = ("pretrained_model.", "base_model.")
# What transformers raises for folders it cannot read, config fields of the wrong type
# included: the model is unavailable (an optional one's claims skip), not a crash.
LOAD_ERRORS = (OSError, ValueError, StrictDataclassError)


@dataclass
class LoadedModel:
    """A model ready for measurements: the bridge (HookedTransformer numerics) and tokenizer."""

    key: str          # identifies weights + device + dtype; used to cache clean runs
    bridge: object    # transformer_lens.model_bridge.TransformerBridge
    tokenizer: PreTrainedTokenizerBase
    origin: str       # where it came from, for reports
    device: str
    dtype: str
    location: str = ""
    source: ModelSource | None = None
    _plain: object = None

    def plain_hf(self):
        """The HF model on its own, for cached generation: inside the bridge its KV cache
        path gives wrong logits (measured, TransformerLens 4.3). Made at load time from the
        bridge's own modules, sharing their weights (`plain_hf.py`); a `device_map` model
        loads a second copy once, on first use. None where there is no HF model to copy
        (TransformerLens-native checkpoints, bridges handed over in memory): generation then
        runs the bridge's token loop."""
        if self._plain is None:
            from transformers import PreTrainedModel

            if not self.location or self.source is None or not isinstance(
                    getattr(self.bridge, "original_model", None), PreTrainedModel):
                return None
            plain = load_hf_causal_lm(self.location, self.source)
            self._plain = plain if self.source.device_map else plain.to(self.device)
        return self._plain


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(source: ModelSource, override: str | None) -> str:
    """`--device` wins, then the spec's `device:`, then CUDA when available, else CPU."""
    return override or source.device or default_device()


def resolve_location(source: ModelSource, spec_dir: Path) -> str:
    """A local directory or hub id for a zoo / path / gguf / hf source (session.py trains
    `train:`), through the one resolver (`sources.locate`); a GGUF file is converted into the
    cache once (`gguf_files.converted_folder`)."""
    found = locate(source, spec_dir)
    if found.problem:
        raise ModelUnavailable(found.problem)
    if found.gguf_file is not None:
        from harness.gguf_files import converted_folder

        return str(converted_folder(found.gguf_file, source.dtype))
    if found.target is None:
        raise HarnessError("a `train:` model is built through Session.location")
    return found.target


def model_key(name: str, source: ModelSource | None, location: str, device: str) -> str:
    """LoadedModel.key: the spec's name, the source's identity (`sources.source_key`: every
    field of the source), where its files are and the device; keys the clean-trace cache."""
    identity = source_identity(source) if source is not None else ""
    return f"{name}|{identity}|{location}|{device}"


def _offline(location: str) -> bool:
    if Path(location).is_dir():
        return False
    return hub_offline()


def load_tokenizer(location: str, source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's tokenizer; loaded first of a model's files, so a local folder the static
    checks refuse (config.json, weight headers) is unavailable here, saying why."""
    if Path(location).is_dir():
        from harness.static_checks import folder_problem

        problem = folder_problem(Path(location))
        if problem:
            raise ModelUnavailable(problem)
    try:
        args = load_args(source)
        return AutoTokenizer.from_pretrained(location, revision=args["revision"],
                                             trust_remote_code=args["trust_remote_code"],
                                             local_files_only=_offline(location))
    except LOAD_ERRORS as exc:
        raise ModelUnavailable(_unavailable(location, source, exc)) from None


def load_model(name: str, source: ModelSource, location: str, device: str,
               tokenizer: PreTrainedTokenizerBase | None = None) -> LoadedModel:
    """Load `location` into a TransformerBridge with compatibility mode on."""
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = tokenizer or load_tokenizer(location, source)
    if tl_checkpoints.read_config(Path(location)) is not None:
        return _load_tl_checkpoint(name, source, location, device, tokenizer)
    # TransformerLens leaves a preloaded model where it is: move it to the device ourselves,
    # unless `device_map` spreads its layers over several devices (accelerate places them).
    hf_model = load_hf_causal_lm(location, source)
    if source.device_map is None:
        hf_model = hf_model.to(device)
    else:
        device = str(next(hf_model.parameters()).device)  # where the embeddings landed
    before = module_copy(hf_model) if source.device_map is None else None
    try:
        bridge = TransformerBridge.boot_transformers(
            location, hf_model=hf_model, tokenizer=tokenizer, device=device,
            dtype=DTYPES[source.dtype], trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # TransformerLens raises many kinds for unsupported models
        raise ModelUnavailable(f"TransformerLens could not wrap model '{name}' from {location}: "
                               f"{type(exc).__name__}: {exc}") from None
    bridge.enable_compatibility_mode()
    bridge.eval()
    placed = next(bridge.parameters()).device
    if source.device_map is None and placed.type != torch.device(device).type:
        raise ModelUnavailable(f"model '{name}' was asked for on {device} but its weights are "
                               f"on {placed}")
    key = model_key(name, source, location, device)
    return LoadedModel(key, bridge, tokenizer, _origin(source, location), str(placed),
                       source.dtype, location, source,
                       None if before is None else plain_copy(bridge, before))


def _load_tl_checkpoint(name: str, source: ModelSource, location: str, device: str,
                        tokenizer) -> LoadedModel:
    """A TransformerLens-format folder (no HF architecture, e.g. attention-only models) on the
    bridge's native model: see harness/tl_checkpoints.py."""
    if source.device_map is not None:
        raise ModelUnavailable(f"model '{name}': `device_map` needs a Hugging Face model; "
                               f"{location} is a TransformerLens checkpoint (drop device_map)")
    bridge = tl_checkpoints.load_bridge(Path(location), tokenizer, device, DTYPES[source.dtype])
    bridge.enable_compatibility_mode()
    bridge.eval()
    key = model_key(name, source, location, device)
    return LoadedModel(key, bridge, tokenizer, _origin(source, location), device,
                       source.dtype, location, source)


def wrap_in_memory(name: str, model) -> LoadedModel:
    """A notebook's model as a LoadedModel: a TransformerBridge as it is (compatibility mode
    switched on if it is off), an HF causal LM + tokenizer pair wrapped in a new bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        hf_model, tokenizer = model
        if not hasattr(hf_model, "config") or not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise HarnessError(f"models['{name}']: expected (hf_model, tokenizer), got "
                               f"({type(hf_model).__name__}, {type(tokenizer).__name__})")
        device = str(next(hf_model.parameters()).device)
        location = getattr(hf_model.config, "_name_or_path", "") or hf_model.config.model_type
        bridge = TransformerBridge.boot_transformers(location, hf_model=hf_model.eval(),
                                                     tokenizer=tokenizer, device=device,
                                                     dtype=next(hf_model.parameters()).dtype)
    elif isinstance(model, TransformerBridge):
        bridge, tokenizer = model, model.tokenizer
    else:
        raise HarnessError(f"models['{name}']: expected a TransformerBridge or an "
                           f"(hf_model, tokenizer) pair, got {type(model).__name__}")
    if not getattr(bridge, "compatibility_mode", False):
        bridge.enable_compatibility_mode()
    bridge.eval()
    param = next(bridge.parameters())
    dtype = {v: k for k, v in DTYPES.items()}.get(param.dtype, str(param.dtype))
    return LoadedModel(f"{name}|memory:{id(bridge)}", bridge, tokenizer,
                       f"memory:{type(bridge.original_model).__name__}", str(param.device),
                       dtype)


def load_hf_causal_lm(location: str, source: ModelSource):
    """The HF language model, unwrapping RL value-head checkpoints in local directories."""
    kwargs = dict(load_args(source), local_files_only=_offline(location),
                  **device_map_kwargs(source.device_map))
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
    directory = Path(location)
    try:
        if directory.is_dir() and _has_value_head_layout(directory):
            return _load_value_head_checkpoint(directory, kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(
            location, attn_implementation="eager", output_loading_info=True, **kwargs)
        _check_loading_info(location, info)
        return model.eval()
    except LOAD_ERRORS as exc:
        raise ModelUnavailable(_unavailable(location, source, exc)) from None
    except Exception as exc:  # safetensors raises its own SafetensorError for torn files
        if not type(exc).__module__.startswith("safetensors"):
            raise
        from harness.static_checks import weights_problem

        problem = weights_problem(directory) if directory.is_dir() else None
        raise ModelUnavailable(problem or _unavailable(location, source, exc)) from None


def _check_loading_info(location: str, info: dict) -> None:
    """Weights that config.json does not describe are an error naming the tensors: missing
    ones would be randomly initialised (values change run to run), unexpected ones dropped (a
    truncated model measured)."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), \
        sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys") or ())
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing tensors", missing),
                                   ("unexpected tensors", unexpected),
                                   ("tensors of the wrong shape", mismatched)) if keys]
    if problems:
        raise ModelUnavailable(f"the weights in {location} do not match its config.json: "
                               f"{'; '.join(problems)}. The config and the weights are from "
                               "different models: fix config.json or save the model again")


def device_map_kwargs(device_map) -> dict:
    """`from_pretrained` arguments for a spec's device_map: a strategy name as is; a list of
    devices as a balanced map over just those devices (accelerate's max_memory)."""
    if device_map is None:
        return {}
    if isinstance(device_map, str):
        return {"device_map": device_map}
    max_memory = {}
    for name in device_map:
        dev = torch.device(name)
        if dev.type == "cuda":
            index = dev.index or 0
            max_memory[index] = torch.cuda.mem_get_info(index)[0] if torch.cuda.is_available() \
                else 0
        else:
            max_memory[dev.type] = _free_host_memory()
    return {"device_map": "balanced", "max_memory": max_memory}


def _free_host_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def _unavailable(location: str, source: ModelSource, exc: Exception) -> str:
    tried = f"tried {'the local directory' if Path(location).is_dir() else 'the hub id'} " \
            f"'{location}'" + (f" at revision '{source.revision}'" if source.revision else "")
    hint = ""
    if source.hf and os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = " (HF_HUB_OFFLINE=1: only the local HF cache was searched)"
    elif source.hf and not hub_reachable():
        hint = " (the hub is unreachable from here: only the local HF cache was searched)"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{tried}{hint}: {first_line}"


def _origin(source: ModelSource, location: str) -> str:
    if source.hf:
        return f"hf:{source.hf}" + (f"@{source.revision}" if source.revision else "")
    if source.gguf:
        return f"gguf:{Path(source.gguf).name}"
    return f"{source.kind}:{source.zoo or location}"


# ----------------------------------------------------------------------------- value heads

def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _has_value_head_layout(directory: Path) -> bool:
    keys: list[str] = []
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                keys += list(handle.keys())
        else:
            keys += list(_read_state(path))
    return any(k.startswith("v_head.") or k.startswith(VALUE_HEAD_PREFIXES) for k in keys)


def _load_value_head_checkpoint(directory: Path, kwargs: dict):
    """Drop `v_head.*`, strip the wrapper prefix, load the rest as the base causal LM."""
    config = AutoConfig.from_pretrained(str(directory),
                                        trust_remote_code=kwargs["trust_remote_code"])
    kwargs.pop("local_files_only", None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             trust_remote_code=kwargs["trust_remote_code"])
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        for key, tensor in _read_state(path).items():
            if key.startswith("v_head."):
                continue
            for prefix in VALUE_HEAD_PREFIXES:
                key = key.removeprefix(prefix)
            state[key] = tensor
    expected = set(model.state_dict())
    if not state.keys() & expected:  # a bare transformer saved without the LM wrapper
        state = {f"{model.base_model_prefix}.{k}": v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ModelUnavailable(f"value-head checkpoint {directory}: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(kwargs["dtype"]).eval()


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        tied = list(tied)
    return set(tied) | {"lm_head.weight"}
