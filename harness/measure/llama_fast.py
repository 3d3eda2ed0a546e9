"""The Llama family's fast path (Llama with or without GQA, Mistral, Qwen2, Gemma, Gemma 2,
Phi-3): the staggered forward (`staggered.py`) on weights read off the bridge's Hugging Face
modules.

Why its own ops: these models use RMSNorm, rotary position embeddings applied to q and k inside
attention (the `q`/`k` sites are before rotation, as the bridge's hooks are), a gated MLP
(act(x W_gate) * (x W_in)) and grouped-query attention (k, v have fewer heads; query head h
reads key/value head h // (n_heads / n_kv_heads)). The norms' weights are folded into the
next projection; cos/sin come from the model's own rotary module, so rope scaling variants are
the model's. Phi-3 runs here too (the bridge splits its fused qkv and gate_up projections; its
dropout modules are no-ops in eval). Gemma 2 runs on `Gemma2Ops`: a norm after attention and
after the MLP as well as before them (their scales cannot be folded: each divides by its own
input's RMS), tanh soft-capped attention scores, a sliding window on alternate layers, and
the final soft-cap in the readout. Anything else (q/k norms, other extra norms, attention
sinks, partial, interleaved or length-dependent rotary, parallel blocks) is refused by
`applies` and runs on the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from harness.errors import MeasureError
from harness.measure.linear import GatedMLPInput
from harness.measure.readout import Readout
from harness.measure.rotary_ops import RotaryAttentionOps, RotaryForward
from harness.sites import SITES

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
# Gemma 2: post_attention_layernorm normalizes attention's output; the MLP has its own pair
FOUR_NORM_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                   "pre_feedforward_layernorm", "post_feedforward_layernorm"}


def applies(bridge) -> bool:
    return not unsupported_features(bridge)


def unsupported_features(bridge) -> list[str]:
    """What keeps this model off the Llama fast path (empty: it can run here)."""
    cfg = bridge.cfg
    problems = []
    if getattr(cfg, "positional_embedding_type", None) != "rotary":
        return ["no rotary position embedding"]
    if not str(getattr(cfg, "normalization_type", "") or "").startswith("RMS"):
        problems.append(f"normalization {cfg.normalization_type!r}")
    if not getattr(cfg, "gated_mlp", False):
        problems.append("no gated MLP")
    for flag in ("parallel_attn_mlp", "attn_only", "use_qk_norm", "rotary_adjacent_pairs",
                 "rotary_interleaved_cos_sin", "gated_q_proj"):
        if getattr(cfg, flag, False):
            problems.append(flag)
    blocks = getattr(bridge, "blocks", None)
    if blocks is None or getattr(bridge, "rotary_emb", None) is None:
        return problems + ["no blocks / rotary module to read"]
    for i, block in enumerate(blocks):
        layer = getattr(block, "original_component", None)
        parts = {name for name, part in layer.named_children()  # dropouts: no-ops in eval
                 if not isinstance(part, torch.nn.Dropout)} if layer is not None else set()
        if parts not in (LAYER_PARTS, FOUR_NORM_PARTS):
            problems.append(f"block {i} is not attention + MLP with two or four norms "
                            f"({sorted(parts)})")
            break
        gemma2 = parts == FOUR_NORM_PARTS   # soft-capping and sliding windows: Gemma2Ops
        if gemma2 and any(getattr(block, n, None) is None for n in ("ln1_post", "ln2_post")):
            problems.append(f"block {i}'s norms after attention and MLP are not in the bridge")
        attn = getattr(block.attn, "original_component", None)
        extras = ("sinks", "key_multiplier") + \
            (() if gemma2 else ("attn_logit_softcapping", "sliding_window"))
        for name in extras:
            if getattr(attn, name, None) is not None:
                problems.append(f"attention {name}")
        if getattr(cfg, "rotary_dim", None) not in (None, getattr(attn, "head_dim", None)):
            problems.append("partial rotary embedding")
        if problems:
            break
    return problems or _rotary_problems(bridge)


def _rotary_problems(bridge) -> list[str]:
    """Rotary embeddings this path cannot take from the model's module once: partial ones
    (cos narrower than a head, e.g. Phi-4-mini) and ones that change with the sequence length
    (dynamic, longrope)."""
    rotary = getattr(bridge.rotary_emb, "original_component", bridge.rotary_emb)
    if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
        return [f"{rotary.rope_type} rotary scaling"]
    d_head = int(bridge.blocks[0].attn.original_component.head_dim)
    weight = next(bridge.parameters())
    with torch.inference_mode(False), torch.no_grad():
        cos, _ = rotary(weight.new_zeros(1, 1, d_head), torch.zeros(1, 1, dtype=torch.long,
                                                                    device=weight.device))
    return [] if cos.shape[-1] == d_head else ["partial rotary embedding"]


@dataclass(frozen=True)
class LlamaWeights:
    """Per-layer weights, norms folded in, detached, on the model's device."""

    W_E: Float[Tensor, "vocab d_model"]
    embed_scale: float
    W_QKV: Float[Tensor, "layer d_model qkv"]          # q, k, v side by side
    b_QKV: Float[Tensor, "layer qkv"]
    W_O: Float[Tensor, "layer hd d_model"]
    b_O: Float[Tensor, "layer d_model"]
    W_gate_in: Float[Tensor, "layer d_model two_mlp"]  # gate, then in
    b_gate_in: Float[Tensor, "layer two_mlp"]
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    eps: tuple[tuple[float, float], ...]               # (attention norm, MLP norm) per layer
    n_heads: int
    n_kv_heads: int
    d_head: int
    scaling: float
    # Gemma 2 (None / all None elsewhere): the scales of the norms after attention and after
    # the MLP, [layer, 2, d_model], with their epsilons; the attention scores' soft-cap; each
    # layer's sliding window (None: full causal attention)
    post_norms: Float[Tensor, "layer 2 d_model"] | None = None
    post_eps: tuple[tuple[float, float], ...] | None = None
    attn_softcap: float | None = None
    windows: tuple[int | None, ...] = ()

    @classmethod
    def from_bridge(cls, bridge) -> LlamaWeights:
        problems = unsupported_features(bridge)
        if problems:
            raise MeasureError("the Llama fast path cannot run this model: " + "; ".join(problems))
        with torch.inference_mode(False), torch.no_grad():
            stack, eps = _stacked_weights(bridge.blocks)
            attn = bridge.blocks[0].attn.original_component
            W_E = bridge.W_E.detach()
            model_type = getattr(getattr(bridge, "original_model", None), "config", None)
            model_type = getattr(model_type, "model_type", "")
            scale = float(W_E.shape[1]) ** 0.5 if model_type in ("gemma", "gemma2") else 1.0
            n_heads = int(bridge.cfg.n_heads)
            d_head = int(attn.head_dim)
            n_kv = stack["W_QKV"].shape[-1] // d_head - n_heads
            n_kv //= 2
            attns = [block.attn.original_component for block in bridge.blocks]
            cap = getattr(attn, "attn_logit_softcapping", None)
            post = _post_norms(bridge.blocks)
            return cls(W_E=W_E, embed_scale=scale, n_heads=n_heads, n_kv_heads=n_kv,
                       d_head=d_head, scaling=float(attn.scaling),
                       eps=eps,
                       post_norms=None if post is None else post[0],
                       post_eps=None if post is None else post[1],
                       attn_softcap=None if cap is None else float(cap),
                       windows=tuple(getattr(a, "sliding_window", None) for a in attns),
                       **stack)


