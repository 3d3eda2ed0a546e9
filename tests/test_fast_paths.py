"""Every registered rotary fast path measures what the general path measures.

Ground truth: the general path runs through the bridge's own hooks (itself checked against
TransformerLens's patching functions in test_architectures.py). On tiny seeded checkpoints of
each family — Llama, Llama-GQA, Mistral, Qwen2, Gemma, Gemma 2 (four norms, soft-capped
attention and logits, a sliding window) and Phi-3 (fused qkv and gate_up, split by the bridge)
on `llama-fast`; Pythia (rotary_pct 0.25, fused per-head-interleaved qkv) and Phi
(one shared LayerNorm, partial_rotary_factor 0.5) on `parallel-fast` — the fast path is chosen,
and every sweep, patch, ablation, DLA and logit lens agrees with the general path to 1e-5, also
when the memory budget slices prompts. Family-specific checks: test_llama_fast.py,
test_parallel_fast.py.
"""

from __future__ import annotations

import pytest
import torch
from _fast_paths import (
    ATOL,
    HEAD_SITES,
    OVERS,
    PROMPTS,
    engines,
    model_to_model,
    tiny_bridges,
)
from _tiny_models import TEST_DEVICE, assert_close

from harness.measure.attribution import dla, logit_lens
from harness.measure.patching import PatchingEngine
from harness.prompts import PromptBatch

pytest.importorskip("transformer_lens")

FAST = {"llama": "llama-fast", "llama-gqa": "llama-fast", "mistral": "llama-fast",
        "qwen2": "llama-fast", "gemma": "llama-fast", "gemma2": "llama-fast",
        "phi3": "llama-fast",
        "pythia": "parallel-fast", "phi": "parallel-fast"}
QUICK = ("llama-gqa", "gemma2", "pythia", "phi")   # one of each kind in the quick suite; all: full
SWEEP_PARAMS = [pytest.param(a, marks=() if a in QUICK else pytest.mark.slow) for a in FAST]


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    return tiny_bridges(tmp_path_factory.mktemp("fast_paths"))


@pytest.mark.parametrize("arch", SWEEP_PARAMS)
def test_every_sweep_agrees_with_the_general_path(bridges, arch):
    c = model_to_model(bridges, arch)
    fast, general = engines()
    assert fast.path_of(c["into_run"]) == FAST[arch]
    assert general.path_of(c["into_run"]) == "general"
    sites = fast.forward(c["into_run"]).dims.sites
    assert sites == general.forward(c["into_run"]).dims.sites  # the bridge's hooks say so too
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    checked = 0
    for site in sites:
        for method in ("exact", "attribution"):
            for over in OVERS:
                if "head" in over and site not in HEAD_SITES:
                    continue
                a = fast.patch_sweep(*args, site=site, over=over, method=method)
                b = general.patch_sweep(*args, site=site, over=over, method=method)
                assert (a.extras["path"], b.extras["path"]) == (FAST[arch], "general")
                assert_close(a.raw, b.raw, atol=ATOL, rtol=0, msg=f"{site} {over} {method}")
                checked += 1
    # every site under both methods: 2 overs without heads, 4 with
    assert checked == 2 * sum(4 if s in HEAD_SITES else 2 for s in sites)
    # the patches move the metric (on these random models attention more than MLPs): the
    # agreement is not vacuous
    assert fast.patch_sweep(*args, site="z", over=("layer", "head")).raw.std() > 1e-3
    assert fast.patch_sweep(*args, site="mlp_out", over=("layer", "pos")).raw.std() > 1e-4


