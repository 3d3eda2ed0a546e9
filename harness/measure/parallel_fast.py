"""The parallel-block family's fast path (GPT-NeoX/Pythia, Phi-1/Phi-2): the staggered forward
(`staggered.py`) with attention and MLP side by side in each block.

Why its own ops: these blocks compute resid_post = resid_pre + attn(LN1(resid_pre)) +
mlp(LN2(resid_pre)) (Phi shares one LayerNorm for both), so there is no resid_mid; positions
come from a partial rotary embedding (only the first `rotary_dim` dims of each q/k head rotate;
the `q`/`k` sites are before rotation, as the bridge's hooks are), with cos/sin from the model's
own rotary module. Weights are the bridge's processed per-head W_Q/W_K/W_V/W_O and MLP matrices
(so the split of NeoX's fused, per-head-interleaved qkv is the bridge's own); any LayerNorm
scale and bias the bridge left unfolded are folded in on reading. Anything else (GPT-J's
interleaved rotary, q/k norms, grouped-query attention, sequential NeoX, other parallel
families) is refused by `applies` and runs on the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from harness.errors import MeasureError
from harness.measure.linear import MLPInput
from harness.measure.readout import Readout
from harness.measure.rotary_ops import RotaryAttentionOps, RotaryForward
from harness.sites import SITE_TABLE

# the sites of a parallel block (it has no resid_mid), in the site table's order
PARALLEL_SITES = tuple(n for n, s in SITE_TABLE.items() if "sequential" not in s.needs)

# HF layer children of each supported model type: anything else is a block we do not know
LAYER_PARTS = {
    "gpt_neox": {"input_layernorm", "post_attention_layernorm", "post_attention_dropout",
                 "post_mlp_dropout", "attention", "mlp"},
    "phi": {"input_layernorm", "self_attn", "mlp", "resid_dropout"},
}


def applies(bridge) -> bool:
    return not unsupported_features(bridge)


def _model_type(bridge) -> str:
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    return str(getattr(config, "model_type", "") or "")


def unsupported_features(bridge) -> list[str]:
    """What keeps this model off the parallel-block fast path (empty: it can run here)."""
    cfg = bridge.cfg
    if not getattr(cfg, "parallel_attn_mlp", False):
        return ["not a parallel attention + MLP block"]
    model_type = _model_type(bridge)
    if model_type not in LAYER_PARTS:
        return [f"model type {model_type!r} (this path runs {', '.join(sorted(LAYER_PARTS))})"]
    problems = []
    if getattr(cfg, "positional_embedding_type", None) != "rotary":
        problems.append("no rotary position embedding")
    if str(getattr(cfg, "normalization_type", "") or "") != "LN":
        problems.append(f"normalization {cfg.normalization_type!r}")
    for flag in ("gated_mlp", "attn_only", "use_qk_norm", "rotary_adjacent_pairs",
                 "rotary_interleaved_cos_sin"):
        if getattr(cfg, flag, False):
            problems.append(flag)
    for cap in ("output_logits_soft_cap", "attn_scores_soft_cap"):
        if float(getattr(cfg, cap, -1.0) or -1.0) > 0:
            problems.append(cap)
    if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
        problems.append("grouped-query attention")
    blocks = getattr(bridge, "blocks", None)
    if blocks is None or getattr(bridge, "rotary_emb", None) is None:
        return problems + ["no blocks / rotary module to read"]
    for i, block in enumerate(blocks):
        layer = getattr(block, "original_component", None)
        parts = set(dict(layer.named_children())) if layer is not None else set()
        if parts != LAYER_PARTS[model_type]:
            problems.append(f"block {i} has parts {sorted(parts)}")
            break
        attn = getattr(block.attn, "original_component", None)
        if getattr(attn, "qk_layernorm", False):
            problems.append("q/k LayerNorm")
            break
    return problems


@dataclass(frozen=True)
class ParallelWeights:
    """Per-layer weights, LayerNorm affine maps folded in, detached, on the model's device."""

    W_E: Float[Tensor, "vocab d_model"]
    W_QKV: Float[Tensor, "layer d_model qkv"]   # q, k, v of all heads side by side
    b_QKV: Float[Tensor, "layer qkv"]
    W_O: Float[Tensor, "layer hd d_model"]
    b_O: Float[Tensor, "layer d_model"]
    W_in: Float[Tensor, "layer d_model d_mlp"]
    b_in: Float[Tensor, "layer d_mlp"]
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    eps: tuple[tuple[float, float], ...]        # (attention norm, MLP norm) per layer
    n_heads: int
    d_head: int
    scaling: float

    @classmethod
    def from_bridge(cls, bridge) -> ParallelWeights:
        problems = unsupported_features(bridge)
        if problems:
            raise MeasureError("the parallel-block fast path cannot run this model: "
                               + "; ".join(problems))
        with torch.inference_mode(False), torch.no_grad():
            n_layers, n_heads = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)

            def heads_in(w: Tensor) -> Tensor:  # [L, H, d, dh] -> [L, d, H*dh]
                return w.detach().permute(0, 2, 1, 3).reshape(n_layers, w.shape[2], -1)

            W_QKV = torch.cat([heads_in(w) for w in (bridge.W_Q, bridge.W_K, bridge.W_V)], -1)
            b_QKV = torch.cat([b.detach().reshape(n_layers, -1)
                               for b in (bridge.b_Q, bridge.b_K, bridge.b_V)], -1)
            W_in, b_in = bridge.W_in.detach(), bridge.b_in.detach()
            norms = [(_norm(block.ln1), _norm(getattr(block, "ln2", block.ln1)))
                     for block in bridge.blocks]
            W_QKV, b_QKV = _fold_norms(W_QKV, b_QKV, [n[0] for n in norms])
            W_in, b_in = _fold_norms(W_in, b_in, [n[1] for n in norms])
            d_model = W_QKV.shape[1]
            attn = bridge.blocks[0].attn.original_component
            d_head = W_QKV.shape[-1] // (3 * n_heads)
            scaling = float(getattr(attn, "scaling", d_head ** -0.5))
            return cls(W_E=bridge.W_E.detach(), W_QKV=W_QKV.contiguous(), b_QKV=b_QKV,
                       W_O=bridge.W_O.detach().reshape(n_layers, -1, d_model).contiguous(),
                       b_O=bridge.b_O.detach(), W_in=W_in.contiguous(), b_in=b_in,
                       W_out=bridge.W_out.detach().contiguous(), b_out=bridge.b_out.detach(),
                       eps=tuple((n[0][2], n[1][2]) for n in norms), n_heads=n_heads,
                       d_head=d_head, scaling=scaling)


