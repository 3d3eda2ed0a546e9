"""The engine equals TransformerLens's patching functions on the shipped toy models too:
RLHF -> source (the seed's direction) and clean -> corrupt within the source model."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl_patching
from _tiny_models import TEST_DEVICE, assert_close
from test_patching import SWEEPS

from harness.measure.patching import PatchingEngine, Run
from harness.models import load_model
from harness.spec import ModelSource
from harness.zoo import zoo_checkpoint

CLEAN = ["This movie was really bad. The acting was", "This film was quite bad. The plot was"]
CORRUPT = ["This movie was really good. The acting was", "This film was quite good. The plot was"]


@pytest.fixture(scope="module")
def toy():
    source, rlhf = (load_model(n, ModelSource(zoo=n), str(zoo_checkpoint(n)), TEST_DEVICE).bridge
                    for n in ("toy-reviews-source", "toy-reviews-rlhf"))
    tokens, corrupt = (source.to_tokens(p).to(TEST_DEVICE) for p in (CLEAN, CORRUPT))
    assert tokens.shape == corrupt.shape
    final_pos = torch.full((len(CLEAN),), tokens.shape[1] - 1, device=TEST_DEVICE)
    ids = [source.to_single_token(t) for t in (" bad", " good")]
    return dict(source=source, rlhf=rlhf, tokens=tokens, corrupt=corrupt, final_pos=final_pos,
                answer=torch.tensor([ids[0]] * 2, device=TEST_DEVICE),
                foil=torch.tensor([ids[1]] * 2, device=TEST_DEVICE))


def pairs(t):
    return {"rlhf->source": (("rlhf", t["rlhf"], t["tokens"]),
                             ("source", t["source"], t["tokens"])),
            "clean->corrupt": (("source", t["source"], t["tokens"]),
                               ("source", t["source"], t["corrupt"]))}


@pytest.mark.parametrize("direction", ["rlhf->source", "clean->corrupt"])
@pytest.mark.parametrize("fn_name,site,over,perm", SWEEPS[:6] + SWEEPS[9:10],
                         ids=[s[0][14:] for s in SWEEPS[:6] + SWEEPS[9:10]])
def test_engine_equals_transformer_lens_on_the_toy_models(toy, direction, fn_name, site, over,
                                                          perm):
    (fk, fb, ft), (ik, ib, it) = pairs(toy)[direction]
    rows = torch.arange(2)

    def metric(logits):
        final = logits[rows, toy["final_pos"]]
        return (final[rows, toy["answer"]] - final[rows, toy["foil"]]).mean()

    with torch.no_grad():
        _, cache = fb.run_with_cache(ft)
        expected = getattr(tl_patching, fn_name)(ib, it, cache, metric).float().cpu()
    if perm is not None:
        expected = expected.permute(*perm)
    grid = PatchingEngine().patch_sweep(Run(fk, fb, ft, toy["final_pos"]),
                                        Run(ik, ib, it, toy["final_pos"]),
                                        toy["answer"], toy["foil"], site=site, over=over)
    assert_close(grid.raw, expected, atol=1e-4, rtol=0)