@pytest.mark.parametrize("arch", list(FAST))
def test_patches_ablations_dla_and_lens_agree(bridges, arch):
    c = model_to_model(bridges, arch)
    fast, general = engines()
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
        assert (a.extras["path"], b.extras["path"]) == (FAST[arch], "general")
        assert_close(a.extras["per_prompt"], b.extras["per_prompt"], atol=ATOL, rtol=0)
    a, b = (logit_lens(c["a"], batch, engine=e) for e in (fast, general))
    assert_close(a.extras["per_prompt"], b.extras["per_prompt"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama-gqa", "pythia"])
def test_memory_budget_slices_give_identical_numbers(bridges, arch):
    c = model_to_model(bridges, arch)
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    big = PatchingEngine()
    per_prompt = big.forward(c["into_run"]).trace_nbytes(1, c["tokens"].shape[1])
    small = PatchingEngine(memory_budget_mb=1.5 * per_prompt / 0.2 / 2**20)  # 1 prompt a slice
    assert small.path_of(c["into_run"]) == FAST[arch]
    for site, over in (("z", ("layer", "head", "pos")), ("resid_pre", ("layer", "pos")),
                       ("mlp_out", ("layer", "pos")), ("k", ("layer", "head"))):
        a = big.patch_sweep(*args, site=site, over=over)
        b = small.patch_sweep(*args, site=site, over=over)
        assert_close(a.raw, b.raw, atol=1e-6, rtol=0)
    assert small.cached_trace_bytes() == 0  # nothing fitted the cache: it really sliced


@pytest.mark.parametrize("arch", ["llama-gqa", "phi"])
def test_trace_nbytes_is_what_the_engine_keeps(bridges, arch):
    c = model_to_model(bridges, arch)
    engine = PatchingEngine()
    acts = engine.clean(c["into_run"])
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in acts.values()}
    assert sum(storages.values()) == engine.forward(c["into_run"]).trace_nbytes(
        *c["into_run"].shape)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_a_wrong_gpt2_fast_path_falls_back_to_the_general_path(bridges, arch, monkeypatch):
    """The engine's one check against the bridge (on the first prompts) catches a wrong MLP
    output in the GPT-2 fast path and measures the model on the general path instead."""
    from harness.measure import gpt2_forward

    c = model_to_model(bridges, arch)
    assert PatchingEngine().path_of(c["into_run"]) == "gpt2-fast"
    monkeypatch.setattr(gpt2_forward, "mlp_output",
                        lambda model, layer, post: 2 * post @ model.W_out[layer])
    engine = PatchingEngine()
    with pytest.warns(UserWarning, match="does not reproduce"):
        engine.logit_diff(c["into_run"], c["answer"], c["foil"])
    assert engine.path_of(c["into_run"]) == "general"


def test_the_gpt2_fast_path_reads_the_bridges_weights_without_copying(bridges):
    """Stacking GPT-2's per-layer weights cost more than a forward pass (issue 26): the MLP and
    attention-output weights are the bridge's own tensors; only the fused q/k/v is a copy."""
    c = model_to_model(bridges, "gpt2")
    model = PatchingEngine().forward(c["into_run"]).model
    blocks = c["a"].blocks
    for layer, block in enumerate(blocks):
        assert model.W_in[layer].data_ptr() == block.mlp.W_in.data_ptr()
        assert model.W_out[layer].data_ptr() == block.mlp.W_out.data_ptr()
        assert model.W_O[layer].data_ptr() == block.attn.W_O.data_ptr()
        q = block.attn.W_Q.transpose(0, 1).flatten(1)
        assert torch.equal(model.W_QKV[layer][:, : q.shape[1]], q)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "gemma2", "pythia"])