def _linear(module) -> tuple[Tensor, Tensor]:
    """[d_out, d_in] weight (as stored) and bias (zeros when the projection has none) of a
    LinearBridge."""
    inner = getattr(module, "original_component", module)
    w = inner.weight.detach()
    b = inner.bias.detach() if getattr(inner, "bias", None) is not None else \
        w.new_zeros(w.shape[0])
    return w, b


def _norm(bridge_norm) -> tuple[Tensor, float]:
    """An RMSNorm's effective scale (Gemma stores it as an offset from 1) and epsilon."""
    inner = bridge_norm.original_component
    w = inner.weight.detach()
    if getattr(bridge_norm, "uses_weight_offset", False):
        w = 1.0 + w
    eps = getattr(inner, "variance_epsilon", None) or getattr(inner, "eps", None)
    return w, float(eps)


def _layer_parts(block) -> tuple[dict[str, list[Tensor]], dict[str, Tensor], tuple]:
    """One block's weights as its modules' own [d_out, d_in] tensors (no copies): the pieces
    of each stacked matrix in order, the norm scale to fold into each, the norms' epsilons."""
    attn, mlp = block.attn, block.mlp
    (w1, e1), (w2, e2) = _norm(block.ln1), _norm(block.ln2)
    q, k, v = (_linear(getattr(attn, n)) for n in ("q", "k", "v"))
    (W_gate, b_gate), (W_in, b_in) = _linear(mlp.gate), _linear(getattr(mlp, "in"))
    (W_O, b_O), (W_out, b_out) = _linear(attn.o), _linear(mlp.out)
    matrices = {"W_QKV": [q[0], k[0], v[0]], "W_O": [W_O], "W_gate_in": [W_gate, W_in],
                "W_out": [W_out]}
    scales = {"W_QKV": w1, "W_gate_in": w2}
    biases = {"b_QKV": [q[1], k[1], v[1]], "b_O": [b_O], "b_gate_in": [b_gate, b_in],
              "b_out": [b_out]}
    return {**matrices, **biases}, scales, (e1, e2)


