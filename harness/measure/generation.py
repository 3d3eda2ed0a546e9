"""Generation while patching: at every step, activations of a `from` model on the same tokens
replace the chosen activations of the generating model (the seed's next step: do the
localized components carry the behavior into longer generations?)."""

from __future__ import annotations

from collections.abc import Callable

import torch

HOOKS = {
    "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out", "z": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q", "k": "blocks.{}.attn.hook_k", "v": "blocks.{}.attn.hook_v",
    "pattern": "blocks.{}.attn.hook_pattern", "mlp_post": "blocks.{}.mlp.hook_post",
}
HEAD_DIM = {"z": 2, "q": 2, "k": 2, "v": 2, "pattern": 1}


def patch_hooks(from_bridge, site: str, layers=None, heads=None, neurons=None,
                positions=None) -> Callable[[torch.Tensor], list]:
    """A function tokens -> forward hooks that copy `from_bridge`'s activations on `tokens`."""
    by_layer: dict[int, list[int] | None] = {}
    for layer, head in heads or ():
        by_layer.setdefault(layer, []).append(head)
    for layer in layers or ():
        by_layer.setdefault(layer, None)
    names = {HOOKS[site].format(layer): layer for layer in by_layer}

    def hooks_for(tokens: torch.Tensor) -> list:
        with torch.inference_mode():
            _, cache = from_bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
        return [(name, _replace(cache[name], site, by_layer[layer], neurons, positions))
                for name, layer in names.items()]
    return hooks_for


def _replace(source: torch.Tensor, site: str, heads, neurons, positions):
    def hook(activation, hook):
        index = [slice(None)] * activation.ndim
        if heads is not None:
            index[HEAD_DIM[site]] = heads
        if neurons is not None:
            index[-1] = list(neurons)
        if positions is not None:
            pos_dim = 2 if site == "pattern" else 1
            index[pos_dim] = [p % activation.shape[pos_dim] for p in positions]
        patched = activation.clone()
        patched[tuple(index)] = source.to(activation.dtype)[tuple(index)]
        return patched
    return hook
