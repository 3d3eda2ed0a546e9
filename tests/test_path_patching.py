"""Path patching on the engine (`PatchingEngine.path_patch`, `measure/path_patching.py`) equals
the hook implementation (`circuits.path_patch`, itself checked against hand-written hooks in
test_circuits.py) on every family's fast path, and falls back to it on the general path."""

from __future__ import annotations

import pytest
import torch
from _fast_paths import PROMPTS
from _tiny_models import TEST_DEVICE, build_model_dir, load_bridge

from harness.measure import circuits as C
from harness.measure.patching import PatchingEngine, Run

ATOL = 1e-5
ANSWER, FOIL = torch.tensor([10, 20]), torch.tensor([30, 40])


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    """Tiny checkpoints with sharpened attention (projections x8), so that senders move the
    receivers' queries and keys by far more than float noise."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from harness.testing import build_tiny_checkpoint

    root, loaded = tmp_path_factory.mktemp("paths"), {}

    def get(arch: str):
        if arch not in loaded:
            directory = build_tiny_checkpoint(arch, root / arch)
            model = AutoModelForCausalLM.from_pretrained(str(directory))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2 and ("attn" in name or "attention" in name):
                        p.mul_(8)
            model.save_pretrained(str(directory))
            bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
            bridge.enable_compatibility_mode()
            loaded[arch] = bridge
        return loaded[arch]
    return get


def _runs(bridge):
    """Clean prompts (right-padded, two lengths) and a corrupt copy with column 2 changed."""
    tokens = bridge.to_tokens(PROMPTS, prepend_bos=True).to(TEST_DEVICE)
    final_pos = torch.tensor([len(bridge.to_tokens(p, prepend_bos=True)[0]) - 1
                              for p in PROMPTS], device=TEST_DEVICE)
    corrupt = tokens.clone()
    corrupt[:, 2] = 7
    return tokens, corrupt, final_pos


def _senders(cfg):
    """Every head and MLP alone, a head with an MLP, and the empty set."""
    return [[C.Component(layer, h)] for layer in range(cfg.n_layers) for h in range(cfg.n_heads)] \
        + [[C.Component(layer)] for layer in range(cfg.n_layers)] \
        + [[C.Component(0, 1), C.Component(0)], []]


def _compare(bridge, through, receivers, expected_path, **engine_kw):
    tokens, corrupt, final_pos = _runs(bridge)
    senders = _senders(bridge.cfg)
    engine = PatchingEngine(**engine_kw)
    from_run, into_run = Run("m", bridge, tokens, final_pos), Run("m", bridge, corrupt, final_pos)
    got = engine.path_patch(from_run, into_run, ANSWER, FOIL, senders, through, receivers)
    assert engine.path_of(into_run) == expected_path
    expected = C.path_patch(bridge, tokens, corrupt, final_pos, ANSWER, FOIL, senders, through,
                            receivers)
    assert got.shape == (len(senders), len(PROMPTS))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    return got, expected


CASES = [("resid", ()), ("q", ("L1H2", "L1H0")), ("k", ("L1KV0",)), ("v", ("L1KV1",))]


@pytest.mark.parametrize("arch,fast", [("gpt2", "gpt2-fast"), ("llama-gqa", "llama-fast"),
                                       ("pythia", "parallel-fast"), ("gemma", "llama-fast"),
                                       ("gemma2", "llama-fast"), ("phi", "parallel-fast")])
@pytest.mark.parametrize("path,receivers", CASES)
def test_engine_path_patch_equals_hooks(bridges, arch, fast, path, receivers):
    if arch == "gemma" and path == "v":   # one key/value head
        receivers = ("L1KV0",)
    got, expected = _compare(bridges(arch), path, receivers, fast)
    assert (expected - expected[-1]).abs().max() > 100 * ATOL   # senders move the metric


def test_receivers_in_two_layers_and_prompt_slices(tmp_path):
    """Receivers in layers 1 and 2 of a 3-layer model (the second replaced mid-run), with a
    budget so small that prompts run in slices and sender sets one at a time."""
    bridge = load_bridge(build_model_dir(tmp_path / "m", n_layer=3))
    for path, kind in (("q", "H"), ("v", "KV")):
        _compare(bridge, path, (f"L1{kind}0", f"L2{kind}3", f"L2{kind}1"), "gpt2-fast")
        _compare(bridge, path, (f"L1{kind}0", f"L2{kind}3"), "gpt2-fast", memory_budget_mb=0.01)


def test_general_path_uses_the_hooks(bridges):
    """An engine held to the general path (as a model without a fast path) gets the hooks."""
    _compare(bridges("gemma2"), "k", ("L1KV1",), "general", path="general")
    _compare(bridges("gpt2"), "resid", (), "general", path="general")
