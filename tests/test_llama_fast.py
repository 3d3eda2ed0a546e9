"""The Llama family's fast path (llama_fast.py): what only this family needs checked.

The agreement of every sweep, patch, ablation, DLA and lens with the general path is in
test_fast_paths.py. Here: resid_mid against a hook-level reference (the bridge's own
hook_resid_mid on Llama-style layers is only the MLP norm's input; both paths write the
residual stream), the models this path refuses, the fallback when it does not reproduce a model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _fast_paths import ATOL, PROMPTS, model_to_model, tiny_bridges
from _tiny_models import TEST_DEVICE, assert_close

from harness.errors import MeasureError
from harness.measure import llama_fast
from harness.measure.patching import PatchingEngine, Run
from harness.testing import build_tiny_checkpoint

pytest.importorskip("transformer_lens")

OTHER_ARCHS = ["gpt2", "pythia", "phi", "opt"]


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    return tiny_bridges(tmp_path_factory.mktemp("llama_fast"))


def _case(bridges, arch: str) -> dict:
    return model_to_model(bridges, arch)


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


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_families_are_refused(bridges, arch):
    """Parallel blocks and LayerNorm (Pythia, Phi), learned positions (GPT-2, OPT): not this
    fast path's to run."""
    assert llama_fast.unsupported_features(bridges(arch))


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


def _strongly_capped_gemma2(tmp_path, monkeypatch, seed: int):
    """The tiny Gemma 2 with scores that reach its attention soft-cap (query_pre_attn_scalar 1,
    cap 0.2; the stock tiny one's scores stay far below its cap of 50) and logits its final
    cap (1.0)."""
    from transformer_lens.model_bridge import TransformerBridge

    from harness.testing import TINY_ARCHITECTURES

    model_type, sizes = TINY_ARCHITECTURES["gemma2"]
    monkeypatch.setitem(TINY_ARCHITECTURES, "gemma2-capped", (model_type, dict(
        sizes, query_pre_attn_scalar=1, attn_logit_softcapping=0.2,
        final_logit_softcapping=1.0)))
    directory = build_tiny_checkpoint("gemma2-capped", tmp_path / f"capped-{seed}", seed=seed)
    bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
    bridge.enable_compatibility_mode()
    return bridge


def test_gemma2_soft_caps_and_sliding_window(tmp_path, monkeypatch):
    """Gemma 2 where its soft-caps bite and past its sliding window (layer 0 attends to the
    last 16 positions only): on 24-token prompts the fast path's residual stream is the
    bridge's (its own check), and sweeps patching q, k, the pattern, z and the stream agree
    with the general path. Without the window, or without the attention cap, the check fails:
    the prompts reach past the window and the scores reach the cap."""
    a, b = (_strongly_capped_gemma2(tmp_path, monkeypatch, seed) for seed in (0, 1))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 300, (2, 24), generator=gen).to(TEST_DEVICE)
    corrupt = tokens.clone()
    corrupt[:, 2] = 7
    final_pos = torch.tensor([23, 20], device=TEST_DEVICE)
    from_run, into_run = Run("b", b, tokens, final_pos), Run("a", a, corrupt, final_pos)
    answer, foil = (torch.tensor(ids, device=TEST_DEVICE) for ids in ([10, 20], [30, 40]))
    fast, general = PatchingEngine(), PatchingEngine(path="general")
    for site, over in (("z", ("layer", "head")), ("k", ("layer", "pos")),
                       ("q", ("layer", "head", "pos")), ("pattern", ("layer", "head")),
                       ("resid_pre", ("layer", "pos"))):
        ours = fast.patch_sweep(from_run, into_run, answer, foil, site=site, over=over)
        theirs = general.patch_sweep(from_run, into_run, answer, foil, site=site, over=over)
        assert ours.extras["path"] == "llama-fast"
        assert_close(ours.raw, theirs.raw, atol=ATOL, rtol=0, msg=f"{site} {over}")
    forward = llama_fast.LlamaForward(a)
    ops, w = forward.ops, forward.ops.w
    assert (w.windows, w.attn_softcap) == ((16, None), 0.2)
    acts = forward.trace(corrupt)
    forward.verify(corrupt, acts)
    # one query per row (the last block's final rows) in a sliding layer: the window applies
    q, k, v = ops.split_qkv(ops.qkv_flat(0, acts["resid_pre"][0]))
    rows, pos = torch.arange(2), torch.arange(24, device=TEST_DEVICE)
    allowed = (pos[None] <= final_pos[:, None])[:, None, None, :]
    one = ops.attend(q[rows, final_pos][:, None], k, v, allowed, q_pos=final_pos, layer=0)
    assert_close(one[:, 0], ops.attend(q, k, v, layer=0)[rows, final_pos], atol=1e-6, rtol=0)
    assert not torch.allclose(one[:, 0], ops.attend(q, k, v, layer=1)[rows, final_pos])
    for change in (dict(windows=(None, None)), dict(attn_softcap=None)):
        monkeypatch.setattr(forward.ops, "w", dataclasses.replace(w, **change))
        with pytest.raises(MeasureError, match="residual stream differs"):
            forward.verify(corrupt, forward.trace(corrupt))


def test_qkv_biases_are_kept_and_zero_ones_skipped(tmp_path):
    """Qwen2 has q/k/v biases (HF starts them at zero, so the shared checkpoints hide them):
    with random ones the fast path keeps them and every head sweep equals the general path's;
    the bias Qwen2 lacks (the MLP's output) is dropped, so that product skips it."""
    from transformer_lens.model_bridge import TransformerBridge

    runs = []
    for seed in (0, 1):
        directory = build_tiny_checkpoint("qwen2", tmp_path / f"qwen2-{seed}", seed=seed,
                                          random_biases=True)
        bridge = TransformerBridge.boot_transformers(str(directory), device=TEST_DEVICE)
        bridge.enable_compatibility_mode()
        tokens = bridge.to_tokens(PROMPTS, prepend_bos=True).to(TEST_DEVICE)
        final_pos = torch.tensor([len(bridge.to_tokens(p, prepend_bos=True)[0]) - 1
                                  for p in PROMPTS], device=TEST_DEVICE)
        if seed == 0:
            tokens[:, 2] = 7
        runs.append(Run(f"qwen2-{seed}", bridge, tokens, final_pos))
    into, source = runs
    answer, foil = (torch.tensor(ids, device=TEST_DEVICE) for ids in ([10, 20], [30, 40]))
    fast, general = PatchingEngine(), PatchingEngine(path="general")
    assert fast.path_of(into) == "llama-fast"
    biases = fast.forward(into).ops.biases
    assert biases["b_QKV"] is not None   # q and k's (the bridge folds v's into b_O)
    assert biases["b_O"] is not None and biases["b_out"] is None
    for site in ("z", "q", "k", "v"):
        grids = [e.patch_sweep(source, into, answer, foil, site=site, over=("layer", "head"))
                 for e in (fast, general)]
        assert_close(grids[0].raw, grids[1].raw, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_torchs_without_the_weight(dtype):
    """The fast path's RMSNorm (the square of each row's norm for the mean square) gives
    PyTorch's own, computed in float32 as HF does, for rows of several widths."""
    gen = torch.Generator().manual_seed(5)
    for shape in ((3, 16), (2, 7, 576), (96, 768)):
        x = (3 * torch.randn(*shape, generator=gen)).to(dtype)
        want = torch.nn.functional.rms_norm(x.float(), shape[-1:], eps=1e-6).to(dtype)
        got = llama_fast.rms_norm(x, 1e-6)
        assert got.dtype == dtype
        assert_close(got.float(), want.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                     rtol=0)
