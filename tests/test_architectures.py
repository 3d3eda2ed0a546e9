"""Every claim kind on every decoder family, on tiny seeded checkpoints built offline.

Ground truth: the general path agrees with TransformerLens's own `patching` functions (one
hooked forward per cell) and with the GPT-2 fast path; patches that restore a whole run give
normalized effect 1 by construction; DLA pieces sum to the model's logit difference; on a
grouped-query model a query-head patch moves only that head's z and a KV-head patch moves
exactly the query heads that share it.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from _tiny_models import TEST_DEVICE, assert_close, clean_and_corrupt

from harness.measure.attribution import dla, logit_lens
from harness.measure.patching import PatchingEngine, Run
from harness.measure.selection import selection_masks
from harness.prompts import PromptBatch
from harness.testing import TINY_ARCHITECTURES, build_tiny_checkpoint

tl_patching = pytest.importorskip("transformer_lens.patching")

ARCHS = list(TINY_ARCHITECTURES)
PROMPTS = ["This movie was really", "The acting was"]  # different lengths: right padding
ANSWER, FOIL = [10, 20], [30, 40]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    built: dict[str, object] = {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in built:
            built[arch, seed] = build_tiny_checkpoint(arch, root / f"{arch}-{seed}", seed=seed)
        return built[arch, seed]
    return get


@pytest.fixture(scope="module")
def bridges(checkpoints):
    from transformer_lens.model_bridge import TransformerBridge

    loaded: dict[str, object] = {}

    def get(arch: str):
        if arch not in loaded:
            bridge = TransformerBridge.boot_transformers(str(checkpoints(arch)),
                                                         device=TEST_DEVICE)
            bridge.enable_compatibility_mode()
            loaded[arch] = bridge
        return loaded[arch]
    return get


def _setup(bridge):
    """Clean and corrupt tokens of equal length (column 1 changed), final positions, ids."""
    return clean_and_corrupt(bridge, PROMPTS, ANSWER, FOIL)


def _tl_reference(bridge, fn, tokens, corrupt, final_pos, answer, foil):
    rows = torch.arange(len(tokens))

    def metric(logits):
        final = logits[rows, final_pos]
        return (final[rows, answer] - final[rows, foil]).mean()

    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        return fn(bridge, corrupt, cache, metric).float().cpu()


TL_SWEEPS = [  # (TransformerLens function, site, over)
    ("get_act_patch_resid_pre", "resid_pre", ("layer", "pos")),
    ("get_act_patch_attn_out", "attn_out", ("layer", "pos")),
    ("get_act_patch_mlp_out", "mlp_out", ("layer", "pos")),
    ("get_act_patch_attn_head_out_all_pos", "z", ("layer", "head")),
    ("get_act_patch_attn_head_q_all_pos", "q", ("layer", "head")),
    ("get_act_patch_attn_head_v_all_pos", "v", ("layer", "head")),
    ("get_act_patch_attn_head_pattern_all_pos", "pattern", ("layer", "head")),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_general_path_matches_transformer_lens(bridges, arch):
    """Clean -> corrupt sweeps of the general path equal TL's patching functions, cell by cell
    (TL's k/v head patching crashes on grouped-query models, issue 980: v only where it runs)."""
    bridge = bridges(arch)
    tokens, corrupt, final_pos, answer, foil = _setup(bridge)
    engine = PatchingEngine(path="general")
    gqa = (bridge.cfg.n_key_value_heads or bridge.cfg.n_heads) != bridge.cfg.n_heads
    clean_run, corrupt_run = Run("c", bridge, tokens, final_pos), Run("c", bridge, corrupt,
                                                                       final_pos)
    for fn_name, site, over in TL_SWEEPS:
        if site == "v" and gqa:
            continue
        expected = _tl_reference(bridge, getattr(tl_patching, fn_name), tokens, corrupt,
                                 final_pos, answer, foil)
        grid = engine.patch_sweep(clean_run, corrupt_run, answer, foil, site=site, over=over)
        assert grid.extras["path"] == "general"
        assert_close(grid.raw, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("site,over", [("resid_pre", ("layer", "pos")), ("z", ("layer", "head")),
                                       ("pattern", ("layer", "head", "pos")),
                                       ("mlp_post", ("layer",)), ("k", ("layer", "head"))])
def test_general_and_fast_paths_agree_on_gpt2(bridges, site, over):
    bridge = bridges("gpt2")
    tokens, corrupt, final_pos, answer, foil = _setup(bridge)
    runs = Run("c", bridge, tokens, final_pos), Run("c", bridge, corrupt, final_pos)
    fast, general = PatchingEngine(), PatchingEngine(path="general")
    a = fast.patch_sweep(*runs, answer, foil, site=site, over=over)
    b = general.patch_sweep(*runs, answer, foil, site=site, over=over)
    assert (a.extras["path"], b.extras["path"]) == ("gpt2-fast", "general")
    assert_close(a.raw, b.raw, atol=1e-5, rtol=0)
    approx = [e.patch_sweep(*runs, answer, foil, site=site, over=over, method="attribution")
              for e in (fast, general)]
    assert_close(approx[0].raw, approx[1].raw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_restoring_a_whole_run_recovers_it(bridges, arch):
    """Patching all of resid_pre (any layer) or the last resid_post is the clean run: effect 1.
    Zero-ablating nothing changes nothing; mean ablation with a mean taken elsewhere runs."""
    bridge = bridges(arch)
    tokens, corrupt, final_pos, answer, foil = _setup(bridge)
    engine = PatchingEngine()
    clean_run, corrupt_run = Run("m", bridge, tokens, final_pos), Run("m", bridge, corrupt,
                                                                       final_pos)
    grid = engine.patch_sweep(clean_run, corrupt_run, answer, foil, site="resid_pre",
                              over=("layer",))
    assert_close(grid.values, torch.ones_like(grid.values), atol=1e-4, rtol=0)
    last = bridge.cfg.n_layers - 1
    effect = engine.patch(clean_run, corrupt_run, answer, foil, site="resid_post",
                          layers=[last])
    assert abs(effect.normalized - 1) < 1e-4
    nothing = engine.ablate(clean_run, answer, foil, site="z", heads=[(0, 0)], positions=[])
    assert_close(nothing.patched, engine.logit_diff(clean_run, answer, foil), atol=1e-5, rtol=0)
    mean = engine.site_mean(corrupt_run, "attn_out")
    engine.ablate(clean_run, answer, foil, site="attn_out", layers=[0], kind="mean", mean=mean)


@pytest.mark.parametrize("arch", ARCHS)
def test_dla_sums_to_the_logit_diff_and_lens_ends_there(bridges, arch):
    bridge = bridges(arch)
    tokens, _, final_pos, answer, foil = _setup(bridge)
    with torch.no_grad():
        logits = bridge(tokens)
    rows = torch.arange(len(tokens))
    final = logits[rows, final_pos]
    expected = (final[rows, answer] - final[rows, foil]).float().cpu()
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=tokens, final_pos=final_pos,
                        answer_ids=answer, foil_ids=foil)
    by_component = dla(bridge, batch)
    assert_close(by_component.extras["per_prompt"].sum(0), expected, atol=1e-4, rtol=1e-4)
    assert_close(dla(bridge, batch, by="layer").extras["per_prompt"].sum(0), expected,
                 atol=1e-4, rtol=1e-4)
    lens = logit_lens(bridge, batch)
    assert_close(lens.extras["per_prompt"][-1], expected, atol=1e-4, rtol=1e-4)
    heads = dla(bridge, batch, by="head")
    assert_close(heads.extras["per_prompt"].sum(0), expected, atol=1e-4, rtol=1e-4)
    if arch == "gemma2":  # post-attention norms: heads pass through them, scale frozen
        assert "soft-capped" in by_component.extras["approximation"]
        assert "post-norm scale frozen" in heads.extras["approximation"]
    else:
        assert "post-norm" not in heads.extras.get("approximation", "")


def test_gqa_query_and_kv_heads(bridges):
    """llama-gqa: 4 query heads share 2 KV heads (heads 0,1 -> KV 0; 2,3 -> KV 1)."""
    bridge = bridges("llama-gqa")
    tokens, corrupt, final_pos, _, _ = _setup(bridge)
    engine = PatchingEngine()
    dims = engine.forward(Run("g", bridge, tokens, final_pos)).dims
    assert (dims.n_heads, dims.n_kv_heads) == (4, 2)
    _, source = bridge.run_with_cache(corrupt)
    _, clean = bridge.run_with_cache(tokens)

    def z_after_patch(site: str, head: str):
        (layer, mask), = selection_masks(site, dims, final_pos, tokens.shape[1],
                                         heads=[head]).items()
        name = f"blocks.{layer}.attn.hook_{site}"
        hooks = [(name, lambda act, hook: torch.where(mask, source[name], act))]
        with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
            _, cache = bridge.run_with_cache(tokens)
        return cache[f"blocks.{layer}.attn.hook_z"]

    def moved(z):
        diff = (z - clean["blocks.1.attn.hook_z"]).abs().amax((0, 1, 3))
        return [h for h in range(4) if diff[h] > 1e-6]

    assert moved(z_after_patch("q", "L1H2")) == [2]
    assert moved(z_after_patch("k", "L1KV1")) == [2, 3]
    assert moved(z_after_patch("v", "L1KV0")) == [0, 1]
    with pytest.raises(Exception, match="L1KV2"):
        selection_masks("k", dims, final_pos, tokens.shape[1], heads=["L1H2"])
    with pytest.raises(Exception, match="out of range"):
        selection_masks("v", dims, final_pos, tokens.shape[1], heads=["L1KV2"])
    grid = engine.patch_sweep(Run("g", bridge, tokens, final_pos),
                              Run("g", bridge, corrupt, final_pos), torch.tensor(ANSWER),
                              torch.tensor(FOIL), site="k", over=("layer", "head"))
    assert grid.values.shape == (2, 2)


# ---- every claim kind through a spec, per architecture --------------------------------------
def _matrix_spec(directory, model_dir, twin_dir, n_layers: int) -> str:
    last = n_layers - 1
    return textwrap.dedent(f"""\
        spec: arch
        models:
          a: {{path: "{model_dir}"}}
          b: {{path: "{twin_dir}"}}
        prompts:
          - text: "This movie was really"
            corrupt: "This film was really"
            answer: " bad"
            foil: " good"
        claims:
          - {{id: logit_diff, measure: logit_diff, model: a, expect: {{">": -1000}}}}
          - {{id: top_k, measure: top_k, model: a, k: 3, expect: {{excludes: [" zzz"]}}}}
          - {{id: generate, measure: generate, model: a, max_new_tokens: 3,
              expect: {{contains: "This movie"}}}}
          - {{id: generate_patched, measure: generate, model: a, max_new_tokens: 3,
              patch: {{from: b, site: attn_out, layers: [{last}]}},
              expect: {{contains: "This movie"}}}}
          - {{id: dla, measure: dla, model: a, by: component, expect: {{sum: {{">": -1000}}}}}}
          - {{id: dla_pair, measure: dla, models: [a, b], by: layer,
              expect: {{max: {{">": -1000}}}}}}
          - {{id: logit_lens, measure: logit_lens, models: [a, b], expect: {{max: {{">": -1000}}}}}}
          - {{id: restore_resid, measure: patch_sweep, from: {{model: a, input: clean}},
              into: {{model: a, input: corrupt}}, site: resid_pre, over: [layer],
              expect: {{min: {{">": 0.999}}, max: {{"<": 1.001}}}}}}
          - {{id: restore_last, measure: patch, from: {{model: a, input: clean}},
              into: {{model: a, input: corrupt}}, site: resid_post, layers: [{last}],
              expect: {{between: [0.999, 1.001]}}}}
          - {{id: head_sweep, measure: patch_sweep, from: b, into: a, site: z,
              over: [layer, head], expect: {{max: {{">": -1.0e+9}}}}}}
          - {{id: kv_sweep, measure: patch_sweep, from: b, into: a, site: k,
              over: [layer, head], expect: {{max: {{">": -1.0e+9}}}}}}
          - {{id: pos_sweep_attribution, measure: patch_sweep, from: b, into: a,
              site: attn_out, over: [layer, pos], method: attribution,
              expect: {{max: {{">": -1.0e+9}}}}}}
          - {{id: two_heads, measure: patch, from: b, into: a, site: z, heads: [L0H1, L{last}H0],
              metric: logit_diff, expect: {{between: [-1.0e+9, 1.0e+9]}}}}
          - {{id: ablate_zero, measure: ablate, model: a, site: z, heads: [L0H0], kind: zero,
              expect: {{between: [-1.0e+9, 1.0e+9]}}}}
          - {{id: ablate_mean, measure: ablate, model: a, site: mlp_out, layers: [0], kind: mean,
              expect: {{between: [-1.0e+9, 1.0e+9]}}}}
        """)


def claim_matrix(arch: str, root) -> dict[str, tuple[str, str]]:
    """claim id -> (status, path) for one architecture (also used by scripts/arch_matrix.py)."""
    from harness.runner import run_spec_file
    from harness.session import Session

    a = build_tiny_checkpoint(arch, root / "a", seed=0)
    b = build_tiny_checkpoint(arch, root / "b", seed=1)
    n_layers = TINY_ARCHITECTURES[arch][1].get("num_hidden_layers",
                                               TINY_ARCHITECTURES[arch][1].get("n_layer"))
    spec = root / "arch.yaml"
    spec.write_text(_matrix_spec(root, a, b, n_layers))
    result = run_spec_file(spec, Session(verbose=False, device=TEST_DEVICE))
    if result.error:
        raise result.error
    return {v.claim_id: (v.status, v.extras.get("path", ""), v.message)
            for v in result.verdicts}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_claim_kind_passes(tmp_path, arch):
    matrix = claim_matrix(arch, tmp_path)
    failed = {cid: msg for cid, (status, _, msg) in matrix.items() if status != "passed"}
    assert not failed, failed
    # OPT is GPT-2-shaped (learned positions, pre-LayerNorm, plain MLP): the fast path takes it
    fast = {"gpt2": "gpt2-fast", "opt": "gpt2-fast", "llama": "llama-fast",
            "llama-gqa": "llama-fast", "mistral": "llama-fast", "qwen2": "llama-fast",
            "gemma": "llama-fast", "gemma2": "llama-fast", "phi3": "llama-fast",
            "pythia": "parallel-fast", "phi": "parallel-fast"}
    expected_path = fast.get(arch, "general")
    for cid in ("restore_resid", "head_sweep", "two_heads", "ablate_zero", "dla"):
        assert matrix[cid][1] == expected_path, (cid, matrix[cid])


def test_gemma2_heads_pass_through_the_post_attention_norm(bridges, checkpoints, tmp_path):
    """Gemma 2 normalizes each block's attention output (post-attention RMSNorm, weight 1 + w).
    With that norm's scale frozen at the run's value, the heads sum to the block's attention
    output exactly: per layer, the heads' DLA equals the component DLA of `attn{L}` (the model
    has no attention bias), and a claim naming the wrong top head fails."""
    from harness.measure.attribution import _components, _slices
    from harness.measure.readout import post_attention_norms
    from harness.runner import run_spec_file
    from harness.session import Session
    from harness.testing import write_spec

    bridge = bridges("gemma2")
    tokens, _, final_pos, answer, foil = _setup(bridge)
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=tokens, final_pos=final_pos,
                        answer_ids=answer, foil_ids=foil)
    forward, slices = _slices(bridge, batch)
    (_, run, acts), = slices
    labels, heads = _components(forward, acts, run.final_pos, "head",
                                post_attention_norms(bridge))
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    per_layer = heads[:-1].reshape(n_layers, n_heads, *heads.shape[1:]).sum(1)
    rows = torch.arange(len(tokens))
    attn_out = acts["attn_out"][:, rows, run.final_pos].float()
    assert_close(per_layer, attn_out, atol=1e-5, rtol=1e-4)
    assert attn_out.abs().max() > 1e-2  # not trivially zero

    by_head = dla(bridge, batch, by="head")
    by_component = dla(bridge, batch, by="component")
    attn_rows = [by_component.labels[0].index(f"attn{layer}") for layer in range(n_layers)]
    head_rows = by_head.extras["per_prompt"][:-1].reshape(n_layers, n_heads, -1).sum(1)
    assert_close(head_rows, by_component.extras["per_prompt"][attn_rows], atol=1e-5, rtol=1e-4)

    def run(claims: str):
        spec = write_spec(tmp_path, checkpoints("gemma2"), """\
            - {text: "This movie was really", answer: " bad", foil: " good"}
            - {text: "The acting was", answer: " good", foil: " bad"}
            """, claims)
        result = run_spec_file(spec, Session(verbose=False, device=TEST_DEVICE))
        assert result.error is None
        return {v.claim_id: v for v in result.verdicts}

    measured = run("- {id: heads, measure: dla, model: a, by: head, expect: {sum: {'>': -1e9}}}")
    grid = measured["heads"].measured
    assert "post-norm scale frozen" in measured["heads"].extras["approximation"]
    heads = grid["values"][:-1]  # the last entry is "rest"
    top = grid["labels"][0][heads.index(max(heads))]
    bottom = grid["labels"][0][heads.index(min(heads))]
    verdicts = run(f"""\
        - {{id: top_head, measure: dla, model: a, by: head, expect: {{argmax: {top}}}}}
        - {{id: wrong_head, measure: dla, model: a, by: head, expect: {{argmax: {bottom}}}}}
        """)
    assert verdicts["top_head"].status == "passed", verdicts["top_head"].message
    assert verdicts["wrong_head"].status == "failed", verdicts["wrong_head"].message
