"""The patching engine agrees with TransformerLens's `patching` module, cell by cell."""

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
from harness.measure.patching import PatchingEngine, Run

tl_patching = pytest.importorskip("transformer_lens.patching")

ATOL = 1e-4
PROMPTS = ["This film was", "This film"]  # 6 and 5 tokens: right padding


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("patching")
    a_dir = build_model_dir(root / "a", n_layer=3, seed=0)
    b = load_bridge(build_model_dir(root / "b", n_layer=3, seed=1))
    near = copy_with_new_last_block(a_dir, root / "near", scale=0.005, blocks="all")
    return load_bridge(a_dir), b, load_bridge(near)


@pytest.fixture(scope="module")
def setup(models):
    """Model -> model runs (same tokens) and clean -> corrupt runs (same model, same length)."""
    a, b, near = models
    tokens = a.to_tokens(PROMPTS).to(TEST_DEVICE)  # right-padded to one length
    final_pos = torch.tensor([len(a.to_tokens(p)[0]) - 1 for p in PROMPTS], device=TEST_DEVICE)
    corrupt = tokens.clone()
    corrupt[:, 2] = tokens[:, 3]
    corrupt[:, 1] = 5
    answer, foil = (torch.tensor(ids, device=TEST_DEVICE) for ids in ([10, 20], [30, 40]))
    return dict(a=a, b=b, near=near, tokens=tokens, final_pos=final_pos, corrupt=corrupt,
                answer=answer, foil=foil)


def _metric(setup):
    rows = torch.arange(setup["tokens"].shape[0])

    def metric(logits):
        final = logits[rows, setup["final_pos"]]
        return (final[rows, setup["answer"]] - final[rows, setup["foil"]]).mean()

    return metric


def _pairs(setup):
    """(from bridge, from tokens, into bridge, into tokens) for both kinds of patching."""
    return {"model": (setup["b"], setup["tokens"], setup["a"], setup["tokens"]),
            "prompt": (setup["a"], setup["tokens"], setup["a"], setup["corrupt"])}


def _runs(setup, kind):
    fb, ft, ib, it = _pairs(setup)[kind]
    keys = {id(setup["a"]): "a", id(setup["b"]): "b"}
    return (Run(keys[id(fb)], fb, ft, setup["final_pos"]),
            Run(keys[id(ib)], ib, it, setup["final_pos"]))


def _reference(setup, kind, fn):
    fb, ft, ib, it = _pairs(setup)[kind]
    with torch.no_grad():
        _, cache = fb.run_with_cache(ft)
        return fn(ib, it, cache, _metric(setup)).float().cpu()


SWEEPS = [  # (TransformerLens function, site, over, permutation of TL's axes into ours)
    ("get_act_patch_resid_pre", "resid_pre", ("layer", "pos"), None),
    ("get_act_patch_resid_mid", "resid_mid", ("layer", "pos"), None),
    ("get_act_patch_attn_out", "attn_out", ("layer", "pos"), None),
    ("get_act_patch_mlp_out", "mlp_out", ("layer", "pos"), None),
    ("get_act_patch_attn_head_out_all_pos", "z", ("layer", "head"), None),
    ("get_act_patch_attn_head_q_all_pos", "q", ("layer", "head"), None),
    ("get_act_patch_attn_head_k_all_pos", "k", ("layer", "head"), None),
    ("get_act_patch_attn_head_v_all_pos", "v", ("layer", "head"), None),
    ("get_act_patch_attn_head_pattern_all_pos", "pattern", ("layer", "head"), None),
    ("get_act_patch_attn_head_out_by_pos", "z", ("layer", "head", "pos"), (0, 2, 1)),
    ("get_act_patch_attn_head_q_by_pos", "q", ("layer", "head", "pos"), (0, 2, 1)),
    ("get_act_patch_attn_head_k_by_pos", "k", ("layer", "head", "pos"), (0, 2, 1)),
    ("get_act_patch_attn_head_v_by_pos", "v", ("layer", "head", "pos"), (0, 2, 1)),
    ("get_act_patch_attn_head_pattern_by_pos", "pattern", ("layer", "head", "pos"), None),
]


