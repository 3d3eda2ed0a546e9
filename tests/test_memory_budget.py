"""The engine's memory budget: prompt slices, a bounded trace cache, and the same numbers."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import TEST_DEVICE, assert_close, build_model_dir, load_bridge

from harness.measure.attribution import dla, logit_lens
from harness.measure.budget import CACHE_SHARE, SLICE_SHARE
from harness.measure.patching import PatchingEngine, Run
from harness.prompts import PromptBatch

PROMPTS = ["This film was", "This film", "The plot was really", "It was", "This movie was",
           "The acting", "I thought the film was"]  # 7 prompts of different lengths


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    a = load_bridge(build_model_dir(root / "a", n_layer=3, seed=0))
    b = load_bridge(build_model_dir(root / "b", n_layer=3, seed=1))
    rows = [a.to_tokens(p)[0] for p in PROMPTS]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    final_pos = torch.tensor([len(r) - 1 for r in rows])
    answer = torch.arange(10, 10 + len(rows))
    foil = torch.arange(40, 40 + len(rows))
    return dict(a=a, b=b, **{name: t.to(TEST_DEVICE) for name, t in dict(
        tokens=tokens, final_pos=final_pos, answer=answer, foil=foil).items()})


def _runs(f):
    return (Run("b", f["b"], f["tokens"], f["final_pos"]),
            Run("a", f["a"], f["tokens"], f["final_pos"]))


def _tiny_budget_mb(f, prompts_per_slice: int = 2) -> float:
    """A budget whose slice share holds the traces of `prompts_per_slice` prompts of one run."""
    probe = PatchingEngine()
    per_prompt = probe.forward(_runs(f)[1]).trace_nbytes(1, f["tokens"].shape[1])
    return prompts_per_slice * per_prompt / SLICE_SHARE / 2**20


def test_trace_nbytes_is_what_the_engine_keeps(family):
    engine = PatchingEngine()
    run = _runs(family)[1]
    acts = engine.clean(run)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in acts.values()}
    assert sum(storages.values()) == engine.forward(run).trace_nbytes(*run.shape)
    assert engine.cached_trace_bytes() == sum(storages.values())


def test_small_budget_slices_prompts_and_gives_the_same_numbers(family):
    f = family
    from_run, into_run = _runs(f)
    args = (from_run, into_run, f["answer"], f["foil"])
    small = PatchingEngine(memory_budget_mb=_tiny_budget_mb(f))
    big = PatchingEngine()
    # the budget really forces slices: 1 prompt per slice for two runs, 2 for one run
    assert [s.stop - s.start for s, _, _ in small.slices(from_run, into_run)] == [1] * 7
    assert [s.stop - s.start for s, _, _ in small.slices(into_run)] == [2, 2, 2, 1]

    def same(x, y):
        assert_close(x, y, atol=1e-5, rtol=0)

    same(small.logit_diff(into_run, f["answer"], f["foil"]),
         big.logit_diff(into_run, f["answer"], f["foil"]))
    for site, over, method in [("resid_pre", ("layer", "pos"), "exact"),
                               ("z", ("layer", "head"), "exact"),
                               ("attn_out", ("layer", "pos"), "attribution")]:
        s = small.patch_sweep(*args, site=site, over=over, method=method)
        b = big.patch_sweep(*args, site=site, over=over, method=method)
        same(s.extras["per_prompt"], b.extras["per_prompt"])
        same(s.values, b.values)
    for kw in [dict(site="z", heads=["L1H2"], positions=[-1]),
               dict(site="z", heads=["L0H1", "L2H3"]),  # two layers: through the bridge
               dict(site="z", heads=["L0H1", "L2H3"], positions=[-1]),  # per-prompt masks
               dict(site="mlp_post", layers=[1], neurons=[3, 5])]:
        s, b = small.patch(*args, **kw), big.patch(*args, **kw)
        same(s.patched, b.patched)
        assert abs(s.normalized - b.normalized) < 1e-5
    run_args = (into_run, f["answer"], f["foil"])
    for kw in [dict(site="mlp_out", layers=[0, 2], kind="mean"),
               dict(site="pattern", layers=[1], kind="mean"),
               dict(site="z", heads=["L2H0"], kind="zero")]:
        s, b = small.ablate(*run_args, **kw), big.ablate(*run_args, **kw)
        same(s.patched, b.patched)
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=f["tokens"], final_pos=f["final_pos"],
                        answer_ids=f["answer"], foil_ids=f["foil"])
    for by in ("component", "head"):
        same(dla(f["a"], batch, by, engine=small, key="a").extras["per_prompt"],
             dla(f["a"], batch, by, engine=big, key="a").extras["per_prompt"])
    same(logit_lens(f["a"], batch, True, engine=small, key="a").extras["per_prompt"],
         logit_lens(f["a"], batch, True, engine=big, key="a").extras["per_prompt"])
    assert small.cached_trace_bytes() <= CACHE_SHARE * small.memory_budget_mb * 2**20


def test_trace_cache_stays_within_half_the_budget(family):
    """Room for two traces: a third evicts the least recently used one, which is retraced."""
    f = family
    one = PatchingEngine().forward(_runs(f)[1]).trace_nbytes(*f["tokens"].shape)
    engine = PatchingEngine(memory_budget_mb=2.5 * one / CACHE_SHARE / 2**20)
    runs = [Run("a", f["a"], f["tokens"].roll(i, 1), f["final_pos"]) for i in range(3)]
    first, second = engine.clean(runs[0]), engine.clean(runs[1])
    assert engine.clean(runs[0]) is first  # still cached, now the most recently used
    engine.clean(runs[2])  # evicts runs[1]
    assert engine.cached_trace_bytes() == 2 * one
    assert engine.clean(runs[0]) is first
    assert engine.clean(runs[1]) is not second  # traced again
    assert engine.cached_trace_bytes() == 2 * one


def test_behavior_measurements_slice_prompts_within_the_budget(family):
    from harness.measure.logits import logit_diff, prompts_per_forward, top_k_tokens

    f = family
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=f["tokens"], final_pos=f["final_pos"],
                        answer_ids=f["answer"], foil_ids=f["foil"])
    n_pos = f["tokens"].shape[1]
    # the smallest budget (in steps of 0.01 MB) that allows 3 prompts a forward pass
    tiny = next(mb / 100 for mb in range(1, 10_000)
                if prompts_per_forward(f["a"].cfg, n_pos, mb / 100) >= 3)
    assert prompts_per_forward(f["a"].cfg, n_pos, tiny) == 3
    assert_close(logit_diff(f["a"], batch, tiny), logit_diff(f["a"], batch),
                               atol=1e-5, rtol=0)
    small, big = (top_k_tokens(f["a"], f["a"].tokenizer, batch, 3, mb) for mb in (tiny, 2048))
    assert [[t for t, _ in row] for row in small] == [[t for t, _ in row] for row in big]
    assert len(small) == len(PROMPTS)