def test_a_one_head_z_patch_enters_through_its_heads_rows_of_w_o(bridges, arch, monkeypatch):
    """A head sweep's variants enter with the into run's residual plus their one head's
    change through W_O (`staggered._one_head_entry`); several heads in a layer, or Gemma 2's
    norm after attention, take the full output product. Both agree with the general path."""
    from harness.measure import staggered

    took: list[bool] = []
    real = staggered._one_head_entry

    def spy(*args):
        entry = real(*args)
        took.append(entry is not None)
        return entry

    monkeypatch.setattr(staggered, "_one_head_entry", spy)
    c = model_to_model(bridges, arch)
    fast, general = engines()
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    for over in (("layer", "head"), ("layer", "head", "pos")):
        a, b = (e.patch_sweep(*args, site="z", over=over) for e in (fast, general))
        assert_close(a.raw, b.raw, atol=ATOL, rtol=0, msg=str(over))
    assert took and all(took) == (arch != "gemma2") and any(took) == (arch != "gemma2")
    took.clear()
    a, b = (e.patch(*args, site="z", heads=["L1H0", "L1H2"]) for e in (fast, general))
    assert_close(a.patched, b.patched, atol=ATOL, rtol=0)
    assert took == [False]


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2", "pythia"])
def test_keys_and_values_alone_are_the_packed_projections_columns(tmp_path, arch):
    """The last block computes only keys and values for every row (`kv_flat`): the same
    numbers as the packed q/k/v's k and v, on checkpoints with random projection biases (HF
    starts them at zero, which would hide a bias sliced wrong)."""
    from transformer_lens.model_bridge import TransformerBridge

    from harness.measure.forward import fast_path_for
    from harness.testing import build_tiny_checkpoint

    directory = build_tiny_checkpoint(arch, tmp_path / arch, seed=0, random_biases=True)
    bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
    bridge.enable_compatibility_mode()
    ops = fast_path_for(bridge).build(bridge).ops
    x = torch.randn(2, 5, ops.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer in range(ops.n_layers):
            _, k, v = ops.split_qkv(ops.qkv_flat(layer, x.to(TEST_DEVICE)))
            k_alone, v_alone = ops.split_kv(ops.kv_flat(layer, x.to(TEST_DEVICE)))
            assert k_alone.shape == k.shape and v_alone.shape == v.shape
            assert_close(k_alone, k, atol=1e-6, rtol=0)
            assert_close(v_alone, v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2", "gemma2", "pythia"])
def test_an_output_summed_into_the_residual_is_that_sum(tmp_path, arch):
    """`attn_output` and `mlp_output` with `add_to` accumulate into the residual in place (the
    product's own accumulation; Gemma 2 adds its normed output): the residual plus the output,
    biases included (random ones: HF starts them at zero, which would hide a bias left out)."""
    from transformer_lens.model_bridge import TransformerBridge

    from harness.measure.forward import fast_path_for
    from harness.testing import build_tiny_checkpoint

    directory = build_tiny_checkpoint(arch, tmp_path / arch, seed=0, random_biases=True)
    bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
    bridge.enable_compatibility_mode()
    ops = fast_path_for(bridge).build(bridge).ops
    gen = torch.Generator().manual_seed(6)
    resid = torch.randn(2, 5, ops.d_model, generator=gen).to(TEST_DEVICE)
    with torch.no_grad():
        for layer in range(ops.n_layers):
            q, _, _ = ops.split_qkv(ops.qkv_flat(layer, resid))
            z = torch.randn(q.shape, generator=gen).to(TEST_DEVICE)
            post = ops.mlp_post(layer, resid)
            for output, arg in ((ops.attn_output, z), (ops.mlp_output, post)):
                into = resid.clone()
                summed = output(layer, arg, add_to=into)
                assert summed is into
                assert_close(summed, resid + output(layer, arg), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", [[0, 0, 1, 1, 2, 2], [2, 0, 1, 1, 0, 2], [1, 1, 1]])
def test_each_row_meets_its_own_heads_rows_of_w_o(head):
    """In runs head by head (a head sweep's layer: one batched product) or in any order (a
    gather), row i's change of z goes through head[i]'s d_head rows of W_O, summed into the
    residual given."""
    from harness.measure.staggered import _through_heads

    gen = torch.Generator().manual_seed(4)
    dz, w_o = torch.randn(len(head), 5, 4, generator=gen), torch.randn(3, 4, 7, generator=gen)
    base = torch.randn(len(head), 5, 7, generator=gen)
    out = _through_heads(dz, torch.tensor(head), w_o.transpose(1, 2).contiguous().transpose(1, 2),
                         base.clone())
    for i, h in enumerate(head):
        assert_close(out[i], base[i] + dz[i] @ w_o[h], atol=1e-6, rtol=0)