@pytest.mark.parametrize("kind", ["model", "prompt"])
@pytest.mark.parametrize("fn_name,site,over,perm", SWEEPS, ids=[s[0][14:] for s in SWEEPS])
def test_sweep_matches_transformer_lens(setup, kind, fn_name, site, over, perm):
    expected = _reference(setup, kind, getattr(tl_patching, fn_name))
    if perm is not None:
        expected = expected.permute(*perm)
    from_run, into_run = _runs(setup, kind)
    grid = PatchingEngine().patch_sweep(from_run, into_run, setup["answer"], setup["foil"],
                                        site=site, over=over)
    assert grid.axes == over
    assert_close(grid.raw, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out", "mlp_out", "z",
                                  "mlp_post", "v", "pattern"])
def test_layer_sweep_equals_patching_every_position(setup, site):
    """over=[layer] == patching all positions of that layer (checked against a bridge hook)."""
    from_run, into_run = _runs(setup, "model")
    engine = PatchingEngine()
    grid = engine.patch_sweep(from_run, into_run, setup["answer"], setup["foil"], site=site,
                              over=("layer",))
    cache = setup["b"].run_with_cache(setup["tokens"])[1]
    hook = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post",
            "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "z": "attn.hook_z",
            "mlp_post": "mlp.hook_post", "v": "attn.hook_v", "pattern": "attn.hook_pattern"}[site]
    for layer in range(3):
        name = f"blocks.{layer}.{hook}"
        with torch.no_grad():
            logits = setup["a"].run_with_hooks(
                setup["tokens"], fwd_hooks=[(name, lambda act, hook: cache[hook.name])])
        assert abs(_metric(setup)(logits).item() - grid.raw[layer].item()) < ATOL


def test_patch_matches_sweep_cell_and_normalizes(setup):
    from_run, into_run = _runs(setup, "model")
    engine = PatchingEngine()
    grid = engine.patch_sweep(from_run, into_run, setup["answer"], setup["foil"], site="z",
                              over=("layer", "head"))
    effect = engine.patch(from_run, into_run, setup["answer"], setup["foil"], site="z",
                          heads=["L1H2"])
    assert abs(effect.patched.mean().item() - grid.raw[1, 2].item()) < ATOL
    assert abs(effect.normalized - grid.values[1, 2].item()) < 1e-3
    expected = ((effect.patched.mean() - effect.into_value.mean())
                / (effect.from_value.mean() - effect.into_value.mean()))
    assert abs(effect.normalized - expected.item()) < 1e-6


def test_patch_several_heads_and_layers_matches_bridge_hooks(setup):
    """Heads of two layers patched together (bridge path) and of one layer (engine path)."""
    from_run, into_run = _runs(setup, "model")
    engine = PatchingEngine()
    cache = setup["b"].run_with_cache(setup["tokens"])[1]

    def reference(heads):
        def hook(act, hook):
            layer = int(hook.name.split(".")[1])
            act = act.clone()
            for lh, h in heads:
                if lh == layer:
                    act[:, :, h] = cache[hook.name][:, :, h]
            return act
        names = {f"blocks.{lh}.attn.hook_z" for lh, _ in heads}
        with torch.no_grad():
            logits = setup["a"].run_with_hooks(setup["tokens"],
                                               fwd_hooks=[(n, hook) for n in names])
        return _metric(setup)(logits).item()

    for heads in ([(2, 0), (2, 3)], [(0, 1), (2, 3)]):
        effect = engine.patch(from_run, into_run, setup["answer"], setup["foil"], site="z",
                              heads=heads)
        assert abs(effect.patched.mean().item() - reference(heads)) < ATOL


