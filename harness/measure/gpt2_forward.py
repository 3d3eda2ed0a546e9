"""A plain-torch forward pass of a GPT-2-style model on TransformerLens's processed weights.

Why: patching sweeps run hundreds of variants of one forward pass. Reading the folded weights
(`bridge.W_Q`, ...) once and running the blocks ourselves lets the engine batch variants, start
each at the layer it changes and skip rows and vocabulary columns the metric never reads. Shapes
and hook semantics follow TransformerLens (`hook_z` is [batch, pos, head, d_head], `hook_pattern`
[batch, head, dest, src], ...). The bridge must be in compatibility mode (LayerNorm folded);
`check_against_bridge` verifies the numbers once per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from harness.errors import MeasureError
from harness.measure.linear import affine
from harness.sites import SITES

Hook = Callable[[str, int, Tensor], Tensor]


def _gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh-approximated GELU, as one fused kernel."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class FoldedGPT2:
    """The processed (folded, centered) weights of one model, detached, on the model's device.

    W_O, W_in and W_out are per layer, the bridge's own weights where they are already laid out
    as the forward reads them (GPT-2's): stacking them cost more than a forward pass of GPT-2
    small. The fused q/k/v, which the bridge keeps as three matrices, is one copy.
    """

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_QKV: Float[Tensor, "layer d_model three_hd"]      # q, k, v of all heads side by side
    b_QKV: Float[Tensor, "layer three_hd"]
    W_O: tuple[Float[Tensor, "hd d_model"], ...]        # per layer
    b_O: Float[Tensor, "layer d_model"]
    W_in: tuple[Float[Tensor, "d_model d_mlp"], ...]    # per layer
    b_in: Float[Tensor, "layer d_mlp"]
    W_out: tuple[Float[Tensor, "d_mlp d_model"], ...]   # per layer
    b_out: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]
    n_heads: int
    eps: float
    act_fn: str

    @property
    def n_layers(self) -> int:
        return self.W_QKV.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_QKV.shape[-1] // (3 * self.n_heads)

    @property
    def d_model(self) -> int:
        return self.W_QKV.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.W_in[0].shape[-1]

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @classmethod
    def from_bridge(cls, bridge) -> FoldedGPT2:
        """Read the weights off a TransformerBridge; refuse architectures this code can't run."""
        cfg = bridge.cfg
        _check_supported(bridge)
        with torch.inference_mode(False), torch.no_grad():  # usable later under autograd
            attns = [block.attn for block in bridge.blocks]
            mlps = [block.mlp for block in bridge.blocks]
            W_E = bridge.W_E.detach()
            d_model = W_E.shape[1]
            # one copy, straight into place ([head, d_model, d_head] -> [d_model, head*d_head])
            W_QKV = W_E.new_empty(cfg.n_layers, d_model, 3 * cfg.n_heads * cfg.d_head)
            for layer, attn in enumerate(attns):
                for part, w in zip(W_QKV[layer].chunk(3, -1), (attn.W_Q, attn.W_K, attn.W_V)):
                    part.unflatten(-1, w.shape[::2]).copy_(w.detach().transpose(0, 1))
            b_QKV = torch.stack([torch.cat([b.detach().flatten() for b in
                                            (attn.b_Q, attn.b_K, attn.b_V)]) for attn in attns])
            return cls(W_E=W_E, W_pos=bridge.W_pos.detach(), W_QKV=W_QKV, b_QKV=b_QKV,
                       W_O=tuple(_dense(a.W_O.flatten(0, 1)) for a in attns),
                       b_O=bridge.b_O.detach(),
                       W_in=tuple(_dense(m.W_in) for m in mlps), b_in=bridge.b_in.detach(),
                       W_out=tuple(_dense(m.W_out) for m in mlps), b_out=bridge.b_out.detach(),
                       W_U=bridge.W_U.detach(), b_U=bridge.b_U.detach(), n_heads=cfg.n_heads,
                       eps=float(cfg.eps), act_fn=cfg.act_fn)

    def logit_diff_direction(self, answer_ids: Tensor, foil_ids: Tensor
                             ) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, " batch"]]:
        """W_U[:, answer] - W_U[:, foil] and the matching unembedding-bias difference."""
        a, f = answer_ids.to(self.device), foil_ids.to(self.device)
        return (self.W_U[:, a] - self.W_U[:, f]).T, self.b_U[a] - self.b_U[f]


