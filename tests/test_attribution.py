"""DLA sums to the logit diff; the logit lens is each model's own; first_differing_layer."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import (
    TEST_DEVICE,
    assert_close,
    build_model_dir,
    copy_with_new_last_block,
    load_bridge,
)

from harness.errors import MeasureError
from harness.measure.attribution import (
    dla,
    first_differing_layer,
    logit_lens,
    logit_lens_difference,
)
from harness.measure.patching import PatchingEngine
from harness.measure.results import Grid
from harness.prompts import PromptBatch

PROMPTS = ["This movie was really", "The film was quite bad", "This film"]
N_LAYER = 3


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A model and its copy with a different last block (a 'fine-tuned' twin)."""
    root = tmp_path_factory.mktemp("attribution")
    base = build_model_dir(root / "base", n_layer=N_LAYER, seed=3)
    tuned = copy_with_new_last_block(base, root / "tuned")
    return load_bridge(base), load_bridge(tuned)


@pytest.fixture(scope="module")
def batch(twins):
    bridge = twins[0]
    tokens = bridge.to_tokens(PROMPTS)  # right-padded: three different lengths
    final_pos = torch.tensor([bridge.to_tokens(p).shape[1] - 1 for p in PROMPTS])
    assert len(set(final_pos.tolist())) == 3
    return PromptBatch(tuple(PROMPTS), tokens, final_pos, torch.tensor([11, 12, 13]),
                       torch.tensor([40, 41, 42])).to(TEST_DEVICE)


def _logit_diff(bridge, batch):
    with torch.no_grad():
        logits = bridge(batch.tokens)
    rows = torch.arange(len(batch.texts))
    final = logits[rows, batch.final_pos]
    return final[rows, batch.answer_ids] - final[rows, batch.foil_ids]


@pytest.mark.parametrize("by", ["component", "head", "layer"])
def test_dla_sums_to_logit_diff(twins, batch, by):
    for bridge in twins:
        grid = dla(bridge, batch, by=by)
        expected = _logit_diff(bridge, batch)
        assert_close(grid.extras["per_prompt"].sum(0), expected, atol=1e-4, rtol=0)
        assert abs(grid.values.sum().item() - expected.mean().item()) < 1e-4


def test_dla_labels(twins, batch):
    comp = dla(twins[0], batch, by="component").labels[0]
    assert comp == ("embed", "pos_embed", "attn0", "mlp0", "attn1", "mlp1", "attn2", "mlp2",
                    "bias")
    heads = dla(twins[0], batch, by="head").labels[0]
    assert heads[:2] == ("L0H0", "L0H1") and heads[-1] == "rest" and len(heads) == 4 * 3 + 1
    assert dla(twins[0], batch, by="layer").labels[0] == ("embed", 0, 1, 2, "bias")
    with pytest.raises(MeasureError, match="did you mean 'head'"):
        dla(twins[0], batch, by="heads")


def test_dla_heads_add_up_to_attention_layers(twins, batch):
    comp = dla(twins[0], batch, by="component")
    heads = dla(twins[0], batch, by="head")
    per_layer = heads.extras["per_prompt"][:-1].reshape(3, 4, -1).sum(1)
    attn = comp.extras["per_prompt"][[2, 4, 6]]
    # the heads miss only the attention output bias b_O of each layer
    assert (per_layer - attn).abs().max() < 0.5
    assert (per_layer.sum(0) + heads.extras["per_prompt"][-1]
            - comp.extras["per_prompt"].sum(0)).abs().max() < 1e-4


def test_dla_uses_each_models_own_final_scale(twins, batch):
    """Frozen components are equal across the twins once each model's own scale is undone."""
    a, b = (dla(m, batch, by="component") for m in twins)
    raw_a = a.extras["per_prompt"] * a.extras["final_ln_scale"]
    raw_b = b.extras["per_prompt"] * b.extras["final_ln_scale"]
    frozen = slice(0, 2 + 2 * (N_LAYER - 1))  # embed, pos_embed, attn/mlp of layers 0..L-2
    assert_close(raw_a[frozen], raw_b[frozen], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.extras["final_ln_scale"], b.extras["final_ln_scale"])