def _stacked_weights(blocks) -> tuple[dict[str, Tensor], tuple[tuple[float, float], ...]]:
    """Every layer's weights stacked [layer, ...], each written once, in the modules' own
    [d_out, d_in] layout (a plain copy; a transposing one costs several times more), with a
    norm's scale folded in (a no-op when unit); matrices are handed out as [layer, d_in, d_out]
    transposed views, which `addmm` reads as they are. The setup's cost: one copy."""
    layers = [_layer_parts(block) for block in blocks]
    first = layers[0][0]
    stack = {name: parts[0].new_empty(len(layers), sum(p.shape[0] for p in parts),
                                      *parts[0].shape[1:])
             for name, parts in first.items()}
    for layer, (parts, scales, _) in enumerate(layers):
        for name, pieces in parts.items():
            torch.cat(pieces, 0, out=stack[name][layer])
            scale = scales.get(name)
            if scale is not None and not bool((scale == 1).all()):
                stack[name][layer].mul_(scale)
    stack = {name: t.transpose(1, 2) if t.dim() == 3 else t for name, t in stack.items()}
    return stack, tuple(eps for _, _, eps in layers)


def _post_norms(blocks) -> tuple[Tensor, tuple[tuple[float, float], ...]] | None:
    """Gemma 2's norms after attention and after the MLP: scales [layer, 2, d_model] and
    epsilons; None when the blocks have none."""
    if getattr(blocks[0], "ln1_post", None) is None:
        return None
    norms = [(_norm(block.ln1_post), _norm(block.ln2_post)) for block in blocks]
    scales = torch.stack([torch.stack([w1, w2]) for (w1, _), (w2, _) in norms])
    return scales, tuple((e1, e2) for (_, e1), (_, e2) in norms)


