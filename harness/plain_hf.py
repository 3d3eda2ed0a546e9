"""The plain Hugging Face copy of a bridged model, for cached generation (HF `generate`), with
no second load of the weights.

TransformerBridge keeps the HF model's modules inside its own components and, in compatibility
mode, gives them processed weights (folded LayerNorm, centered writing weights) by assigning
new tensors, never by writing into the old ones. So a module tree copied before the bridge
is built (`module_copy`, sharing every tensor) stays the HF model exactly, and a copy of the
bridge's tree without its components (`module_copy(..., unwrap=True)`) is the processed
model: the same next-token distributions where the bridge computes with those modules
(Llama, Mistral, Qwen2, Gemma, Phi, OPT), not where it computes with split copies of fused
projections (GPT-2, GPT-NeoX, Phi-3). `plain_copy` takes the unwrapped tree, which costs no
memory, when its log-probabilities equal the HF model's on probe tokens, else the copy taken
before (which then keeps the weights the bridge replaced: the memory of a second load, without
reading the files again).
"""

from __future__ import annotations

import copy

import torch

_HOOK_DICTS = ("_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
               "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def module_copy(module: torch.nn.Module, unwrap: bool = False) -> torch.nn.Module:
    """A copy of a module tree that shares every parameter and buffer (no tensor is copied)
    and has its own module, parameter and hook dictionaries, so that later changes to either
    tree's structure or hooks leave the other alone. With `unwrap`, each TransformerLens
    bridge component is replaced by the HF module it wraps (`_original_component`)."""
    while unwrap and "_original_component" in module._modules:
        module = module._modules["_original_component"]
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            clone.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    clone._modules = type(module._modules)(
        (name, None if child is None else module_copy(child, unwrap))
        for name, child in module._modules.items())
    return clone


def plain_copy(bridge, before: torch.nn.Module) -> torch.nn.Module:
    """The bridge's model as a plain HF model: its own modules unwrapped when they reproduce
    `before` (the `module_copy` taken before the bridge was built), else `before`."""
    unwrapped = module_copy(bridge.original_model, unwrap=True)
    try:
        same = _same_predictions(unwrapped, before)
    except Exception:  # a layout the unwrapped tree cannot run: keep the HF model
        same = False
    return unwrapped if same else before


def _same_predictions(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal next-token log-probabilities on fixed pseudo-random tokens (2 rows of 8)."""
    vocab = int(getattr(b.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        return False
    device = next(b.parameters()).device
    tokens = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    with torch.inference_mode():
        got = a(input_ids=tokens, use_cache=False).logits.float().log_softmax(-1)
        want = b(input_ids=tokens, use_cache=False).logits.float().log_softmax(-1)
    tol = 1e-4 if next(b.parameters()).dtype == torch.float32 else 5e-2
    return got.shape == want.shape and torch.allclose(got, want, atol=tol, rtol=tol)
