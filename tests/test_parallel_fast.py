"""The parallel-block fast path (parallel_fast.py: GPT-NeoX/Pythia, Phi) measures what the
general path measures.

Ground truth: the general path runs through the bridge's own hooks (itself checked against
TransformerLens's patching functions in test_architectures.py). On tiny seeded Pythia
(separate attention and MLP LayerNorms, rotary_pct 0.25, fused per-head-interleaved qkv) and
Phi (one shared LayerNorm, partial_rotary_factor 0.5) checkpoints the fast path is chosen, and
every sweep, patch, ablation, DLA and logit lens agrees with the general path to 1e-5, also
when the memory budget slices prompts. Rotating every dimension of q/k (a full instead of a
partial rotary embedding) or feeding the MLP the attention's output (a sequential block) is
caught by the engine's check against the bridge.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import TEST_DEVICE, assert_close

from harness.errors import MeasureError
from harness.measure import parallel_fast, rotary_ops
from harness.measure.attribution import dla, logit_lens
from harness.measure.patching import PatchingEngine, Run
from harness.prompts import PromptBatch
from harness.testing import build_tiny_checkpoint

pytest.importorskip("transformer_lens")

FAST_ARCHS = ["pythia", "phi"]
OTHER_ARCHS = ["gpt2", "llama", "phi3"]
PROMPTS = ["This movie was really", "The acting was"]  # different lengths: right padding
ANSWER, FOIL = [10, 20], [30, 40]
OVERS = [("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos")]
HEAD_SITES = ("q", "k", "v", "z", "pattern")
ATOL = 1e-5


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge

    root = tmp_path_factory.mktemp("parallel_fast")
    loaded: dict[tuple[str, int], object] = {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in loaded:
            directory = build_tiny_checkpoint(arch, root / f"{arch}-{seed}", seed=seed)
            bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
            bridge.enable_compatibility_mode()
            loaded[arch, seed] = bridge
        return loaded[arch, seed]
    return get


def _case(bridges, arch: str) -> dict:
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


def _engines(**kw):
    return PatchingEngine(**kw), PatchingEngine(path="general", **kw)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_every_sweep_agrees_with_the_general_path(bridges, arch):
    c = _case(bridges, arch)
    fast, general = _engines()
    assert fast.path_of(c["into_run"]) == "parallel-fast"
    assert general.path_of(c["into_run"]) == "general"
    sites = fast.forward(c["into_run"]).dims.sites
    assert sites == general.forward(c["into_run"]).dims.sites  # the bridge's hooks say so too
    assert "resid_mid" not in sites
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    checked = 0
    for site in sites:
        for method in ("exact", "attribution"):
            for over in OVERS:
                if "head" in over and site not in HEAD_SITES:
                    continue
                a = fast.patch_sweep(*args, site=site, over=over, method=method)
                b = general.patch_sweep(*args, site=site, over=over, method=method)
                assert (a.extras["path"], b.extras["path"]) == ("parallel-fast", "general")
                assert_close(a.raw, b.raw, atol=ATOL, rtol=0, msg=f"{site} {over} {method}")
                checked += 1
    assert checked == 2 * (5 * 2 + 5 * 4)  # 5 non-head sites x 2 overs, 5 head sites x 4
    for site in ("z", "mlp_out"):  # the patches move the metric: agreement is not vacuous
        grid = fast.patch_sweep(*args, site=site, over=("layer", "pos"))
        assert grid.raw.std() > 1e-3, site


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_patches_ablations_dla_and_lens_agree(bridges, arch):
    c = _case(bridges, arch)
    fast, general = _engines()
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    last = c["a"].cfg.n_layers - 1
    patches = [dict(site="z", heads=["L0H1"]), dict(site="z", heads=["L0H1", f"L{last}H3"]),
               dict(site="k", heads=[f"L{last}KV0"], positions=[-1, 1]),
               dict(site="q", heads=["L0H2"], positions=[2]),
               dict(site="v", heads=["L0KV0"]),
               dict(site="attn_out", layers=[0, last], positions=[2]),
               dict(site="mlp_out", layers=[0]),
               dict(site="mlp_post", layers=[last], neurons=[3, 17], positions=[-1]),
               dict(site="mlp_post", layers=[0, last], neurons=[5]),
               dict(site="resid_pre", layers=[1], positions=[0, 3]),
               dict(site="resid_post", layers=[0]),
               dict(site="pattern", heads=[f"L{last}H2"])]
    for kw in patches:
        a, b = (e.patch(*args, **kw) for e in (fast, general))
        assert_close(a.patched, b.patched, atol=ATOL, rtol=0, msg=str(kw))
    run = c["into_run"]
    for kw in (dict(site="z", heads=["L0H0"], kind="zero"),
               dict(site="mlp_out", layers=[0], kind="mean"),
               dict(site="mlp_post", layers=[last], kind="zero", neurons=[1, 2]),
               dict(site="v", heads=[f"L{last}KV0"], kind="mean", positions=[-1])):
        a, b = (e.ablate(run, c["answer"], c["foil"], **kw) for e in (fast, general))
        assert_close(a.patched, b.patched, atol=ATOL, rtol=0, msg=str(kw))
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=run.tokens, final_pos=run.final_pos,
                        answer_ids=c["answer"], foil_ids=c["foil"])
    for by in ("component", "layer", "head"):
        a, b = (dla(c["a"], batch, by=by, engine=e) for e in (fast, general))
        assert (a.extras["path"], b.extras["path"]) == ("parallel-fast", "general")
        assert_close(a.extras["per_prompt"], b.extras["per_prompt"], atol=ATOL, rtol=0)
    a, b = (logit_lens(c["a"], batch, engine=e) for e in (fast, general))
    assert_close(a.extras["per_prompt"], b.extras["per_prompt"], atol=ATOL, rtol=0)


def test_resid_mid_is_refused_with_the_reason(bridges):
    c = _case(bridges, "pythia")
    with pytest.raises(MeasureError, match="parallel attention/MLP block has no resid_mid"):
        PatchingEngine().patch_sweep(c["from_run"], c["into_run"], c["answer"], c["foil"],
                                     site="resid_mid", over=("layer",))


def test_memory_budget_slices_give_identical_numbers(bridges):
    c = _case(bridges, "pythia")
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    big = PatchingEngine()
    per_prompt = big.forward(c["into_run"]).trace_nbytes(1, c["tokens"].shape[1])
    small = PatchingEngine(memory_budget_mb=1.5 * per_prompt / 0.2 / 2**20)  # 1 prompt a slice
    assert small.path_of(c["into_run"]) == "parallel-fast"
    for site, over in (("z", ("layer", "head", "pos")), ("mlp_out", ("layer", "pos")),
                       ("k", ("layer", "head"))):
        a = big.patch_sweep(*args, site=site, over=over)
        b = small.patch_sweep(*args, site=site, over=over)
        assert_close(a.raw, b.raw, atol=1e-6, rtol=0)
    assert small.cached_trace_bytes() == 0  # nothing fitted the cache: it really sliced


def test_trace_nbytes_is_what_the_engine_keeps(bridges):
    c = _case(bridges, "phi")
    engine = PatchingEngine()
    acts = engine.clean(c["into_run"])
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in acts.values()}
    assert sum(storages.values()) == engine.forward(c["into_run"]).trace_nbytes(
        *c["into_run"].shape)


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
    fast, general = _engines()
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
    return x * cos + rotary_ops.rotate_half(x) * sin


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_a_full_instead_of_partial_rotary_is_caught(bridges, monkeypatch, arch):
    """Rotating every dimension of q/k moves the sweeps off the general path's numbers, and on
    Pythia (rotary on a quarter of each head) the engine's one check against the bridge sees it
    and falls back to the general path."""
    c = _case(bridges, arch)
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    expected = PatchingEngine(path="general").patch_sweep(*args, site="q", over=("layer", "head"))
    monkeypatch.setattr(parallel_fast.ParallelOps, "rope", _full_rotary)
    broken = PatchingEngine(verify=False)
    got = broken.patch_sweep(*args, site="q", over=("layer", "head"))
    assert got.extras["path"] == "parallel-fast"
    assert (got.raw - expected.raw).abs().max() > 10 * ATOL  # the agreement tests see it
    if arch == "pythia":
        engine = PatchingEngine()
        with pytest.warns(UserWarning, match="does not reproduce"):
            engine.logit_diff(c["into_run"], c["answer"], c["foil"])
        assert engine.path_of(c["into_run"]) == "general"
