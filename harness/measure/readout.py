"""The model's own final norm and unembedding, for reading logits of a few tokens from residuals.

Why: the logit difference needs two columns of the unembedding, not the whole vocabulary, and
DLA and the logit lens need the final norm as a known linear map once its scale is fixed. Every
architecture's final norm is one of: LayerNorm (centre, then scale), RMSNorm (scale only), or
none; followed by an elementwise affine map (folded into W_U by compatibility mode where the
bridge can) and, on Gemma 2, a tanh soft-cap of the logits. `Readout.from_bridge` reads these
and checks them against the bridge's own logits before anyone uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness.errors import MeasureError


@dataclass(frozen=True)
class Readout:
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]
    weight: Float[Tensor, " d_model"]   # the final norm's elementwise scale (1 when folded)
    bias: Float[Tensor, " d_model"]
    norm: str                           # "layer", "rms" or "none"
    eps: float
    softcap: float | None               # Gemma 2: logits = cap * tanh(raw / cap)

    @property
    def center(self) -> bool:
        return self.norm == "layer"

    def scale(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """The final norm's divisor for each residual (1 when the model has no final norm)."""
        if self.norm == "none":
            return resid.new_ones(*resid.shape[:-1], 1)
        x = resid - resid.mean(-1, keepdim=True) if self.center else resid
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def centered(self, pieces: Tensor) -> Tensor:
        """Pieces of a residual as the norm sees them (the mean removed under LayerNorm)."""
        return pieces - pieces.mean(-1, keepdim=True) if self.center else pieces

    def directions(self, ids: Int[Tensor, "n k"]) -> Float[Tensor, "n k d_model"]:
        """Residual directions (norm weight included) whose dot product gives raw logits;
        float32 whatever the model's dtype."""
        ids = ids.to(self.W_U.device)
        return self.W_U.T[ids].float() * self.weight.float()

    def offsets(self, ids: Int[Tensor, "n k"]) -> Float[Tensor, "n k"]:
        """The raw logits' constant part: norm bias through W_U, plus the unembedding bias."""
        ids = ids.to(self.W_U.device)
        return self.W_U.T[ids].float() @ self.bias.float() + self.b_U[ids].float()

    def raw_logits(self, resid: Float[Tensor, "n d_model"], ids: Int[Tensor, "n k"]
                   ) -> Float[Tensor, "n k"]:
        """Raw (not soft-capped) logits of `ids`, in float32."""
        resid = resid.float()
        normed = self.centered(resid) / self.scale(resid)
        return torch.einsum("nd,nkd->nk", normed, self.directions(ids)) + self.offsets(ids)

    def cap(self, raw: Tensor) -> Tensor:
        return raw if self.softcap is None else self.softcap * torch.tanh(raw / self.softcap)

    def logits(self, resid: Float[Tensor, "n d_model"], ids: Int[Tensor, "n k"]
               ) -> Float[Tensor, "n k"]:
        return self.cap(self.raw_logits(resid, ids))

    def all_logits(self, resid: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
        """Every token's logit (the whole unembedding): for checks, not for sweeps."""
        resid = resid.float()
        normed = self.centered(resid) / self.scale(resid)
        return self.cap((normed * self.weight.float() + self.bias.float()) @ self.W_U.float()
                        + self.b_U.float())

    def logit_diff(self, resid: Float[Tensor, "n d_model"], answer_ids: Int[Tensor, " n"],
                   foil_ids: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        both = self.logits(resid, torch.stack([answer_ids, foil_ids], -1).to(resid.device))
        return both[:, 0] - both[:, 1]

    @classmethod
    def from_bridge(cls, bridge) -> Readout:
        """Read the final norm and unembedding off a bridge (compatibility mode or not)."""
        cfg = bridge.cfg
        with torch.inference_mode(False), torch.no_grad():
            W_U = bridge.W_U.detach()
            d_model = W_U.shape[0]
            try:
                b_U = bridge.b_U.detach()
            except AttributeError:
                b_U = W_U.new_zeros(W_U.shape[1])
            norm_type = str(getattr(cfg, "normalization_type", None) or "none")
            norm = "layer" if norm_type.startswith("LN") else \
                "rms" if norm_type.startswith("RMS") else "none"
            weight, bias = _norm_affine(bridge, d_model, W_U)
            cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
            return cls(W_U=W_U, b_U=b_U, weight=weight, bias=bias, norm=norm,
                       eps=float(getattr(cfg, "eps", 1e-5)), softcap=cap if cap > 0 else None)

    def check(self, final_resid: Float[Tensor, "n d_model"], logits: Float[Tensor, "n vocab"],
              rtol: float | None = None) -> Readout:
        """Our logits of the final residuals must match the model's, else refuse the model.

        Tries the Gemma convention (scale = 1 + weight) when the plain one does not match. The
        tolerance is relative to the largest logit: 1e-3 in float32, 3e-2 in half precision
        (the model rounds where we compute in float32).
        """
        if rtol is None:
            rtol = 1e-3 if self.W_U.dtype == torch.float32 else 3e-2
        bound = rtol * max(1.0, logits.abs().max().item())
        errors = []
        for candidate in (self, _with_weight(self, self.weight + 1)):
            ours = candidate.all_logits(final_resid.to(self.W_U.device, self.W_U.dtype))
            errors.append((ours - logits.to(ours.device).float()).abs().max().item())
            if errors[-1] <= bound:
                return candidate
        raise MeasureError(f"cannot reproduce this model's logits from its final norm and "
                           f"unembedding (max error {min(errors):.3g}); its final layer is not "
                           "one this harness knows (LayerNorm / RMSNorm, optional soft-cap)")


def _with_weight(readout: Readout, weight: Tensor) -> Readout:
    return Readout(readout.W_U, readout.b_U, weight, readout.bias, readout.norm, readout.eps,
                   readout.softcap)


def _norm_affine(bridge, d_model: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The final norm's own weight and bias (ones and zeros when absent or folded)."""
    weight, bias = like.new_ones(d_model), like.new_zeros(d_model)
    module = getattr(bridge, "ln_final", None)
    inner = getattr(module, "_original_component", module)
    w = getattr(inner, "weight", None)
    b = getattr(inner, "bias", None)
    if isinstance(w, Tensor) and w.shape == (d_model,):
        weight = w.detach().to(like.dtype)
    if isinstance(b, Tensor) and b.shape == (d_model,):
        bias = b.detach().to(like.dtype)
    return weight, bias


@dataclass(frozen=True)
class PostNorm:
    """A norm on a block's attention output (Gemma 2's post-attention RMSNorm), read so that,
    with its scale frozen, it is a linear map: weight * centred(x) / scale + bias."""

    weights: tuple[Tensor, ...]  # candidate elementwise scales: w, and Gemma's 1 + w
    bias: Tensor
    eps: float
    center: bool                 # LayerNorm (centre first) or RMSNorm

    def centered(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.center else x

    def scale(self, x: Tensor) -> Tensor:
        return (self.centered(x).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()


def post_attention_norms(bridge) -> list[PostNorm] | None:
    """Each block's post-attention norm (`ln1_post`), float32; None where blocks have none."""
    blocks = getattr(bridge, "blocks", None)
    if not blocks or getattr(blocks[0], "ln1_post", None) is None:
        return None
    norm_type = str(getattr(bridge.cfg, "normalization_type", None) or "")
    norms = []
    for block in blocks:
        inner = getattr(block.ln1_post, "_original_component", block.ln1_post)
        w = getattr(inner, "weight", None)
        if not isinstance(w, Tensor):
            raise MeasureError("a post-attention norm without an elementwise weight: per-head "
                               "DLA cannot pass heads through it; use by: component or layer")
        w = w.detach().float()
        b = getattr(inner, "bias", None)
        eps = getattr(inner, "eps", getattr(inner, "variance_epsilon", bridge.cfg.eps))
        norms.append(PostNorm(weights=(w, w + 1),
                              bias=b.detach().float() if isinstance(b, Tensor) else
                              torch.zeros_like(w), eps=float(eps),
                              center=norm_type.startswith("LN")))
    return norms
