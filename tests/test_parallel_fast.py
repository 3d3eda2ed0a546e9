"""The parallel-block fast path (parallel_fast.py: GPT-NeoX/Pythia, Phi): what only this
family needs checked.

The agreement of every sweep, patch, ablation, DLA and lens with the general path is in
test_fast_paths.py. Here: resid_mid is refused with the reason (a parallel block has none),
LayerNorms the bridge left unfolded are folded on reading, sequential families are refused, and
rotating every dimension of q/k (a full instead of a partial rotary embedding) is caught.
"""

from __future__ import annotations

import pytest
import torch
from _fast_paths import ANSWER, ATOL, FOIL, PROMPTS, engines, model_to_model, tiny_bridges
from _tiny_models import TEST_DEVICE, assert_close

from harness.errors import MeasureError
from harness.measure import parallel_fast
from harness.measure.patching import PatchingEngine, Run
from harness.testing import build_tiny_checkpoint

pytest.importorskip("transformer_lens")

FAST_ARCHS = ["pythia", "phi"]
OTHER_ARCHS = ["gpt2", "llama", "phi3"]


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    return tiny_bridges(tmp_path_factory.mktemp("parallel_fast"))


def _case(bridges, arch: str) -> dict:
    return model_to_model(bridges, arch)


def test_resid_mid_is_refused_with_the_reason(bridges):
    c = _case(bridges, "pythia")
    with pytest.raises(MeasureError, match="parallel attention/MLP block has no resid_mid"):
        PatchingEngine().patch_sweep(c["from_run"], c["into_run"], c["answer"], c["foil"],
                                     site="resid_mid", over=("layer",))


def test_unfolded_layernorms_are_folded_on_reading(tmp_path):
    """Without compatibility mode the bridge keeps the (random) LayerNorm scales and biases;
    the fast path folds them into its projections and still agrees with the general path."""
    from transformer_lens.model_bridge import TransformerBridge

    directory = build_tiny_checkpoint("pythia", tmp_path / "pythia")
    bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
    assert not bool((bridge.blocks[0].ln1.original_component.weight == 1).all())
    tokens = bridge.to_tokens(PROMPTS, prepend_bos=True).to(TEST_DEVICE)
    final_pos = torch.tensor([len(bridge.to_tokens(p, prepend_bos=True)[0]) - 1
                              for p in PROMPTS], device=TEST_DEVICE)
    corrupt = tokens.clone()
    corrupt[:, 2] = 7
    args = (Run("c", bridge, tokens, final_pos), Run("c", bridge, corrupt, final_pos),
            torch.tensor(ANSWER, device=TEST_DEVICE), torch.tensor(FOIL, device=TEST_DEVICE))
    fast, general = engines()
    for site, over in (("z", ("layer", "head")), ("mlp_post", ("layer", "pos"))):
        a = fast.patch_sweep(*args, site=site, over=over)
        b = general.patch_sweep(*args, site=site, over=over)
        assert (a.extras["path"], b.extras["path"]) == ("parallel-fast", "general")
        assert_close(a.raw, b.raw, atol=ATOL, rtol=0, msg=site)


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_families_are_refused(bridges, arch):
    """Sequential blocks (GPT-2, Llama, Phi-3): not this fast path's to run."""
    problems = parallel_fast.unsupported_features(bridges(arch))
    assert problems == ["not a parallel attention + MLP block"]


def _full_rotary(self, x, q_pos=None):
    """What a fast path that ignored the rotary fraction would do: rotate every dimension."""
    d_head = x.shape[-1]
    pos = torch.arange(x.shape[1], device=x.device) if q_pos is None else q_pos
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_head, 2, device=x.device).float() / d_head)
    angles = torch.cat([pos[:, None] * inv_freq] * 2, -1)
    shape = (-1, 1, d_head) if q_pos is None else (-1, 1, 1, d_head)
    cos, sin = angles.cos().view(shape).to(x.dtype), angles.sin().view(shape).to(x.dtype)
    half = d_head // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin   # HF's rotate_half


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_a_full_instead_of_partial_rotary_is_caught(bridges, monkeypatch, arch):
    """Rotating every dimension of q/k moves the sweeps off the general path's numbers, and the
    engine's one check against the bridge (the residual stream after every block, then the
    logits) sees it and falls back to the general path. On tiny Phi the logits alone stay
    within their tolerance: the residual stream is what catches it there."""
    c = _case(bridges, arch)
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    expected = PatchingEngine(path="general").patch_sweep(*args, site="q", over=("layer", "head"))
    monkeypatch.setattr(parallel_fast.ParallelOps, "rope", _full_rotary)
    broken = PatchingEngine(verify=False)
    got = broken.patch_sweep(*args, site="q", over=("layer", "head"))
    assert got.extras["path"] == "parallel-fast"
    assert (got.raw - expected.raw).abs().max() > 10 * ATOL  # the agreement tests see it
    engine = PatchingEngine()
    with pytest.warns(UserWarning, match="does not reproduce"):
        engine.logit_diff(c["into_run"], c["answer"], c["foil"])
    assert engine.path_of(c["into_run"]) == "general"