def _norm(bridge_norm) -> tuple[Tensor | None, Tensor | None, float]:
    """A LayerNorm's weight and bias (None where absent) and epsilon."""
    inner = bridge_norm.original_component
    w, b = getattr(inner, "weight", None), getattr(inner, "bias", None)
    return (None if w is None else w.detach(), None if b is None else b.detach(),
            float(inner.eps))


def _fold_norms(W: Float[Tensor, "layer d_model d_out"], b: Float[Tensor, "layer d_out"],
                norms) -> tuple[Tensor, Tensor]:
    """Fold each layer's LayerNorm affine map into the projection after it (exactly a no-op
    when the bridge already folded it: weight 1, bias 0)."""
    Ws, bs = [], []
    for layer, (w, bias, _) in enumerate(norms):
        W_l, b_l = W[layer], b[layer]
        if bias is not None and bool((bias != 0).any()):
            b_l = b_l + bias @ W_l
        if w is not None and not bool((w == 1).all()):
            W_l = w[:, None] * W_l
        Ws.append(W_l)
        bs.append(b_l)
    return torch.stack(Ws), torch.stack(bs)


class ParallelOps(RotaryAttentionOps):
    """The parallel-block family's computations as the staggered forward's BlockOps: a
    LayerNorm before attention and one before the MLP (Phi: the same one), both reading the
    block's input; partial rotary attention and outputs are shared."""

    sites = PARALLEL_SITES
    parallel_block = True

    def __init__(self, weights: ParallelWeights, rotary, readout: Readout, act_fn):
        super().__init__(weights, rotary, readout, act_fn, weights.n_heads)
        self.mlp_in = MLPInput(weights.W_in, weights.b_in, act_fn)

    def attention_norm(self, layer: int, resid: Tensor) -> Tensor:
        return F.layer_norm(resid, resid.shape[-1:], eps=self.w.eps[layer][0])

    def mlp_post(self, layer: int, resid_pre: Tensor) -> Tensor:
        """The MLP's neurons; on a parallel block the MLP reads the block's input."""
        normed = F.layer_norm(resid_pre, resid_pre.shape[-1:], eps=self.w.eps[layer][1])
        return self.mlp_in(layer, normed)


class ParallelForward(RotaryForward):
    """The parallel-block family's fast path behind the engine's Forward interface."""

    path = "parallel-fast"

    def make_ops(self, bridge, rotary, readout, act_fn) -> ParallelOps:
        return ParallelOps(ParallelWeights.from_bridge(bridge), rotary, readout, act_fn)
