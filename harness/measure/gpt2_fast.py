"""The GPT-2 family's fast path: the staggered forward (`staggered.py`) on the bridge's folded
GPT-2 weights (`gpt2_forward.py`). Verified against the bridge once per model.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness.measure import gpt2_forward as fw
from harness.measure.forward import Acts, Dims
from harness.measure.gpt2_forward import FoldedGPT2
from harness.measure.linear import MLPInput
from harness.measure.readout import Readout
from harness.measure.staggered import StaggeredForward
from harness.sites import SITES


def applies(bridge) -> bool:
    """GPT-2-style models: learned positions, LayerNorm, plain MLP, one KV head per head."""
    return not fw.unsupported_features(bridge)


class GPT2Ops:
    """GPT-2's block computations (`gpt2_forward`) as the staggered forward's BlockOps."""

    parallel_block = False

    def __init__(self, model: FoldedGPT2):
        self.model = model
        self.n_layers, self.n_heads = model.n_layers, model.n_heads
        self.d_model, self.d_mlp = model.d_model, model.d_mlp
        self.device, self.dtype = model.device, model.W_E.dtype
        self.mlp_in = MLPInput(model.W_in, model.b_in, fw.ACTIVATIONS[model.act_fn])

    def qkv_flat(self, layer: int, resid: Tensor) -> Tensor:
        return fw.qkv_flat(self.model, layer, resid)

    def split_qkv(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = flat.unflatten(-1, (3, self.n_heads, self.model.d_head)).unbind(-3)
        return q, k, v

    def kv_flat(self, layer: int, resid: Tensor) -> Tensor:
        width = self.n_heads * self.model.d_head
        return fw.qkv_flat(self.model, layer, resid, slice(width, None))

    def split_kv(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        k, v = flat.unflatten(-1, (2, self.n_heads, self.model.d_head)).unbind(-3)
        return k, v

    def attend(self, q, k, v, allowed=None, q_pos=None, layer=None) -> Tensor:
        return fw.attend(q, k, v, allowed)

    def attention_pattern(self, q: Tensor, k: Tensor, layer=None) -> Tensor:
        return fw.attention_pattern(q, k, fw.causal_mask(q.shape[1], q.device))

    def mix_values(self, pattern: Tensor, v: Tensor) -> Tensor:
        return fw.mix_values(pattern, v)

    def attn_output(self, layer: int, z: Tensor, add_to: Tensor | None = None) -> Tensor:
        return fw.attn_output(self.model, layer, z, add_to)

    def head_output_weight(self, layer: int) -> Tensor:
        return self.model.W_O[layer]

    def mlp_post(self, layer: int, resid_mid: Tensor) -> Tensor:
        return self.mlp_in(layer, fw.layer_norm(resid_mid, self.model.eps))

    def mlp_output(self, layer: int, post: Tensor, add_to: Tensor | None = None) -> Tensor:
        return fw.mlp_output(self.model, layer, post, add_to)

    def logit_diff(self, resid: Tensor, answer_ids: Tensor, foil_ids: Tensor) -> Tensor:
        direction, bias = self.model.logit_diff_direction(answer_ids, foil_ids)
        return fw.read_logit_diff(self.model, resid, direction, bias)

    def trace(self, tokens: Tensor, hook=None) -> dict[str, Tensor]:
        return fw.trace(self.model, tokens) if hook is None else \
            fw.trace(self.model, tokens, hook)


class GPT2Forward(StaggeredForward):
    """The fast path behind the engine's Forward interface."""

    path = "gpt2-fast"

    def __init__(self, bridge):
        super().__init__(bridge)
        self.model = FoldedGPT2.from_bridge(bridge)
        self.ops = GPT2Ops(self.model)
        self.readout = Readout.from_bridge(bridge)
        m = self.model
        self.dims = Dims(n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_heads,
                         d_model=m.d_model, d_head=m.d_head, d_mlp=m.d_mlp,
                         n_ctx=m.W_pos.shape[0], sites=SITES, device=m.device,
                         dtype=m.W_E.dtype)

    def trace(self, tokens: Int[Tensor, "batch pos"]) -> Acts:
        acts = super().trace(tokens)
        with torch.no_grad():
            acts["pos_embed"] = self.model.W_pos[: tokens.shape[1]].expand(len(tokens), -1,
                                                                            -1).clone()
        return acts

    def trace_nbytes(self, batch: int, n_pos: int) -> int:
        return fw.trace_nbytes(self.model, batch, n_pos) + \
            batch * n_pos * self.dims.d_model * self.dims.element_size

    def verify(self, tokens: Tensor, acts: Acts) -> None:
        with torch.no_grad():   # one bridge forward serves both checks
            logits = self.bridge(tokens.to(self.model.device), return_type="logits")[:, -1]
        fw.check_against_bridge(self.model, self.bridge, tokens, acts["final"][: len(tokens)],
                                theirs=logits)
        self.readout = self.readout.check(acts["final"][: len(tokens), -1], logits)

    def head_weights(self) -> tuple[Float[Tensor, "layer head d_head d_model"],
                                    Float[Tensor, "layer d_model"]]:
        m = self.model
        return torch.stack(m.W_O).unflatten(1, (m.n_heads, m.d_head)), m.b_O