def test_logit_lens_final_entry_is_the_logit_diff(twins, batch):
    for bridge in twins:
        lens = logit_lens(bridge, batch, incl_mid=True)
        assert lens.labels[0][:3] == ("resid_pre0", "resid_mid0", "resid_pre1")
        assert lens.labels[0][-1] == "final" and len(lens.labels[0]) == 2 * N_LAYER + 1
        assert_close(lens.extras["per_prompt"][-1], _logit_diff(bridge, batch),
                                   atol=1e-4, rtol=0)


def test_logit_lens_matches_bridge_cache(twins, batch):
    """Each layer's residual from the bridge's cache, normalized with its own scale."""
    bridge = twins[0]
    lens = logit_lens(bridge, batch)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(batch.tokens)
        rows = torch.arange(len(batch.texts))
        for layer in range(N_LAYER):
            resid = cache[f"blocks.{layer}.hook_resid_pre"][rows, batch.final_pos]
            logits = torch.nn.functional.layer_norm(resid, resid.shape[-1:], eps=1e-5) \
                @ bridge.W_U + bridge.b_U
            expected = logits[rows, batch.answer_ids] - logits[rows, batch.foil_ids]
            assert_close(lens.extras["per_prompt"][layer], expected, atol=1e-4,
                                       rtol=0)


def test_twins_lens_equal_below_the_changed_block(twins, batch):
    for incl_mid in (False, True):
        a, b = (logit_lens(m, batch, incl_mid=incl_mid) for m in twins)
        n_equal = 2 * N_LAYER - 1 if incl_mid else N_LAYER  # up to and including resid_pre L-1
        assert torch.equal(a.extras["per_prompt"][:n_equal], b.extras["per_prompt"][:n_equal])
        assert not torch.allclose(a.values[-1], b.values[-1])
        assert first_differing_layer(a, b, atol=1e-4) == N_LAYER - 1
    diff = logit_lens_difference(*twins, batch)
    assert torch.equal(diff.values[:N_LAYER], torch.zeros(N_LAYER))


def test_lens_shares_the_engine_cache(twins, batch):
    engine = PatchingEngine()
    lens = logit_lens(twins[0], batch, engine=engine, key="base")
    again = dla(twins[0], batch, engine=engine, key="base")
    assert len(engine.traces.entries) == 1
    assert abs(lens.values[-1].item() - again.values.sum().item()) < 1e-4


def _lens(values, labels):
    return Grid(axes=("layer",), labels=(tuple(labels),), values=torch.tensor(values))


def test_first_differing_layer_pure():
    labels = ["resid_pre0", "resid_pre1", "resid_pre2", "final"]
    base = _lens([0.0, 1.0, 2.0, 3.0], labels)
    assert first_differing_layer(base, _lens([0.0, 1.0, 2.0, 3.0], labels)) is None
    assert first_differing_layer(base, _lens([0.0, 1.0, 2.0, 3.5], labels)) == 2
    assert first_differing_layer(base, _lens([0.0, 1.0, 2.5, 3.5], labels)) == 1
    assert first_differing_layer(base, _lens([0.0, 1.00001, 2.0, 3.0], labels), atol=1e-4) is None
    assert first_differing_layer(base, _lens([9.0, 1.0, 2.0, 3.0], labels)) == -1
    mid = ["resid_pre0", "resid_mid0", "resid_pre1", "resid_mid1", "final"]
    assert first_differing_layer(_lens([0, 0, 0, 0, 0.0], mid), _lens([0, 0, 0, 1, 1.0], mid)) == 1
    with pytest.raises(MeasureError, match="different entries"):
        first_differing_layer(base, _lens([0.0, 1.0, 2.0], labels[:3]))
