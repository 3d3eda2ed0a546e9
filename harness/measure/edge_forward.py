"""The edge forward: a model run in which every receiver's input is rebuilt from its senders'
outputs, each edge weighted between this run's output and an ablated one.

For every receiver v (a head's q, k or v input, an MLP's input, the logits; `edge_graph.py`)

    input_v = Σ_{u upstream of v} [ w[u, v] · out_u(this run) + (1 − w[u, v]) · abl_u ] + b_v

where out_u is sender u's output in this run (the embeddings; a head's z @ W_O[head]; an MLP's
output, its bias included; on Gemma 2, whose attention output passes through a norm, a head's
z @ W_O[head] times that norm's factor in this run, its scale over the RMS of all heads' sum,
so that the heads still add up to the block's attention output), abl_u its ablated value
(a corrupt run's output, zero, a mean, a resampled prompt's) and b_v the attention output
biases of the layers before v (constants, never ablated: as ablating a head's z leaves b_O).
q, k and v of every head get their own residual input, each through the layer's own norm.
With every w = 1 this is the model's own forward (the residual stream summed by senders);
with every w = 0 it reads the ablated run's outputs. Weights are a dense float tensor
[variant, sender, receiver] (entries of edges that do not exist are ignored), so variants run
stacked along the batch and gradients flow to them.

The family's arithmetic comes from the fast paths' `BlockOps` (`staggered.py`: norms and
projections `qkv_flat`, rotary `attend`, `mlp_post`/`mlp_output`) and their per-head output
weights (`head_weights`), so every architecture with a fast path runs here: GPT-2 and OPT, the
Llama family (Llama with or without GQA, Mistral, Qwen2, Gemma, Gemma 2, Phi-3), the parallel
family (GPT-NeoX/Pythia, Phi). Models on the general path only are refused (MeasureError).

Interface (what EAP / EAP-IG build on):
  ef = EdgeForward(forward)              a fast path's Forward (`engine.forward(run)`), verified
  ef.graph                               the EdgeGraph: senders, receivers, edges, indices
  clean = ef.outputs(ef.trace(tokens))   sender outputs [batch, pos, sender, d_model]
  abl = ef.outputs(ef.trace(corrupt))    or zero_outputs / mean_outputs / outputs[draw]
  run = ef.run(clean, abl, weights)      weights [variant, sender, receiver] or [sender, receiver]
  run.final                              residual before the final norm [variant, batch, pos, d]
  ef.logit_diff(run.final, final_pos, answer_ids, foil_ids) -> [variant, batch]
  ef.final_logits(run.final, final_pos)                     -> [variant, batch, vocab]
  run(..., input_hook=f)                 f(layer, group, x) -> x for every receiver input before it
                                         is used: group "attn" (x [v, b, pos, receiver, d] over
                                         the layer's q, k, v receivers in graph order), "mlp"
                                         ([v, b, pos, d]), "logits" (layer = n_layers); return x
                                         plus a zero tensor that requires grad to read
                                         ∂metric/∂input_v.
Since input_v = const + Σ_u abl_u + Σ_u w[u, v] (out_u − abl_u), ∂metric/∂w[u, v] at w = 1 is
Σ_{batch, pos} (out_u − abl_u) · ∂metric/∂input_v: minus EAP's score of the edge (Syed et al.),
one backward pass for every edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from harness.edge_graph import EdgeGraph
from harness.errors import MeasureError

InputHook = Callable[[int, str, Tensor], Tensor]


@dataclass(frozen=True)
class EdgeRun:
    final: Float[Tensor, "variant batch pos d_model"]   # the residual stream after the last block


class EdgeForward:
    """Edge-weighted forward passes of one model on its fast path's block ops."""

    def __init__(self, forward):
        ops = getattr(forward, "ops", None)
        if ops is None or not hasattr(forward, "head_weights"):
            raise MeasureError(
                f"edge patching runs on the fast paths' block ops (GPT-2 and OPT, the Llama "
                f"family with Gemma 2, GPT-NeoX/Pythia/Phi); this model runs on the "
                f"{forward.path} path only")
        self.forward, self.ops, self.readout = forward, ops, forward.readout
        self.graph = EdgeGraph.of(forward.bridge.cfg)
        g = self.graph
        if (g.n_layers, g.n_heads) != (ops.n_layers, ops.n_heads) or not g.has_mlp:
            raise MeasureError("the model's config and its fast path's weights disagree")
        with torch.no_grad():
            W_O, b_O = forward.head_weights()
        self.W_O = W_O.detach()                         # [layer, head, d_head, d_model]
        # Gemma 2: the norm after attention (layer, heads' sum) -> its factor
        self._post_norm = getattr(ops, "post_attn_scale", None)
        if self._post_norm is not None and bool(b_O.any()):
            raise MeasureError("edge patching cannot split an attention output bias under a "
                               "post-attention norm between the heads")
        self._split = self._split_projection()
        # constants read by each layer's head inputs, MLP input, and the logits
        cum = torch.cumsum(b_O.detach(), 0)
        zero = torch.zeros_like(cum[:1])
        self.const_attn = torch.cat([zero, cum[:-1]])   # b_O of the layers before
        self.const_mlp = self.const_attn if g.parallel else cum
        self.const_final = cum[-1]

    @classmethod
    def for_bridge(cls, bridge, tokens: Tensor | None = None) -> EdgeForward:
        """Build (and, given tokens, verify against the bridge) the model's fast path."""
        from harness.measure.forward import fast_path_for
        from harness.measure.patching import PatchingEngine  # noqa: F401  (registers paths)

        fast = fast_path_for(bridge)
        if fast is None:
            raise MeasureError("edge patching needs a fast path's block ops; this model has none")
        forward = fast.build(bridge)
        if tokens is not None:
            forward.verify(tokens[:4], forward.trace(tokens[:4]))
        return cls(forward)

    # ---- sender outputs -------------------------------------------------------------------
    def trace(self, tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
        return self.forward.trace(tokens)

    def outputs(self, acts: dict[str, Tensor]) -> Float[Tensor, "batch pos sender d_model"]:
        """Every sender's output in a trace, in graph order."""
        with torch.no_grad():
            parts = [acts["resid_pre"][0][:, :, None]]
            for layer in range(self.graph.n_layers):
                parts.append(self._head_outputs(layer, acts["z"][layer]))
                parts.append(acts["mlp_out"][layer][:, :, None])
            return torch.cat(parts, 2)

    def zero_outputs(self) -> Float[Tensor, "1 1 sender d_model"]:
        return torch.zeros(1, 1, len(self.graph.senders), self.ops.d_model,
                           device=self.ops.device, dtype=self.ops.dtype)

    @staticmethod
    def mean_outputs(outputs: Tensor, real: Bool[Tensor, "batch pos"]
                     ) -> Float[Tensor, "1 1 sender d_model"]:
        """The mean of each sender's output over the real (unpadded) positions."""
        w = real.to(outputs.device, outputs.dtype)[:, :, None, None]
        return ((outputs * w).sum((0, 1)) / w.sum((0, 1)))[None, None]

    # ---- the forward ----------------------------------------------------------------------
    def run(self, clean: Float[Tensor, "batch pos sender d_model"],
            ablated: Float[Tensor, "b pos sender d_model"],
            weights: Float[Tensor, "variant sender receiver"] | None,
            input_hook: InputHook | None = None) -> EdgeRun:
        """Every variant's forward with the inputs rebuilt edge by edge (module docstring).
        `clean`: this run's sender outputs (only the embeddings are read: every other output
        is recomputed); `ablated` broadcasts over batch and positions ([1, 1, ...] for zero or
        mean ablations). `weights=None` keeps every edge (one variant): each receiver reads
        the running sum of its senders' outputs, no per-edge weighting (EAP's gradient runs)."""
        g, ops = self.graph, self.ops
        kept = weights is None
        if kept:
            weights = torch.ones(1, len(g.senders), len(g.receivers))
        if weights.dim() == 2:
            weights = weights[None]
        n_s, n_r = len(g.senders), len(g.receivers)
        if weights.shape[1:] != (n_s, n_r):
            raise MeasureError(f"edge weights must be [variant, {n_s}, {n_r}] (senders, "
                               f"receivers); got {list(weights.shape)}")
        weights = weights.to(ops.device, ops.dtype)
        ablated = ablated.to(ops.device, ops.dtype)
        n_var, (batch, n_pos) = weights.shape[0], clean.shape[:2]
        abl_cum = torch.cat([torch.zeros_like(ablated[:, :, :1]), ablated.cumsum(2)], 2)
        embed = clean[:, :, :1].to(ops.device, ops.dtype)
        # out_u − abl_u of every sender computed so far. Without autograd one buffer filled in
        # place (one einsum per receiver group); with it, one tensor per block of senders
        # (in-place writes would break the backward pass)
        tracked = torch.is_grad_enabled() and (weights.requires_grad or clean.requires_grad
                                               or ablated.requires_grad
                                               or input_hook is not None)
        buffer = None if tracked or kept else torch.empty(n_var, batch, n_pos, n_s, ops.d_model,
                                                  device=ops.device, dtype=ops.dtype)
        blocks: list[tuple[range, Tensor]] = []

        def keep(senders: range, diff: Tensor) -> None:
            if buffer is None:
                blocks.append((senders, diff))
            else:
                buffer[:, :, :, senders.start:senders.stop] = diff

        keep(range(0, 1), (embed - ablated[:, :, :1]).expand(n_var, batch, n_pos, 1, -1))
        summed = {1: blocks[0][1].sum(3)} if kept else {}   # every edge kept: stop -> Σ diffs below

        def gather(receivers: range, n_up: int, const: Tensor) -> Tensor:
            """[variant, batch, pos, receiver, d]: the inputs of these receivers."""
            x = (const + abl_cum[:, :, n_up])[None, :, :, None]
            if kept:
                if n_up not in summed:
                    last = max(k for k in summed if k < n_up)
                    ahead = [d.sum(3) for s, d in blocks if last <= s.start < n_up]
                    summed[n_up] = summed[last] + sum(ahead)
                x = x + summed[n_up][:, :, :, None]
                return x.expand(n_var, batch, n_pos, len(receivers), -1)
            if buffer is not None:
                w = weights[:, :n_up, receivers.start:receivers.stop]
                x = x + torch.einsum("vsr,vbpsd->vbprd", w, buffer[:, :, :, :n_up])
            for senders, diff in blocks:
                if senders.start >= n_up:
                    break
                w = weights[:, senders.start:senders.stop, receivers.start:receivers.stop]
                x = x + torch.einsum("vsr,vbpsd->vbprd", w, diff)
            return x.expand(n_var, batch, n_pos, len(receivers), -1)

        for layer in range(g.n_layers):
            recv = g.layer_receivers(layer)
            heads, mlp = g.layer_senders(layer)
            attn_in = range(recv["q"].start, recv["v"].stop)
            x = gather(attn_in, heads.start, self.const_attn[layer])
            if input_hook is not None:
                x = input_hook(layer, "attn", x)
            z = self._attend(layer, x)                            # [v * b, pos, head, d_head]
            out = self._head_outputs(layer, z).unflatten(0, (n_var, batch))
            keep(heads, out - ablated[:, :, heads.start:heads.stop])
            n_up = mlp.start if not g.parallel else heads.start
            x = gather(recv["mlp"], n_up, self.const_mlp[layer])[:, :, :, 0]
            if input_hook is not None:
                x = input_hook(layer, "mlp", x)
            mlp_out = ops.mlp_output(layer, ops.mlp_post(layer, x))
            keep(mlp, (mlp_out - ablated[:, :, mlp.start])[:, :, :, None])
        final = gather(range(n_r - 1, n_r), n_s, self.const_final)[:, :, :, 0]
        if input_hook is not None:
            final = input_hook(g.n_layers, "logits", final)
        return EdgeRun(final)

    def _head_outputs(self, layer: int, z: Float[Tensor, "n pos head d_head"]
                      ) -> Float[Tensor, "n pos head d_model"]:
        """Each head's output: z @ W_O[head]; under a post-attention norm, times the norm's
        factor for the heads' sum in this run (the heads add up to its output)."""
        out = torch.einsum("nphe,hed->nphd", z, self.W_O[layer])
        if self._post_norm is None:
            return out
        factor = self._post_norm(layer, out.sum(-2))[..., None, :]
        return (out.float() * factor).to(out.dtype)

    def _attend(self, layer: int, x: Float[Tensor, "v b pos receiver d_model"]
                ) -> Float[Tensor, "n pos head d_head"]:
        """Head outputs z, each head's q from its own input row, each key/value head's k and
        v from theirs, through the layer's norm and projections."""
        g, ops = self.graph, self.ops
        h, kv = g.n_heads, g.n_kv_heads
        if self._split is not None:   # each row through its own head's columns only
            norm, W, b = self._split(layer)
            normed = norm(x)
            d_head = W.shape[-1] // (h + 2 * kv)
            out = []
            for rows, cols in ((slice(0, h), slice(0, h * d_head)),
                               (slice(h, h + kv), slice(h * d_head, (h + kv) * d_head)),
                               (slice(h + kv, h + 2 * kv), slice((h + kv) * d_head, None))):
                w = W[:, cols].unflatten(-1, (-1, d_head))           # [d_model, head, d_head]
                out.append(torch.einsum("...hd,dhe->...he", normed[..., rows, :], w)
                           + b[cols].unflatten(-1, (-1, d_head)))
            q, k, v = out
        else:   # any BlockOps: every row through the whole projection, one head's part kept
            q_all, k_all, v_all = ops.split_qkv(ops.qkv_flat(layer, x))
            q = torch.diagonal(q_all[..., :h, :, :], dim1=-3, dim2=-2).movedim(-1, -2)
            k = torch.diagonal(k_all[..., h:h + kv, :, :], dim1=-3, dim2=-2).movedim(-1, -2)
            v = torch.diagonal(v_all[..., h + kv:, :, :], dim1=-3, dim2=-2).movedim(-1, -2)
        return ops.attend(q.flatten(0, 1), k.flatten(0, 1).contiguous(),
                          v.flatten(0, 1).contiguous(), layer=layer)

    def _split_projection(self):
        """(layer -> (norm, W_QKV, b_QKV)) where the family's `qkv_flat` is affine(norm(x))
        with q, k, v side by side, checked on random rows against `qkv_flat`; else None
        (the generic, slower way)."""
        ops = self.ops
        parts = _projection_parts(ops)
        if parts is None:
            return None
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, ops.d_model, generator=gen).to(ops.device, ops.dtype)
        for layer in range(ops.n_layers):
            norm, W, b = parts(layer)
            ours, theirs = torch.addmm(b, norm(x), W), ops.qkv_flat(layer, x)
            if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-4,
                                                                 rtol=1e-3):
                return None
        return parts

    # ---- reading the result ---------------------------------------------------------------
    @staticmethod
    def final_rows(final: Float[Tensor, "v b pos d"], final_pos: Int[Tensor, " b"]
                   ) -> Float[Tensor, "v b d"]:
        pos = final_pos.to(final.device)
        return final[:, torch.arange(final.shape[1], device=final.device), pos]

    def logit_diff(self, final: Tensor, final_pos: Tensor, answer_ids: Tensor,
                   foil_ids: Tensor) -> Float[Tensor, "variant batch"]:
        rows = self.final_rows(final, final_pos)
        n_var, batch = rows.shape[:2]
        dev = rows.device
        return self.readout.logit_diff(rows.flatten(0, 1), answer_ids.to(dev).repeat(n_var),
                                       foil_ids.to(dev).repeat(n_var)).view(n_var, batch)

    def final_logits(self, final: Tensor, final_pos: Tensor) -> Float[Tensor, "v b vocab"]:
        rows = self.final_rows(final, final_pos)
        return self.readout.all_logits(rows.flatten(0, 1)).unflatten(0, rows.shape[:2])

    def ones(self, n_variants: int = 1) -> Float[Tensor, "variant sender receiver"]:
        """Weights keeping every edge."""
        return torch.ones(n_variants, len(self.graph.senders), len(self.graph.receivers),
                          device=self.ops.device, dtype=self.ops.dtype)


def _projection_parts(ops):
    """The norm and fused q/k/v weights of the fast paths' ops (see `_split_projection`)."""
    import torch.nn.functional as F

    from harness.measure.gpt2_fast import GPT2Ops
    from harness.measure.llama_fast import LlamaOps, rms_norm
    from harness.measure.parallel_fast import ParallelOps

    if isinstance(ops, GPT2Ops):
        m = ops.model
        return lambda layer: (lambda x: F.layer_norm(x, x.shape[-1:], eps=m.eps),
                              m.W_QKV[layer], m.b_QKV[layer])
    if isinstance(ops, LlamaOps):
        w = ops.w
        return lambda layer: (lambda x: rms_norm(x, w.eps[layer][0]), w.W_QKV[layer],
                              w.b_QKV[layer])
    if isinstance(ops, ParallelOps):
        w = ops.w
        return lambda layer: (lambda x: F.layer_norm(x, x.shape[-1:], eps=w.eps[layer][0]),
                              w.W_QKV[layer], w.b_QKV[layer])
    return None