def test_patch_positions_and_neurons_match_bridge_hooks(setup):
    from_run, into_run = _runs(setup, "prompt")
    engine = PatchingEngine()
    cache = setup["a"].run_with_cache(setup["tokens"])[1]
    final_pos = setup["final_pos"]

    def hook(act, hook):  # positions [1, -1] (-1 = each prompt's final token), neurons [3, 7]
        act = act.clone()
        for b in range(act.shape[0]):
            for p in (1, int(final_pos[b])):
                act[b, p, [3, 7]] = cache[hook.name][b, p, [3, 7]]
        return act

    with torch.no_grad():
        logits = setup["a"].run_with_hooks(setup["corrupt"],
                                           fwd_hooks=[("blocks.1.mlp.hook_post", hook)])
    effect = engine.patch(from_run, into_run, setup["answer"], setup["foil"], site="mlp_post",
                          layers=[1], positions=[1, -1], neurons=[3, 7])
    assert abs(effect.patched.mean().item() - _metric(setup)(logits).item()) < ATOL


def test_logit_diff_matches_bridge_and_is_cached(setup):
    _, into_run = _runs(setup, "model")
    engine = PatchingEngine()
    ours = engine.logit_diff(into_run, setup["answer"], setup["foil"])
    with torch.no_grad():
        logits = setup["a"](setup["tokens"])
    rows = torch.arange(2)
    final = logits[rows, setup["final_pos"]]
    assert_close(ours, final[rows, setup["answer"]] - final[rows, setup["foil"]],
                               atol=ATOL, rtol=0)
    engine.logit_diff(into_run, setup["answer"], setup["foil"])
    assert len(engine.traces.entries) == 1


def test_tiny_memory_budget_gives_identical_results(setup):
    from_run, into_run = _runs(setup, "prompt")
    args = (from_run, into_run, setup["answer"], setup["foil"])
    big = PatchingEngine().patch_sweep(*args, site="resid_pre", over=("layer", "pos"))
    engine = PatchingEngine(memory_budget_mb=1)
    engine._bytes = lambda share: 1  # one variant per chunk
    small = engine.patch_sweep(*args, site="resid_pre", over=("layer", "pos"))
    assert_close(small.raw, big.raw, atol=1e-6, rtol=0)


def test_attribution_approximates_exact_patching(setup):
    """From a slightly perturbed copy of the model: small differences, so linearity holds."""
    from_run = Run("near", setup["near"], setup["tokens"], setup["final_pos"])
    into_run = Run("a", setup["a"], setup["tokens"], setup["final_pos"])
    engine = PatchingEngine()
    args = (from_run, into_run, setup["answer"], setup["foil"])
    for site, over in [("resid_pre", ("layer", "pos")), ("z", ("layer", "head")),
                       ("attn_out", ("layer", "pos"))]:
        exact = engine.patch_sweep(*args, site=site, over=over)
        approx = engine.patch_sweep(*args, site=site, over=over, method="attribution")
        assert approx.method == "attribution" and approx.extras["approximation"]
        change_exact = exact.raw.flatten() - exact.extras["into"]
        change_approx = approx.raw.flatten() - approx.extras["into"]
        corr = torch.corrcoef(torch.stack([change_exact, change_approx]))[0, 1]
        assert corr > 0.85, (site, corr)
        assert not torch.allclose(change_exact, change_approx, atol=1e-6)  # an approximation


def test_ablation_basics(setup):
    _, run = _runs(setup, "model")
    engine = PatchingEngine()
    args = (run, setup["answer"], setup["foil"])
    clean = engine.logit_diff(*args)
    nothing = engine.ablate(*args, site="z", heads=[(0, 0)], positions=[], kind="zero")
    assert_close(nothing.patched, clean, atol=1e-5, rtol=0)
    assert abs(nothing.normalized) < 1e-4
    resid = engine.ablate(*args, site="resid_post", layers=[2], kind="zero")
    # zeroed final residual stream: LayerNorm of zero is zero, only the unembed bias remains
    readout = engine.forward(run).readout
    bias = readout.b_U[setup["answer"]] - readout.b_U[setup["foil"]]
    assert_close(resid.patched, bias, atol=1e-4, rtol=0)
    ref = torch.full((2,), 5.0)
    mean = engine.ablate(*args, site="mlp_out", layers=[0, 2], kind="mean", reference=ref)
    expected = (mean.patched.mean() - clean.mean()) / (5.0 - clean.mean())
    assert abs(mean.normalized - expected.item()) < 1e-5
    assert_close(mean.from_value, ref)


