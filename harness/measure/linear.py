"""The fast paths' affine maps: x @ W + b as one matrix product over all leading axes, and on a
CPU the activation (or the gate) after an MLP's input projection fused into that product.

Why fuse: the activation is a second pass over the MLP's largest tensor, and on CPU PyTorch's
tanh GELU alone took two thirds of the input projection's time on GPT-2 small's shapes (an ad
hoc timing: 16 ms against 23 ms for a 1056-row batch; fused, 26 ms for both). oneDNN, through
`torch.ops.mkldnn._linear_pointwise` (what torch.compile emits on CPU), applies it to each tile
of the product while the tile is in cache. It needs the weight in the [d_out, d_in] layout and
has no autograd, so the fused product runs only on CPU float32 tensors outside autograd, after
a self-check against the plain product; everywhere else (CUDA, gradients, another dtype, a
build without oneDNN, an activation it does not have, or `HARNESS_FUSED_LINEAR=0`) the plain
product and the model's own activation run. `MLPInput` and `GatedMLPInput` make that choice
for the families' MLPs (a SiLU-gated MLP fuses only large batches, `SILU_FUSED_FROM`: below,
PyTorch's SiLU and product after a plain product are faster).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def affine(x: Float[Tensor, "... d_in"], weight: Float[Tensor, "d_in d_out"],
           bias: Float[Tensor, " d_out"] | None, add_to: Tensor | None = None
           ) -> Float[Tensor, "... d_out"]:
    """x @ weight + bias as one fused `addmm` over all leading axes (weight may be a
    transposed view, which `addmm` reads as it is); without a bias one `mm`, which skips
    addmm's pass that writes the bias into the output before the product adds to it.
    With `add_to` (x's leading shape, contiguous rows: a residual stream), the result is
    summed into it in place and returned: the product accumulates there (`addmm_`), one
    pass over the output fewer than adding it afterwards."""
    if add_to is not None:
        rows = add_to.view(-1, add_to.shape[-1])
        rows.addmm_(x.reshape(-1, x.shape[-1]), weight)
        if bias is not None:
            rows.add_(bias)
        return add_to
    if bias is None:
        return _rows(x, lambda rows: torch.mm(rows, weight))
    return _rows(x, lambda rows: torch.addmm(bias, rows, weight))


def nonzero(biases: Float[Tensor, "layer d_out"]) -> Float[Tensor, "layer d_out"] | None:
    """A stack of per-layer biases, or None when every one is zero (Llama and most rotary
    models have none; the weight readers store zeros): the products then run without one."""
    return biases if bool(biases.any()) else None


def at_layer(biases: Tensor | None, layer: int) -> Tensor | None:
    return None if biases is None else biases[layer]


class PostOp(NamedTuple):
    """A oneDNN post-op (its name and algorithm) and the torch function it computes."""

    name: str
    algorithm: str
    fn: Callable[[Tensor], Tensor]


POST_OPS = (
    PostOp("gelu", "tanh", functools.partial(F.gelu, approximate="tanh")),
    PostOp("gelu", "none", F.gelu),
    PostOp("swish", "", F.silu),
    PostOp("relu", "", F.relu),
)


def post_op_of(activation: Callable[[Tensor], Tensor]) -> PostOp | None:
    """The post-op that computes `activation` (a function or an HF activation module), found
    by its values on a probe rather than its name (HF spells one function many ways); None
    when none does. The probe reaches far out, where clipped variants (HF's gelu_10) part."""
    far = torch.tensor([1e4, 1e3, 1e2, 30.0, 12.0])
    probe = torch.cat([torch.linspace(-8.0, 8.0, 321), far, -far])
    with torch.no_grad():
        out = activation(probe)
    return next((op for op in POST_OPS
                 if torch.allclose(out, op.fn(probe), rtol=1e-6, atol=1e-6)), None)


def fusable(x: Tensor) -> bool:
    """Whether the fused product may run on x: CPU float32, no autograd, oneDNN checked."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and _fused_product_works())


def affine_post(x: Float[Tensor, "... d_in"], weight: Float[Tensor, "d_out d_in"],
                bias: Float[Tensor, " d_out"] | None, post: PostOp
                ) -> Float[Tensor, "... d_out"]:
    """post(x @ weight.T + bias) as one oneDNN product; call only where `fusable(x)`.
    `weight` must be contiguous in the [d_out, d_in] layout (a view is reordered per call)."""
    return _rows(x, lambda rows: torch.ops.mkldnn._linear_pointwise(
        rows, weight, bias, post.name, [], post.algorithm))


def affine_gated(x: Float[Tensor, "... d_in"], gate: Float[Tensor, "d_mlp d_in"],
                 gate_bias: Tensor | None, up: Float[Tensor, "d_mlp d_in"],
                 up_bias: Tensor | None, post: PostOp) -> Float[Tensor, "... d_mlp"]:
    """post(x @ gate.T + gate_bias) * (x @ up.T + up_bias), a gated MLP's neurons, as two
    oneDNN products (the second multiplies as it writes); call only where `fusable(x)`."""
    def neurons(rows: Tensor) -> Tensor:
        act = torch.ops.mkldnn._linear_pointwise(rows, gate, gate_bias, post.name, [],
                                                 post.algorithm)
        return torch.ops.mkldnn._linear_pointwise.binary(rows, act, up, up_bias, "mul")
    return _rows(x, neurons)


class MLPInput:
    """layer, x -> activation(x @ weights[layer] + biases[layer]): an MLP's neurons from
    per-layer [d_in, d_out] weights (GPT-2's, Pythia's), fused where `fusable(x)`. The fused
    product needs each layer's weight as [d_out, d_in]: copied on first use, so that a model's
    setup does not pay for it (about 0.08 s for GPT-2 small's MLPs, an ad hoc timing)."""

    def __init__(self, weights, biases, activation: Callable[[Tensor], Tensor]):
        self.weights, self.biases, self.activation = weights, nonzero(biases), activation
        self.post_op = post_op_of(activation)
        self._out_in: dict[int, Tensor] = {}

    def __call__(self, layer: int, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_mlp"]:
        bias = at_layer(self.biases, layer)
        if self.post_op is None or not fusable(x):
            return self.activation(affine(x, self.weights[layer], bias))
        if layer not in self._out_in:
            self._out_in[layer] = self.weights[layer].t().contiguous()
        return affine_post(x, self._out_in[layer], bias, self.post_op)


SILU_FUSED_FROM = 4_000_000
"""Neurons (rows x d_mlp) from which a SiLU-gated MLP takes oneDNN's fused pair."""


class GatedMLPInput:
    """layer, x -> activation(gate) * up, a gated MLP's neurons, from per-layer [d_in,
    2 d_mlp] weights (gate, then up) that are transposed views of [2 d_mlp, d_in] tensors
    (Llama's, as stacked), fused where `fusable(x)` without copying. A SiLU is fused only
    from `SILU_FUSED_FROM` neurons: below, PyTorch's own SiLU and product after one plain
    product are faster (on the head sweep's Llama-shape rows, at most 1152, 4.7 ms against
    17.5 ms that oneDNN's pair took beyond two plain products; 5-7% faster up to 2000 rows
    of SmolLM2's 1536 neurons), above, their two passes over the neurons are not (3-14%
    slower at 4000-8000 rows; ad hoc timings). A GELU (Gemma's) is always fused: PyTorch's
    tanh GELU alone took 17.4 ms against 12.4 ms fused on GPT-2's rows."""

    def __init__(self, weights, biases, activation: Callable[[Tensor], Tensor]):
        self.weights, self.biases, self.activation = weights, nonzero(biases), activation
        self.post_op = post_op_of(activation)

    def fuses(self, x: Float[Tensor, "... d_in"]) -> bool:
        if self.post_op is None or not fusable(x):
            return False
        neurons = x.numel() // x.shape[-1] * self.weights.shape[-1] // 2
        return self.post_op.name == "gelu" or neurons >= SILU_FUSED_FROM

    def __call__(self, layer: int, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_mlp"]:
        bias = at_layer(self.biases, layer)
        if not self.fuses(x):
            gate, up = affine(x, self.weights[layer], bias).chunk(2, -1)
            act = self.activation(gate)
            return act * up if torch.is_grad_enabled() else act.mul_(up)
        weight = self.weights[layer].t().contiguous()  # no copy
        d = weight.shape[0] // 2
        gate_bias, up_bias = (None, None) if bias is None else (bias[:d], bias[d:])
        return affine_gated(x, weight[:d], gate_bias, weight[d:], up_bias, self.post_op)


def _rows(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    if x.dim() == 2:
        return fn(x)
    return fn(x.flatten(0, -2)).unflatten(0, x.shape[:-1])


def _fused_product_works() -> bool:
    """Fusion is not switched off (`HARNESS_FUSED_LINEAR=0`) and oneDNN passed its check."""
    return os.environ.get("HARNESS_FUSED_LINEAR", "1") != "0" and onednn_checked()


@functools.cache
def onednn_checked() -> bool:
    """oneDNN's fused product exists in this build and equals the plain one on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, up, b = (torch.randn(*shape, generator=gen) for shape in ((5, 16), (8, 16), (8, 16),
                                                                    (8,)))
    try:
        with torch.no_grad():
            plain = F.linear(x, w, b)
            ok = all(torch.allclose(affine_post(x, w, b, op), op.fn(plain), atol=1e-5)
                     for op in POST_OPS)
            gated = affine_gated(x, w, b, up, None, POST_OPS[2])
            return ok and torch.allclose(gated, F.silu(plain) * F.linear(x, up), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
