"""Shared set-up of the fast-path tests (test_fast_paths.py and the family files): tiny
seeded checkpoints as bridges, and model -> model runs whose patches move the metric."""

from __future__ import annotations

import torch
from _tiny_models import TEST_DEVICE

from harness.measure.patching import PatchingEngine, Run
from harness.testing import build_tiny_checkpoint

PROMPTS = ["This movie was really", "The acting was"]  # different lengths: right padding
ANSWER, FOIL = [10, 20], [30, 40]
OVERS = [("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos")]
HEAD_SITES = ("q", "k", "v", "z", "pattern")
ATOL = 1e-5


def tiny_bridges(root):
    """get(arch, seed): a compatibility-mode bridge on a tiny seeded checkpoint, built once."""
    from transformer_lens.model_bridge import TransformerBridge

    loaded: dict[tuple[str, int], object] = {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in loaded:
            directory = build_tiny_checkpoint(arch, root / f"{arch}-{seed}", seed=seed)
            bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
            bridge.enable_compatibility_mode()
            loaded[arch, seed] = bridge
        return loaded[arch, seed]
    return get


def model_to_model(bridges, arch: str) -> dict:
    """Model -> model runs: seed-1 weights on the prompts into seed-0 weights on corrupted ones."""
    a, b = bridges(arch, 0), bridges(arch, 1)
    tokens = a.to_tokens(PROMPTS, prepend_bos=True).to(TEST_DEVICE)
    final_pos = torch.tensor([len(a.to_tokens(p, prepend_bos=True)[0]) - 1 for p in PROMPTS],
                             device=TEST_DEVICE)
    corrupt = tokens.clone()
    corrupt[:, 2] = 7
    return dict(a=a, b=b, tokens=tokens, final_pos=final_pos,
                from_run=Run("b", b, tokens, final_pos), into_run=Run("a", a, corrupt, final_pos),
                answer=torch.tensor(ANSWER, device=TEST_DEVICE),
                foil=torch.tensor(FOIL, device=TEST_DEVICE))


def engines(**kw) -> tuple[PatchingEngine, PatchingEngine]:
    """A default engine (fast path where one applies) and one held to the general path."""
    return PatchingEngine(**kw), PatchingEngine(path="general", **kw)