def test_mean_ablation_matches_hook(setup):
    _, run = _runs(setup, "model")
    engine = PatchingEngine()
    cache = setup["a"].run_with_cache(setup["tokens"])[1]
    pos = torch.arange(setup["tokens"].shape[1], device=setup["final_pos"].device)
    real = pos[None] <= setup["final_pos"][:, None]
    act = cache["blocks.1.hook_attn_out"]
    mean = (act * real[..., None]).sum((0, 1)) / real.sum()
    with torch.no_grad():
        logits = setup["a"].run_with_hooks(
            setup["tokens"], fwd_hooks=[("blocks.1.hook_attn_out",
                                         lambda a, hook: mean.expand_as(a))])
    effect = engine.ablate(run, setup["answer"], setup["foil"], site="attn_out", layers=[1],
                           kind="mean")
    assert abs(effect.patched.mean().item() - _metric(setup)(logits).item()) < ATOL


def test_right_padded_prompts_of_different_lengths(setup):
    """Final-position metrics per prompt: each prompt alone gives the same per-prompt numbers."""
    from_run, into_run = _runs(setup, "model")
    assert setup["final_pos"][0] != setup["final_pos"][1]
    engine = PatchingEngine()
    grid = engine.patch_sweep(from_run, into_run, setup["answer"], setup["foil"], site="z",
                              over=("layer", "head"))
    for i, prompt in enumerate(PROMPTS):
        tokens = setup["a"].to_tokens(prompt).to(TEST_DEVICE)
        fp = torch.tensor([tokens.shape[1] - 1])
        single = engine.patch_sweep(Run("b", setup["b"], tokens, fp),
                                    Run("a", setup["a"], tokens, fp),
                                    setup["answer"][i:i + 1], setup["foil"][i:i + 1], site="z",
                                    over=("layer", "head"))
        assert_close(grid.extras["per_prompt"][..., i], single.raw, atol=ATOL,
                                   rtol=0)


def test_grid_labels_and_errors(setup):
    from_run, into_run = _runs(setup, "model")
    engine = PatchingEngine()
    args = (from_run, into_run, setup["answer"], setup["foil"])
    grid = engine.patch_sweep(*args, site="resid_pre", over=["layer", "pos"])
    assert grid.labels[0] == (0, 1, 2)
    assert grid.labels[1] == tuple(setup["a"].to_str_tokens(setup["tokens"][0]))
    with pytest.raises(MeasureError, match="did you mean 'resid_pre'"):
        engine.patch_sweep(*args, site="resid_pr")
    with pytest.raises(MeasureError, match="head site"):
        engine.patch_sweep(*args, site="mlp_out", over=("layer", "head"))
    with pytest.raises(MeasureError, match="equal token shape"):
        engine.patch(Run("b", setup["b"], setup["tokens"][:, :-1], setup["final_pos"]), into_run,
                     setup["answer"], setup["foil"], site="z", heads=["L0H0"])
    with pytest.raises(MeasureError, match="out of range"):
        engine.patch(*args, site="z", heads=["L9H0"])
    with pytest.raises(MeasureError, match="two different models"):
        engine.logit_diff(Run("a", setup["b"], setup["tokens"], setup["final_pos"]),
                          setup["answer"], setup["foil"])
    with pytest.raises(MeasureError, match="not a head name"):
        engine.patch(*args, site="z", heads=["layer3"])