def _dense(w: Tensor) -> Tensor:
    """The weight itself when contiguous (no copy), else a contiguous copy (faster matmuls)."""
    return w.detach().contiguous()


def _check_supported(bridge) -> None:
    problems = unsupported_features(bridge)
    if problems:
        raise MeasureError("the GPT-2 fast path runs GPT-2-style models only; this model has: "
                           + "; ".join(problems))


def unsupported_features(bridge) -> list[str]:
    """What keeps this model off the GPT-2 fast path (empty: it can run here)."""
    cfg = bridge.cfg
    problems = []
    if not getattr(bridge, "compatibility_mode", False):
        problems.append("call bridge.enable_compatibility_mode() first (folded LayerNorm)")
    if getattr(cfg, "positional_embedding_type", "standard") != "standard":
        problems.append(f"positional embedding {cfg.positional_embedding_type!r}")
    if getattr(cfg, "normalization_type", "LN") not in ("LN", "LNPre"):
        problems.append(f"normalization {cfg.normalization_type!r}")
    if cfg.act_fn not in ACTIVATIONS:
        problems.append(f"activation {cfg.act_fn!r}")
    if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
        problems.append("grouped-query attention")
    for flag in ("parallel_attn_mlp", "attn_only", "scale_attn_by_inverse_layer_idx",
                 "gated_mlp"):
        if getattr(cfg, flag, False):
            problems.append(flag)
    if float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0:
        problems.append("logit soft-capping")
    return problems


