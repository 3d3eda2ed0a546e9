"""TransformerLens-format checkpoint folders: models that have no Hugging Face architecture.

Attention-only models (the classic `attn-only-2l` of induction-head studies), SoLU models and
other HookedTransformer-trained checkpoints are saved with a TransformerLens `config.json`
(`n_layers`, `d_model`, `attn_only`, ... and no `model_type`) and a state dict in
HookedTransformer's property layout (`blocks.0.attn.W_Q`, [head, d_model, d_head]). The
TransformerBridge runs them on its TL-native model (`boot_native`); the harness loads such a
folder given as `path:`, offline, and measures it through the general path like any other model.

Weights: `model.safetensors` (read without running code) or a legacy `*final.pth` / `*.pth`
(read with `torch.load(weights_only=True)`, which refuses pickled code). Either holds the
property layout or the bridge's own `state_dict()` layout. The tokenizer must be saved in the
folder (a legacy config's `tokenizer_name` is a hub id, which is not fetched).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import ModelUnavailable
from harness.files import MAX_CONFIG_BYTES, UnreadableFile, read_regular_text

CONFIG_FIELDS = ("d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab",
                 "act_fn", "eps", "attn_only", "normalization_type", "final_rms",
                 "positional_embedding_type", "n_key_value_heads", "gated_mlp", "rotary_dim",
                 "rotary_base", "parallel_attn_mlp", "use_attn_scale", "attn_scale",
                 "d_vocab_out", "original_architecture")


def read_config(directory: Path) -> dict | None:
    """The folder's config.json when it is a TransformerLens one (no `model_type`, has
    `n_layers` and `d_model`), else None. Pure JSON: no torch."""
    try:
        config = json.loads(read_regular_text(Path(directory) / "config.json",
                                              MAX_CONFIG_BYTES))
    except (OSError, ValueError, UnreadableFile):
        return None
    if not isinstance(config, dict) or "model_type" in config:
        return None
    return config if {"n_layers", "d_model"} <= set(config) else None


def weight_files(directory: Path) -> list[Path]:
    """The folder's weights, preferred first: safetensors, then a final .pth, then any .pth."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    files += sorted(directory.glob("*final.pth")) + sorted(
        p for p in directory.glob("*.pth") if not p.name.endswith("final.pth"))
    return files


def bridge_config(config: dict):
    """The TransformerBridgeConfig of a TransformerLens config.json."""
    from transformer_lens.config import TransformerBridgeConfig

    fields = {k: config[k] for k in CONFIG_FIELDS if k in config}
    if "normalization_type" not in fields and "normalization" in config:
        fields["normalization_type"] = config["normalization"]
    if config.get("shortformer_pos"):
        raise ModelUnavailable("this TransformerLens checkpoint uses shortformer position "
                               "embeddings, which TransformerLens's native model does not run")
    fields.setdefault("d_mlp", -1)
    fields.setdefault("positional_embedding_type", "standard")
    return TransformerBridgeConfig(architecture="TransformerLensNative", **fields)


def load_bridge(directory: Path, tokenizer, device: str, dtype):
    """A TransformerBridge on TransformerLens's native model with the folder's weights."""
    import torch
    from transformer_lens.model_bridge.sources.native import boot as boot_native
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    directory = Path(directory)
    cfg = bridge_config(read_config(directory))
    files = weight_files(directory)
    if not files:
        raise ModelUnavailable(f"{directory} holds no weights (model.safetensors or a .pth "
                               "state dict)")
    path = files[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torn files raise library-specific kinds
        raise ModelUnavailable(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{path} is not a state dict")
    bridge = boot_native(cfg, tokenizer=tokenizer, device=device, dtype=dtype)
    try:
        if any(".W_" in k or k.endswith(("W_E", "W_pos", "W_U", "b_U")) for k in state):
            state = convert_tl_checkpoint(state, cfg)
        expected = bridge.state_dict()
        if "unembed.bias" in expected and "unembed.bias" not in state:
            # legacy checkpoints often have no unembedding bias (HookedTransformer's was 0)
            state["unembed.bias"] = torch.zeros_like(expected["unembed.bias"])
        state = {k: v.to(dtype) for k, v in state.items()}
        bridge.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"the weights in {path} do not fit its config.json "
                               f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return bridge.to(device)
