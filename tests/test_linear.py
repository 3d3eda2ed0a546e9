"""The fused affine maps (harness/measure/linear.py): the activation fused into the MLP's
product equals the plain product and the model's own activation, on every family's fast path,
and the plain product runs wherever the fused one cannot (gradients, other dtypes, off)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _fast_paths import tiny_bridges
from torch.profiler import ProfilerActivity, profile
from transformers.activations import ACT2FN

from harness.measure import linear
from harness.measure.forward import fast_path_for

pytestmark = pytest.mark.skipif(not linear.onednn_checked(),
                                reason="this torch build has no oneDNN fused product")


@pytest.fixture(autouse=True)
def fusion_on(monkeypatch):
    """These tests are about the fused product: on, whatever the caller's environment."""
    monkeypatch.delenv("HARNESS_FUSED_LINEAR", raising=False)


@pytest.mark.parametrize("name, expected", [
    ("gelu_new", ("gelu", "tanh")), ("gelu_pytorch_tanh", ("gelu", "tanh")),
    ("gelu", ("gelu", "none")), ("silu", ("swish", "")), ("relu", ("relu", "")),
    ("quick_gelu", None), ("sigmoid", None), ("gelu_10", None)])
def test_an_activation_is_known_by_its_values(name, expected):
    """HF spells one function many ways; a different function must not be fused as another."""
    op = linear.post_op_of(ACT2FN[name])
    assert (None if op is None else (op.name, op.algorithm)) == expected


@pytest.mark.parametrize("op", linear.POST_OPS, ids=lambda op: f"{op.name}-{op.algorithm}")
def test_fused_products_equal_the_plain_ones(op):
    gen = torch.Generator().manual_seed(1)
    x, w, up = (torch.randn(*s, generator=gen) for s in ((3, 7, 24), (40, 24), (40, 24)))
    b, b_up = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    with torch.no_grad():
        assert linear.fusable(x)
        plain = linear.affine(x, w.t(), b)
        torch.testing.assert_close(linear.affine_post(x, w, b, op), op.fn(plain),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear.affine_gated(x, w, b, up, b_up, op),
                                   op.fn(plain) * linear.affine(x, up.t(), b_up),
                                   atol=1e-5, rtol=1e-5)


def test_the_plain_product_runs_where_fusion_cannot(monkeypatch):
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert linear.fusable(x)
        assert not linear.fusable(x.double())
    assert not linear.fusable(x)              # autograd on: oneDNN's product has none
    monkeypatch.setenv("HARNESS_FUSED_LINEAR", "0")
    with torch.no_grad():
        assert not linear.fusable(x)


def test_an_mlp_input_copies_each_layer_once_and_only_when_fused():
    weights, biases = torch.randn(3, 8, 5), torch.randn(3, 5)   # [layer, d_in, d_out]
    mlp_in = linear.MLPInput(weights, biases, F.gelu)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        first = mlp_in(1, x)
        copy = mlp_in._out_in[1]
        assert copy.is_contiguous() and torch.equal(copy, weights[1].t())
        mlp_in(1, x)
        assert mlp_in._out_in[1] is copy and set(mlp_in._out_in) == {1}
    torch.testing.assert_close(first, F.gelu(x @ weights[1] + biases[1]), atol=1e-5, rtol=1e-5)
    mlp_in(2, x)                                                 # autograd on: plain, no copy
    assert set(mlp_in._out_in) == {1}


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    return tiny_bridges(tmp_path_factory.mktemp("linear"))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "llama-gqa", "mistral", "qwen2", "gemma",
                                  "gemma2", "phi3", "pythia", "phi"])
def test_every_fast_path_fuses_its_mlp_exactly(bridges, arch, monkeypatch):
    """Each family's MLP neurons, fused and plain, on the same residuals, and the fused
    product really ran where it should: every MLP but a SiLU-gated one (Llama's, Mistral's,
    Qwen2's, Phi-3's) on these few rows, whose SiLU and product PyTorch runs faster after a
    plain product (test_a_silu_gated_mlp_fuses_from_its_threshold)."""
    ops = fast_path_for(bridges(arch)).build(bridges(arch)).ops
    silu_gated = isinstance(ops.mlp_in, linear.GatedMLPInput) and \
        linear.post_op_of(ops.mlp_in.activation).name == "swish"
    assert silu_gated == (arch in ("llama", "llama-gqa", "mistral", "qwen2", "phi3"))
    assert ops.mlp_in.post_op is not None
    resid = torch.randn(3, 5, ops.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fused = [ops.mlp_post(layer, resid) for layer in range(ops.n_layers)]
    ran = [e.name for e in prof.events() if "_linear_pointwise" in e.name]
    if silu_gated:
        assert not ran, "a SiLU-gated MLP took oneDNN's fused products"
    else:
        assert len(ran) >= ops.n_layers, "the fused product did not run"
    with torch.no_grad():
        monkeypatch.setattr(linear, "_fused_product_works", lambda: False)
        plain = [ops.mlp_post(layer, resid) for layer in range(ops.n_layers)]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.equal(a, torch.zeros_like(a))


def test_gradients_flow_through_the_mlp(bridges):
    """Attribution patching differentiates the fast path's trace: the plain product runs."""
    ops = fast_path_for(bridges("gpt2")).build(bridges("gpt2")).ops
    resid = torch.randn(2, 3, ops.d_model, requires_grad=True)
    ops.mlp_post(0, resid).sum().backward()
    assert resid.grad is not None and bool(resid.grad.abs().sum() > 0)


def test_a_silu_gated_mlp_fuses_from_its_threshold(bridges, monkeypatch):
    """Below `SILU_FUSED_FROM` neurons a SiLU-gated MLP runs PyTorch's SiLU and product,
    from there oneDNN's fused pair; both give the same neurons."""
    ops = fast_path_for(bridges("llama")).build(bridges("llama")).ops
    resid = torch.randn(3, 5, ops.d_model, generator=torch.Generator().manual_seed(2))
    neurons = 3 * 5 * ops.d_mlp
    with torch.no_grad():
        assert neurons < linear.SILU_FUSED_FROM and not ops.mlp_in.fuses(resid)
        plain = ops.mlp_post(0, resid)
        monkeypatch.setattr(linear, "SILU_FUSED_FROM", neurons)
        assert ops.mlp_in.fuses(resid)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused = ops.mlp_post(0, resid)
    assert any("_linear_pointwise" in e.name for e in prof.events())
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