def rms_norm(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """RMSNorm without its weight (folded into the next projection), in float32 as HF does.
    The mean square is the square of each row's norm, one reduction that reads x once: on
    CPU `F.rms_norm` and `torch.linalg.vecdot` square x into a tensor of their own first
    (the head sweep's 24 norms on the Llama bench shape, ad hoc: 3.7 and 3.6 ms against
    2.9 ms). The square root and its square round: within 1e-6 of `F.rms_norm` (tests)."""
    xf = x.float()
    inv_rms = torch.linalg.vector_norm(xf, dim=-1).square().div_(x.shape[-1]).add_(eps) \
        .rsqrt_()
    return (xf * inv_rms.unsqueeze(-1)).to(x.dtype)


class LlamaOps(RotaryAttentionOps):
    """The Llama family's block computations as the staggered forward's BlockOps: RMSNorm
    before attention and MLP, the gated MLP; rotary attention and outputs are shared."""

    sites = SITES

    def __init__(self, weights: LlamaWeights, rotary, readout: Readout, act_fn):
        super().__init__(weights, rotary, readout, act_fn, weights.n_kv_heads)
        self.mlp_in = GatedMLPInput(weights.W_gate_in, weights.b_gate_in, act_fn)

    def attention_norm(self, layer: int, resid: Tensor) -> Tensor:
        return rms_norm(resid, self.w.eps[layer][0])

    def mlp_post(self, layer: int, resid_mid: Tensor) -> Tensor:
        return self.mlp_in(layer, rms_norm(resid_mid, self.w.eps[layer][1]))


class Gemma2Ops(LlamaOps):
    """Gemma 2's block computations: Llama's, plus a norm after attention and after the MLP,
    soft-capped attention scores (no fused attention kernel takes them) and a sliding window
    on some layers: a query at position t reads keys t - window < s <= t."""

    def attn_output(self, layer: int, z: Tensor, add_to: Tensor | None = None) -> Tensor:
        out = self._post_norm(super().attn_output(layer, z), layer, 0)
        return out if add_to is None else add_to.add_(out)

    def head_output_weight(self, layer: int) -> None:
        return None   # the norm after attention: not linear in z

    def mlp_output(self, layer: int, post: Tensor, add_to: Tensor | None = None) -> Tensor:
        out = self._post_norm(super().mlp_output(layer, post), layer, 1)
        return out if add_to is None else add_to.add_(out)

    def _post_norm(self, x: Tensor, layer: int, which: int) -> Tensor:
        return self.post_attn_scale(layer, x, which).mul(x.float()).to(x.dtype)

    def post_attn_scale(self, layer: int, pre: Float[Tensor, "... d_model"], which: int = 0
                        ) -> Float[Tensor, "... d_model"]:
        """What the norm after attention (which=0; 1: after the MLP) multiplies its input by,
        in float32: its scale over the RMS of `pre`, the sum it normalizes. Edge patching
        passes each head's share through it (`edge_forward.py`)."""
        ms = pre.float().pow(2).mean(-1, keepdim=True)
        return torch.rsqrt(ms + self.w.post_eps[layer][which]) * \
            self.w.post_norms[layer, which].float()

    def attend(self, q, k, v, allowed=None, q_pos=None, layer=None) -> Tensor:
        return self.mix_values(self._pattern(q, k, allowed, q_pos, layer), v)

    def attention_pattern(self, q: Tensor, k: Tensor, layer: int | None = None) -> Tensor:
        return self._pattern(q, k, None, None, layer)

    def _pattern(self, q, k, allowed, q_pos, layer) -> Float[Tensor, "n head dest src"]:
        """Softmax of the soft-capped scores (float32, as HF's eager attention), masked
        causally, by `allowed` where given, and by the layer's sliding window."""
        q, k = self.rope(q, q_pos), self._expand(self.rope(k), 2)
        scores = torch.einsum("nqhe,nkhe->nhqk", q, k) * self.w.scaling
        cap = self.w.attn_softcap
        if cap is not None:
            scores = cap * torch.tanh(scores / cap)
        n_q, n_k = q.shape[1], k.shape[1]
        src = torch.arange(n_k, device=q.device)
        dest = src[:n_q, None] if q_pos is None else q_pos[:, None, None, None]
        mask = src <= dest
        window = self._window(layer, n_k)
        if window is not None:
            mask = mask & (src > dest - window)
        if allowed is not None:
            mask = mask & allowed
        return scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32
                                                                ).to(q.dtype)

    def _window(self, layer: int | None, n_pos: int) -> int | None:
        if layer is not None:
            return self.w.windows[layer]
        shortest = min((w for w in self.w.windows if w is not None), default=None)
        if shortest is not None and n_pos > shortest:
            raise MeasureError(f"{n_pos} positions exceed the sliding window ({shortest}) and "
                               "the caller did not say which layer attends")
        return None


class LlamaForward(RotaryForward):
    """The Llama family's fast path behind the engine's Forward interface."""

    path = "llama-fast"

    def make_ops(self, bridge, rotary, readout, act_fn) -> LlamaOps:
        w = LlamaWeights.from_bridge(bridge)   # soft-caps and windows only with post_norms
        return (LlamaOps if w.post_norms is None else Gemma2Ops)(w, rotary, readout, act_fn)
