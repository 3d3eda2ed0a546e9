"""The Llama family's fast path (llama_fast.py) measures what the general path measures.

Ground truth: the general path runs through the bridge's own hooks (itself checked against
TransformerLens's patching functions in test_architectures.py). On tiny seeded Llama, Llama-GQA,
Mistral, Qwen2, Gemma and Phi-3 (fused qkv and gate_up, split by the bridge) checkpoints the
fast path is chosen, and every sweep, patch, ablation, DLA and logit lens agrees with the
general path to 1e-5, also when the memory budget slices prompts. resid_mid is also checked
against a hook-level reference (the bridge's own hook_resid_mid on Llama-style layers is only
the MLP norm's input; both paths write the residual stream).
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import TEST_DEVICE, assert_close

from harness.measure import llama_fast
from harness.measure.attribution import dla, logit_lens
from harness.measure.patching import PatchingEngine, Run
from harness.prompts import PromptBatch
from harness.sites import SITES
from harness.testing import build_tiny_checkpoint

pytest.importorskip("transformer_lens")

FAST_ARCHS = ["llama", "llama-gqa", "mistral", "qwen2", "gemma", "phi3"]
# llama-gqa (grouped-query attention) in the quick suite, every family in the full one
ARCH_PARAMS = [pytest.param(a, marks=() if a == "llama-gqa" else pytest.mark.slow)
               for a in FAST_ARCHS]
OTHER_ARCHS = ["gpt2", "gemma2", "pythia", "phi", "opt"]
PROMPTS = ["This movie was really", "The acting was"]  # different lengths: right padding
ANSWER, FOIL = [10, 20], [30, 40]
OVERS = [("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos")]
ATOL = 1e-5


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge

    root = tmp_path_factory.mktemp("llama_fast")
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


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_every_sweep_agrees_with_the_general_path(bridges, arch):
    c = _case(bridges, arch)
    fast, general = _engines()
    assert fast.path_of(c["into_run"]) == "llama-fast"
    assert general.path_of(c["into_run"]) == "general"
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    checked = 0
    for site in SITES:
        for method in ("exact", "attribution"):
            for over in OVERS:
                if "head" in over and site not in ("q", "k", "v", "z", "pattern"):
                    continue
                a = fast.patch_sweep(*args, site=site, over=over, method=method)
                b = general.patch_sweep(*args, site=site, over=over, method=method)
                assert (a.extras["path"], b.extras["path"]) == ("llama-fast", "general")
                assert_close(a.raw, b.raw, atol=ATOL, rtol=0, msg=f"{site} {over} {method}")
                checked += 1
    assert checked == 2 * (6 * 2 + 5 * 4)  # 6 non-head sites x 2 overs, 5 head sites x 4
    grid = fast.patch_sweep(*args, site="z", over=("layer", "head"))
    assert grid.raw.std() > 1e-3  # the patches move the metric: agreement is not vacuous


def _mid_reference(c, layer: int, positions: list[int] | None) -> torch.Tensor:
    """Patched logit diff when resid_mid (the residual stream between attention and MLP) of
    `layer` is replaced, through the bridge: the attention output is set to what makes the
    residual equal the source's (resid_mid = resid_pre + attn_out)."""
    a, b = c["a"], c["b"]
    into_tokens = c["into_run"].tokens
    with torch.no_grad():
        _, src = b.run_with_cache(c["tokens"])
        _, dst = a.run_with_cache(into_tokens)
    want = src[f"blocks.{layer}.hook_resid_mid"] - dst[f"blocks.{layer}.hook_resid_pre"]
    mask = torch.zeros(into_tokens.shape, dtype=torch.bool, device=into_tokens.device)
    mask[:, slice(None) if positions is None else positions] = True

    def hook(act, hook):
        return torch.where(mask[..., None], want, act)

    with torch.no_grad():
        logits = a.run_with_hooks(into_tokens, fwd_hooks=[(f"blocks.{layer}.hook_attn_out",
                                                           hook)])
    rows = torch.arange(len(into_tokens))
    final = logits[rows, c["final_pos"]]
    return (final[rows, c["answer"]] - final[rows, c["foil"]]).float().cpu()


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma"])
def test_resid_mid_patches_the_residual_stream(bridges, arch):
    c = _case(bridges, arch)
    fast = PatchingEngine()
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    by_layer = fast.patch_sweep(*args, site="resid_mid", over=("layer",))
    by_pos = fast.patch_sweep(*args, site="resid_mid", over=("layer", "pos"))
    for layer in range(c["a"].cfg.n_layers):
        # raw: the patched logit diff, averaged over prompts
        assert_close(by_layer.raw[layer], _mid_reference(c, layer, None).mean(), atol=1e-4,
                     rtol=0)
        assert_close(by_pos.raw[layer, 2], _mid_reference(c, layer, [2]).mean(), atol=1e-4,
                     rtol=0)
    # attribution: d metric / d resid_mid is d metric / d attn_out (resid_mid = pre + attn_out)
    run, general = c["into_run"], PatchingEngine(path="general")
    general.logit_diff(run, c["answer"], c["foil"])  # traced and verified (Gemma's 1 + w norm)
    grads = [e.forward(run).site_gradients(run.tokens, run.final_pos, site, c["answer"],
                                           c["foil"])
             for e, site in ((fast, "resid_mid"), (general, "attn_out"))]
    assert_close(grads[0], grads[1], atol=ATOL, rtol=0)


