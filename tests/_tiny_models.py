"""Tiny random GPT-2s for the measurement tests: LayerNorm weights randomized so folding matters."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from harness.testing import build_tiny_gpt2

# The measurement tests run on the CPU; HARNESS_TEST_DEVICE=cuda runs them on a GPU.
TEST_DEVICE = os.environ.get("HARNESS_TEST_DEVICE", "cpu")


def build_model_dir(directory: Path, *, n_layer: int = 3, seed: int = 0) -> Path:
    """build_tiny_gpt2, then random LayerNorm weights/biases (deterministic in `seed`)."""
    directory = build_tiny_gpt2(directory, n_layer=n_layer, seed=seed)
    model = GPT2LMHeadModel.from_pretrained(str(directory))
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(directory))
    return directory


def copy_with_new_last_block(src: Path, dst: Path, *, seed: int = 7, scale: float = 0.2,
                             blocks: str = "last") -> Path:
    """A copy of `src` with noise added to its last block (or to `blocks="all"`): a twin."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    model = GPT2LMHeadModel.from_pretrained(str(src))
    chosen = model.transformer.h if blocks == "all" else model.transformer.h[-1:]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in chosen:
            for name, p in block.named_parameters():
                if "ln_" not in name:
                    p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(dst))
    return dst


def assert_close(actual, expected, **kw) -> None:
    """torch.testing.assert_close on the CPU: engine results live there, bridge outputs on
    the model's device."""
    torch.testing.assert_close(torch.as_tensor(actual).cpu(), torch.as_tensor(expected).cpu(),
                               **kw)


def load_bridge(directory: Path):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
    bridge.enable_compatibility_mode()
    return bridge


def clean_and_corrupt(bridge, prompts, answer, foil):
    """Clean tokens of `prompts` (BOS, right-padded), a corrupt copy with column 1 changed, the
    final positions and answer/foil ids: the inputs of the sweeps compared with TL's."""
    import torch

    tokens = bridge.to_tokens(prompts, prepend_bos=True).to(TEST_DEVICE)
    final_pos = torch.tensor([len(bridge.to_tokens(p, prepend_bos=True)[0]) - 1
                              for p in prompts], device=TEST_DEVICE)
    corrupt = tokens.clone()
    corrupt[:, 1] = 7
    answer, foil = (torch.tensor(ids, device=TEST_DEVICE) for ids in (answer, foil))
    return tokens, corrupt, final_pos, answer, foil
