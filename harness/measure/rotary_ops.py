"""Block operations the rotary fast paths share (`llama_fast.py`, `parallel_fast.py`).

Both families rotate q and k with the model's own rotary module (cos/sin read from it once and
grown on demand; the `q`/`k` sites are before rotation, as the bridge's hooks are), attend with
key/value heads shared by groups of query heads (one group per head without grouped-query
attention), and project z and the MLP's neurons back with plain affine maps. What differs —
the norm and projections before attention, the MLP, how a block adds up — stays in each family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from harness.errors import MeasureError
from harness.measure.forward import Acts, Dims
from harness.measure.linear import affine, at_layer, nonzero
from harness.measure.readout import Readout
from harness.measure.staggered import StaggeredForward
from harness.sites import SITE_TABLE


def rotate(x: Float[Tensor, "... width"], cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin (HF's rotate_half: the halves swapped, the first
    negated), with that sign folded into the sin's first half (`cos_sin`): x * cos,
    then each half adds the other half times its sin. Three kernels that read x as it lies
    (q and k are strided views of the packed q/k/v); a roll would copy it first, which made
    this three times slower on the head sweep's q (an ad hoc timing)."""
    out = x * cos
    half = x.shape[-1] // 2
    out[..., :half].addcmul_(x[..., half:], sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class RotaryAttentionOps:
    """The shared half of a rotary family's BlockOps. `weights` has W_E, W_QKV, W_O, b_O,
    W_out, b_out, d_head and scaling; subclasses add attention_norm, mlp_post and sites."""

    parallel_block = False

    def __init__(self, weights, rotary, readout: Readout, act_fn, n_kv_heads: int):
        self.w, self.rotary, self.readout, self.act_fn = weights, rotary, readout, act_fn
        self.n_layers = weights.W_QKV.shape[0]
        self.n_heads, self.n_kv_heads = weights.n_heads, n_kv_heads
        self.d_model, self.d_mlp = weights.W_E.shape[1], weights.W_out.shape[1]
        self.device, self.dtype = weights.W_E.device, weights.W_E.dtype
        self._cos_sin: tuple[Tensor, Tensor] | None = None
        # None where a model has no such bias (all zeros): its products then skip the bias
        self.biases = {name: nonzero(getattr(weights, name)) for name in ("b_QKV", "b_O", "b_out")}

    def bias(self, name: str, layer: int) -> Tensor | None:
        return at_layer(self.biases[name], layer)

    # ---- rotary ---------------------------------------------------------------------------
    def cos_sin(self, n_pos: int) -> tuple[Float[Tensor, "pos rotary_dim"], Tensor]:
        """The model's own rotary cos/sin for positions 0..n_pos-1 (cached, grown on demand);
        their width is the rotary dimension: all of a head, or its first dims (partial).
        The sin's first half is negated, so that `rotate` needs no negation of x."""
        if self._cos_sin is None or self._cos_sin[0].shape[0] < n_pos:
            with torch.inference_mode(False), torch.no_grad():
                x = torch.zeros(1, n_pos, self.w.d_head, dtype=self.dtype, device=self.device)
                cos, sin = self.rotary(x, torch.arange(n_pos, device=self.device)[None])
            cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
            half = sin.shape[-1] // 2
            self._cos_sin = (cos, torch.cat([-sin[:, :half], sin[:, half:]], -1))
        cos, sin = self._cos_sin
        return cos[:n_pos], sin[:n_pos]

    def rope(self, x: Float[Tensor, "n pos head d_head"], q_pos: Tensor | None = None
             ) -> Tensor:
        """Rotate q or k (positions 0..pos-1, or `q_pos[i]` for row i of a single query);
        with a partial rotary only the first rotary_dim dims turn, the rest pass through."""
        if q_pos is None:
            cos, sin = self.cos_sin(x.shape[1])
            cos, sin = cos[:, None], sin[:, None]
        else:
            cos, sin = self.cos_sin(int(q_pos.max()) + 1)
            cos, sin = cos[q_pos][:, None, None], sin[q_pos][:, None, None]
        width = cos.shape[-1]
        if width == x.shape[-1]:
            return rotate(x, cos, sin)
        return torch.cat([rotate(x[..., :width], cos, sin), x[..., width:]], -1)

    # ---- attention ------------------------------------------------------------------------
    def qkv_flat(self, layer: int, resid: Tensor, columns: slice = slice(None)) -> Tensor:
        """The packed q/k/v (or its `columns`) of the family's norm of `resid`."""
        bias = self.bias("b_QKV", layer)
        return affine(self.attention_norm(layer, resid), self.w.W_QKV[layer][:, columns],
                      None if bias is None else bias[columns])

    def attention_norm(self, layer: int, resid: Tensor) -> Tensor:
        raise NotImplementedError

    def split_qkv(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, kv, d = self.n_heads, self.n_kv_heads, self.w.d_head
        q, k, v = flat.split([h * d, kv * d, kv * d], -1)
        return q.unflatten(-1, (h, d)), k.unflatten(-1, (kv, d)), v.unflatten(-1, (kv, d))

    def kv_flat(self, layer: int, resid: Tensor) -> Tensor:
        return self.qkv_flat(layer, resid, slice(self.n_heads * self.w.d_head, None))

    def split_kv(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        k, v = flat.unflatten(-1, (2, self.n_kv_heads, self.w.d_head)).unbind(-3)
        return k, v

    def _expand(self, kv: Tensor, axis: int) -> Tensor:
        """Key/value heads repeated for the query heads that share them."""
        groups = self.n_heads // self.n_kv_heads
        return kv if groups == 1 else kv.repeat_interleave(groups, axis)

    def attend(self, q, k, v, allowed=None, q_pos=None, layer=None) -> Tensor:
        """Causal attention; grouped key/value heads go to the kernel as they are
        (`enable_gqa`), not repeated per query head."""
        q, k = self.rope(q, q_pos), self.rope(k)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
            is_causal=allowed is None, scale=self.w.scaling,
            enable_gqa=self.n_heads != self.n_kv_heads)
        return z.transpose(1, 2)

    def attention_pattern(self, q: Tensor, k: Tensor, layer: int | None = None
                          ) -> Float[Tensor, "n head dest src"]:
        q, k = self.rope(q), self._expand(self.rope(k), 2)
        scores = torch.einsum("nqhe,nkhe->nhqk", q, k) * self.w.scaling
        n_pos = q.shape[1]
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1, dtype=torch.float32
                                                                  ).to(q.dtype)

    def mix_values(self, pattern: Tensor, v: Tensor) -> Tensor:
        return torch.einsum("nhqk,nkhe->nqhe", pattern, self._expand(v, 2))

    # ---- the clean forward ----------------------------------------------------------------
    sites: tuple[str, ...]   # what `trace` keeps, in the site table's order

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.w.W_E[tokens]
        scale = getattr(self.w, "embed_scale", 1.0)
        if scale != 1.0:  # Gemma: the scale is rounded to the model's dtype
            x = x * torch.tensor(scale, dtype=x.dtype)
        return x

    def trace(self, tokens: Int[Tensor, "batch pos"], hook=None) -> dict[str, Tensor]:
        """Full forward keeping every site, stacked over layers: site -> [layer, batch, ...].
        `hook(site, layer, act)` may replace an activation (gradients); "final" is the
        residual stream after the last block. A parallel block's MLP reads the block's input
        (no resid_mid); a sequential one reads resid_mid = resid_pre + attn_out."""
        acts: dict[str, list[Tensor]] = {s: [] for s in self.sites}

        def keep(site: str, layer: int, act: Tensor) -> Tensor:
            if hook is not None:
                act = hook(site, layer, act)
            acts[site].append(act)
            return act

        resid = self.embed(tokens)
        for layer in range(self.n_layers):
            resid = keep("resid_pre", layer, resid)
            q, k, v = (keep(s, layer, a) for s, a in
                       zip(("q", "k", "v"), self.split_qkv(self.qkv_flat(layer, resid))))
            pattern = keep("pattern", layer, self.attention_pattern(q, k, layer))
            z = keep("z", layer, self.mix_values(pattern, v))
            attn_out = keep("attn_out", layer, self.attn_output(layer, z))
            if self.parallel_block:
                post = keep("mlp_post", layer, self.mlp_post(layer, resid))
                mlp_out = keep("mlp_out", layer, self.mlp_output(layer, post))
                resid = keep("resid_post", layer, mlp_out + attn_out + resid)
            else:
                resid = keep("resid_mid", layer, resid + attn_out)
                post = keep("mlp_post", layer, self.mlp_post(layer, resid))
                resid = keep("resid_post", layer,
                             resid + keep("mlp_out", layer, self.mlp_output(layer, post)))
        out = {s: torch.stack(a) for s, a in acts.items()}
        out["final"] = resid
        return out

    # ---- outputs --------------------------------------------------------------------------
    def attn_output(self, layer: int, z: Tensor, add_to: Tensor | None = None) -> Tensor:
        return affine(z.flatten(-2), self.w.W_O[layer], self.bias("b_O", layer), add_to)

    def head_output_weight(self, layer: int) -> Tensor | None:
        return self.w.W_O[layer]

    def mlp_output(self, layer: int, post: Tensor, add_to: Tensor | None = None) -> Tensor:
        return affine(post, self.w.W_out[layer], self.bias("b_out", layer), add_to)

    def logit_diff(self, resid: Tensor, answer_ids: Tensor, foil_ids: Tensor) -> Tensor:
        return self.readout.logit_diff(resid, answer_ids, foil_ids)


RESIDUAL_WIDTH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


class RotaryForward(StaggeredForward):
    """A rotary family's fast path behind the engine's Forward interface: subclasses set
    `path` and `make_ops(bridge, rotary, readout, act_fn)`."""

    def make_ops(self, bridge, rotary, readout: Readout, act_fn) -> RotaryAttentionOps:
        raise NotImplementedError

    def __init__(self, bridge):
        super().__init__(bridge)
        self.readout = Readout.from_bridge(bridge)
        rotary = getattr(bridge.rotary_emb, "original_component", bridge.rotary_emb)
        mlp = bridge.blocks[0].mlp.original_component
        act_fn = next(getattr(mlp, name) for name in ("act_fn", "act", "activation_fn")
                      if hasattr(mlp, name))   # Llama, NeoX, Phi / Phi-3
        self.ops = o = self.make_ops(bridge, rotary, self.readout, act_fn)
        self.dims = Dims(n_layers=o.n_layers, n_heads=o.n_heads, n_kv_heads=o.n_kv_heads,
                         d_model=o.d_model, d_head=o.w.d_head, d_mlp=o.d_mlp,
                         n_ctx=int(bridge.cfg.n_ctx), sites=o.sites, device=o.device,
                         dtype=o.dtype)

    def trace_nbytes(self, batch: int, n_pos: int) -> int:
        """Bytes of a clean trace: the residual-width sites, z, the packed q/k/v, the MLP's
        neurons and one attention row per head, per layer and row; plus the final residual."""
        d = self.dims
        residual = sum(site in d.sites for site in RESIDUAL_WIDTH_SITES)
        qkv = (d.n_heads + 2 * d.n_kv_heads) * d.d_head
        per_row = residual * d.d_model + d.n_heads * d.d_head + qkv + d.d_mlp + d.n_heads * n_pos
        return (d.n_layers * per_row + d.d_model) * batch * n_pos * d.element_size

    def verify(self, tokens: Tensor, acts: Acts) -> None:
        """Our residual stream after every block must be the bridge's, and our final residuals,
        read through the model's final norm, must give its logits (a wrong rotary can hide
        under the logits' tolerance on a small model, not under the residual stream's)."""
        names = [SITE_TABLE["resid_post"].hook_name(layer) for layer in range(self.dims.n_layers)]
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(tokens.to(self.ops.device),
                                                       names_filter=lambda n: n in names)
        theirs = torch.stack([cache[name] for name in names]).float()
        ours = acts["resid_post"][:, : len(tokens)].float()
        rtol = 1e-4 if self.ops.dtype == torch.float32 else 3e-2
        error = (ours - theirs.to(ours.device)).abs().max().item()
        if not error <= rtol * max(1.0, theirs.abs().max().item()):
            raise MeasureError(f"the {self.path} forward's residual stream differs from the "
                               f"model's by {error:.3g}")
        self.readout = self.readout.check(acts["final"][: len(tokens), -1], logits[:, -1])
        self.ops.readout = self.readout

    def head_weights(self) -> tuple[Float[Tensor, "layer head d_head d_model"],
                                    Float[Tensor, "layer d_model"]]:
        w = self.ops.w
        return w.W_O.unflatten(1, (w.n_heads, w.d_head)), w.b_O