def test_general_path_restores_resid_mid(bridges):
    """Restoring all of resid_mid from the clean run must restore the clean logit diff. (The
    bridge's hook_resid_mid on HF Llama-style layers is only the MLP norm's input; the general
    path writes resid_mid through attn_out instead.)"""
    c = _case(bridges, "llama")
    clean = Run("a", c["a"], c["tokens"], c["final_pos"])
    general = PatchingEngine(path="general")
    grid = general.patch_sweep(clean, c["into_run"], c["answer"], c["foil"], site="resid_mid",
                               over=("layer",))
    assert_close(grid.values, torch.ones_like(grid.values), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_patches_ablations_dla_and_lens_agree(bridges, arch):
    c = _case(bridges, arch)
    fast, general = _engines()
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    last = c["a"].cfg.n_layers - 1
    patches = [dict(site="z", heads=["L0H1"]), dict(site="z", heads=["L0H1", f"L{last}H3"]),
               dict(site="k", heads=[f"L{last}KV0"], positions=[-1, 1]),
               dict(site="v", heads=["L0KV0"]),
               dict(site="attn_out", layers=[0, last], positions=[2]),
               dict(site="mlp_post", layers=[last], neurons=[3, 17], positions=[-1]),
               dict(site="resid_pre", layers=[1], positions=[0, 3]),
               dict(site="pattern", heads=[f"L{last}H2"])]
    for kw in patches:
        a, b = (e.patch(*args, **kw) for e in (fast, general))
        assert_close(a.patched, b.patched, atol=ATOL, rtol=0, msg=str(kw))
    run = c["into_run"]
    for kw in (dict(site="z", heads=["L0H0"], kind="zero"),
               dict(site="mlp_out", layers=[0], kind="mean"),
               dict(site="v", heads=[f"L{last}KV0"], kind="mean", positions=[-1])):
        a, b = (e.ablate(run, c["answer"], c["foil"], **kw) for e in (fast, general))
        assert_close(a.patched, b.patched, atol=ATOL, rtol=0, msg=str(kw))
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=run.tokens, final_pos=run.final_pos,
                        answer_ids=c["answer"], foil_ids=c["foil"])
    for by in ("component", "layer", "head"):
        a, b = (dla(c["a"], batch, by=by, engine=e) for e in (fast, general))
        assert (a.extras["path"], b.extras["path"]) == ("llama-fast", "general")
        assert_close(a.extras["per_prompt"], b.extras["per_prompt"], atol=ATOL, rtol=0)
    a, b = (logit_lens(c["a"], batch, engine=e) for e in (fast, general))
    assert_close(a.extras["per_prompt"], b.extras["per_prompt"], atol=ATOL, rtol=0)


def test_memory_budget_slices_give_identical_numbers(bridges):
    c = _case(bridges, "llama-gqa")
    args = (c["from_run"], c["into_run"], c["answer"], c["foil"])
    big = PatchingEngine()
    per_prompt = big.forward(c["into_run"]).trace_nbytes(1, c["tokens"].shape[1])
    small = PatchingEngine(memory_budget_mb=1.5 * per_prompt / 0.2 / 2**20)  # 1 prompt a slice
    assert small.path_of(c["into_run"]) == "llama-fast"
    for site, over in (("z", ("layer", "head", "pos")), ("resid_pre", ("layer", "pos")),
                       ("k", ("layer", "head"))):
        a = big.patch_sweep(*args, site=site, over=over)
        b = small.patch_sweep(*args, site=site, over=over)
        assert_close(a.raw, b.raw, atol=1e-6, rtol=0)
    assert small.cached_trace_bytes() == 0  # nothing fitted the cache: it really sliced


def test_trace_nbytes_is_what_the_engine_keeps(bridges):
    c = _case(bridges, "llama-gqa")
    engine = PatchingEngine()
    acts = engine.clean(c["into_run"])
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in acts.values()}
    assert sum(storages.values()) == engine.forward(c["into_run"]).trace_nbytes(
        *c["into_run"].shape)


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_families_are_refused(bridges, arch):
    """Soft-capping and four norms (Gemma 2), parallel blocks and LayerNorm (Pythia, Phi),
    learned positions (GPT-2, OPT): not this fast path's to run."""
    problems = llama_fast.unsupported_features(bridges(arch))
    assert problems
    if arch == "gemma2":
        assert any("soft_cap" in p for p in problems)


def test_a_broken_fast_path_falls_back_to_the_general_path(bridges, monkeypatch):
    """The engine verifies the fast path once against the bridge; a wrong forward is refused."""
    c = _case(bridges, "llama")
    monkeypatch.setattr(llama_fast.LlamaOps, "mlp_output",
                        lambda self, layer, post: 2 * post @ self.w.W_out[layer])
    engine = PatchingEngine()
    with pytest.warns(UserWarning, match="does not reproduce"):
        engine.logit_diff(c["into_run"], c["answer"], c["foil"])
    assert engine.path_of(c["into_run"]) == "general"


def test_partial_rotary_is_refused(tmp_path, monkeypatch):
    """A Phi-3 whose rotary embedding covers half of each head (as Phi-4-mini's covers three
    quarters) is refused: this path rotates whole heads."""
    from transformer_lens.model_bridge import TransformerBridge

    from harness.testing import TINY_ARCHITECTURES

    model_type, sizes = TINY_ARCHITECTURES["phi3"]
    monkeypatch.setitem(TINY_ARCHITECTURES, "phi3-partial",
                        (model_type, dict(sizes, partial_rotary_factor=0.5)))
    directory = build_tiny_checkpoint("phi3-partial", tmp_path / "phi3-partial")
    bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
    bridge.enable_compatibility_mode()
    assert llama_fast.unsupported_features(bridge) == ["partial rotary embedding"]
    tokens = bridge.to_tokens(PROMPTS[:1], prepend_bos=True).to(TEST_DEVICE)
    run = Run("p", bridge, tokens, torch.tensor([tokens.shape[1] - 1], device=TEST_DEVICE))
    assert PatchingEngine().path_of(run) == "general"