def layer_norm(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """LayerNorm with its weights folded into the next layer: center, then scale to unit norm."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def causal_mask(n_pos: int, device) -> Tensor:
    return torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril()


def attention_pattern(q: Float[Tensor, "n dest head d_head"], k: Float[Tensor, "n src head d_head"],
                      allowed: Tensor) -> Float[Tensor, "n head dest src"]:
    scores = torch.einsum("nqhe,nkhe->nhqk", q, k) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def attend(q: Float[Tensor, "n dest head d_head"], k: Float[Tensor, "n src head d_head"],
           v: Float[Tensor, "n src head d_head"], allowed: Tensor | None = None
           ) -> Float[Tensor, "n dest head d_head"]:
    """Head outputs z without materializing the pattern (fused kernel); causal if no mask."""
    z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=allowed, is_causal=allowed is None)
    return z.transpose(1, 2)


def mix_values(pattern: Float[Tensor, "n head dest src"], v: Float[Tensor, "n src head d_head"]
               ) -> Float[Tensor, "n dest head d_head"]:
    return torch.einsum("nhqk,nkhe->nqhe", pattern, v)


def attn_output(model: FoldedGPT2, layer: int, z: Float[Tensor, "... head d_head"],
                add_to: Tensor | None = None) -> Float[Tensor, "... d_model"]:
    """z through W_O; with `add_to`, summed into it in place (`affine`)."""
    return affine(z.flatten(-2), model.W_O[layer], model.b_O[layer], add_to)


def qkv(model: FoldedGPT2, layer: int, resid: Float[Tensor, "... d_model"]
        ) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of every head, each [..., head, d_head], from one fused matmul."""
    h = affine(layer_norm(resid, model.eps), model.W_QKV[layer], model.b_QKV[layer])
    q, k, v = h.unflatten(-1, (3, model.n_heads, model.d_head)).unbind(-3)
    return q, k, v


def qkv_flat(model: FoldedGPT2, layer: int, resid: Float[Tensor, "rows d_model"],
             columns: slice = slice(None)) -> Float[Tensor, "rows three_hd"]:
    """q, k, v of every head side by side ([3, head, d_head] flattened), for packed rows;
    `columns`: only those of the packed q/k/v (the keys and values alone, say)."""
    return affine(layer_norm(resid, model.eps), model.W_QKV[layer][:, columns],
                  model.b_QKV[layer][columns])


def mlp_post(model: FoldedGPT2, layer: int, resid_mid: Float[Tensor, "... d_model"]
             ) -> Float[Tensor, "... d_mlp"]:
    pre = affine(layer_norm(resid_mid, model.eps), model.W_in[layer], model.b_in[layer])
    return ACTIVATIONS[model.act_fn](pre)


def mlp_output(model: FoldedGPT2, layer: int, post: Float[Tensor, "... d_mlp"],
               add_to: Tensor | None = None) -> Float[Tensor, "... d_model"]:
    return affine(post, model.W_out[layer], model.b_out[layer], add_to)


def embed(model: FoldedGPT2, tokens: Int[Tensor, "batch pos"]
          ) -> Float[Tensor, "batch pos d_model"]:
    return model.W_E[tokens] + model.W_pos[: tokens.shape[1]]


def _no_hook(site: str, layer: int, act: Tensor) -> Tensor:
    return act


def trace(model: FoldedGPT2, tokens: Int[Tensor, "batch pos"], hook: Hook = _no_hook
          ) -> dict[str, Tensor]:
    """Full forward pass keeping every site, stacked over layers: site -> [layer, batch, ...].

    `hook(site, layer, act)` may replace an activation (used for gradients); "final" is the
    residual stream after the last block.
    """
    tokens = tokens.to(model.device)
    allowed = causal_mask(tokens.shape[1], model.device)
    acts: dict[str, list[Tensor]] = {s: [] for s in SITES}

    def keep(site: str, layer: int, act: Tensor) -> Tensor:
        act = hook(site, layer, act)
        acts[site].append(act)
        return act

    resid = embed(model, tokens)
    for layer in range(model.n_layers):
        resid = keep("resid_pre", layer, resid)
        q, k, v = (keep(s, layer, a) for s, a in zip(("q", "k", "v"), qkv(model, layer, resid)))
        pattern = keep("pattern", layer, attention_pattern(q, k, allowed))
        z = keep("z", layer, mix_values(pattern, v))
        attn_out = keep("attn_out", layer, attn_output(model, layer, z))
        resid = keep("resid_mid", layer, resid + attn_out)
        post = keep("mlp_post", layer, mlp_post(model, layer, resid))
        resid = keep("resid_post", layer,
                     resid + keep("mlp_out", layer, mlp_output(model, layer, post)))
    out = {s: torch.stack(a) for s, a in acts.items()}
    out["final"] = resid
    return out


def trace_nbytes(model: FoldedGPT2, batch: int, n_pos: int) -> int:
    """Bytes of a clean trace as the patching engine keeps it (`trace` plus one fused qkv).

    Per layer and row: five residual-width sites, z and the fused q/k/v (q, k and v are views
    of it), the MLP's hidden activations and one attention row per head; plus the final residual.
    """
    d_model, d_mlp = model.d_model, model.d_mlp
    d_heads = model.n_heads * model.d_head
    per_row = 5 * d_model + 4 * d_heads + d_mlp + model.n_heads * n_pos
    rows = batch * n_pos
    return (model.n_layers * per_row + d_model) * rows * model.W_E.element_size()


def read_logit_diff(model: FoldedGPT2, resid: Float[Tensor, "n d_model"],
                    direction: Float[Tensor, "n d_model"], bias: Float[Tensor, " n"]
                    ) -> Float[Tensor, " n"]:
    """Logit difference from final-position residuals: final LayerNorm, then two unembed columns."""
    return (layer_norm(resid, model.eps) * direction).sum(-1) + bias


def final_rows(resid: Float[Tensor, "batch pos d_model"], final_pos: Int[Tensor, " batch"]
               ) -> Float[Tensor, "batch d_model"]:
    return resid[torch.arange(resid.shape[0], device=resid.device), final_pos.to(resid.device)]


def check_against_bridge(model: FoldedGPT2, bridge, tokens: Tensor, final: Tensor,
                         atol: float = 1e-3, theirs: Tensor | None = None) -> None:
    """One bridge forward (none when its last-position logits `theirs` are given): our
    final-position logits must match, or the engine refuses the model."""
    with torch.no_grad():
        if theirs is None:
            theirs = bridge(tokens.to(model.device), return_type="logits")[:, -1]
        ours = layer_norm(final[:, -1], model.eps) @ model.W_U + model.b_U
    err = (theirs.float() - ours.float()).abs().max().item()
    if not err <= atol * max(1.0, theirs.abs().max().item()):
        raise MeasureError(f"the engine's forward pass differs from the model's by {err:.3g}; "
                           "is the bridge in compatibility mode (enable_compatibility_mode())?")
