"""The GPT-2 family's fast path: a plain-torch forward on the bridge's folded weights.

Why it is fast (compared with TransformerLens's `patching` module, one full forward per cell):
every variant of a sweep starts where it first differs from the clean run: at the patched
layer (from the cached residual stream) and at the first patched position (earlier rows are
unchanged under causal attention, their keys and values come from the cache); variants entering
at different layers share one staggered batch, so each block's weights are used in one large
matrix product per chunk; the last block computes only the final rows, and the metric reads two
unembedding columns instead of the whole vocabulary. Verified against the bridge once per model.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness.measure import gpt2_forward as fw
from harness.measure.forward import Acts, Dims
from harness.measure.general_forward import GeneralForward
from harness.measure.gpt2_forward import FoldedGPT2
from harness.measure.readout import Readout
from harness.measure.selection import Variants
from harness.sites import SITES


def applies(bridge) -> bool:
    """GPT-2-style models: learned positions, LayerNorm, plain MLP, one KV head per head."""
    return not fw.unsupported_features(bridge)


class GPT2Forward:
    """The fast path behind the engine's Forward interface."""

    path = "gpt2-fast"

    def __init__(self, bridge):
        self.bridge = bridge
        self.model = FoldedGPT2.from_bridge(bridge)
        self.readout = Readout.from_bridge(bridge)
        m = self.model
        self.dims = Dims(n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_heads,
                         d_model=m.W_O.shape[-1], d_head=m.d_head, d_mlp=m.W_in.shape[-1],
                         n_ctx=m.W_pos.shape[0], sites=SITES, device=m.device,
                         dtype=m.W_E.dtype)
        self._general: GeneralForward | None = None

    def trace(self, tokens: Int[Tensor, "batch pos"]) -> Acts:
        with torch.no_grad():
            tokens = tokens.to(self.model.device)
            acts = fw.trace(self.model, tokens)
            acts["qkv"] = torch.stack([acts.pop("q"), acts.pop("k"), acts.pop("v")], 3)
            acts["q"], acts["k"], acts["v"] = acts["qkv"].unbind(3)  # views: no copies
            acts["pos_embed"] = self.model.W_pos[: tokens.shape[1]].expand(len(tokens), -1,
                                                                            -1).clone()
        return acts

    def trace_nbytes(self, batch: int, n_pos: int) -> int:
        return fw.trace_nbytes(self.model, batch, n_pos) + \
            batch * n_pos * self.dims.d_model * self.dims.element_size

    def read_clean(self, acts: Acts, final_pos: Tensor, answer_ids: Tensor, foil_ids: Tensor
                   ) -> Float[Tensor, " batch"]:
        direction, bias = self.model.logit_diff_direction(answer_ids, foil_ids)
        with torch.no_grad():
            return fw.read_logit_diff(self.model, fw.final_rows(acts["final"], final_pos),
                                      direction, bias)

    def verify(self, tokens: Tensor, acts: Acts) -> None:
        fw.check_against_bridge(self.model, self.bridge, tokens, acts["final"][: len(tokens)])
        with torch.no_grad():
            logits = self.bridge(tokens.to(self.model.device), return_type="logits")[:, -1]
        self.readout = self.readout.check(acts["final"][: len(tokens), -1], logits)

    def head_weights(self) -> tuple[Tensor, Tensor]:
        m = self.model
        return m.W_O.unflatten(1, (m.n_heads, m.d_head)), m.b_O

    def run_variants(self, tokens: Tensor, final_pos: Tensor, into: Acts, source: Acts,
                     variants: Variants, answer_ids: Tensor, foil_ids: Tensor, work_bytes: int
                     ) -> Float[Tensor, "variant batch"]:
        """Patched logit diffs of every variant, in chunks that fit `work_bytes`."""
        model = self.model
        chunk = _chunk_size(model, tokens.shape, work_bytes)
        order = torch.argsort(variants.layers, stable=True)
        out = torch.empty(len(variants), tokens.shape[0], device=model.device)
        with torch.no_grad():
            for i in range(0, len(variants), chunk):
                idx = order[i:i + chunk]
                out[idx] = _run_chunk(model, into, source, variants.take(idx), final_pos,
                                      answer_ids, foil_ids)
        return out.cpu()

    def patch_layers(self, tokens, final_pos, site, masks, source, answer_ids, foil_ids):
        """Patches spanning several layers: through the bridge's hooks (one forward)."""
        if self._general is None:
            self._general = GeneralForward(self.bridge)
        return self._general.patch_layers(tokens, final_pos, site, masks, source, answer_ids,
                                          foil_ids)

    def site_gradients(self, tokens, final_pos, site, answer_ids, foil_ids):
        return _site_gradients(self.model, tokens, final_pos, site, answer_ids, foil_ids)


def _chunk_size(model: FoldedGPT2, shape, work_bytes: int) -> int:
    """Variants per chunk: a generous estimate of the live tensors one variant needs."""
    batch, n_pos = shape
    d_model, d_mlp = model.W_O.shape[-1], model.W_in.shape[-1]
    per_row = 8 * d_model + 3 * d_mlp + 4 * model.n_heads * n_pos
    per_variant = model.W_E.element_size() * batch * n_pos * per_row
    return max(1, int(work_bytes // per_variant))


# ---- staggered batched forward ------------------------------------------------------------------
def _run_chunk(model: FoldedGPT2, into: Acts, source: Acts, variants: Variants,
               final_pos: Tensor, answer_ids: Tensor, foil_ids: Tensor
               ) -> Float[Tensor, "variant batch"]:
    """Enter every variant where it first differs, run the blocks once for all, read the metric.

    `variants` are sorted by layer, so entries are non-decreasing along the batch.
    """
    batch, device, n_var = final_pos.shape[0], model.device, len(variants)
    masks = variants.masks.to(device)
    layer = variants.layers.to(device).repeat_interleave(batch)  # per row of the batch
    prompt = torch.arange(batch, device=device).repeat(n_var)
    x, offset = _enter(model, variants.site, layer, masks, into, source, prompt)
    start = _first_patched_pos(variants.site, masks, x.shape[1]).repeat_interleave(batch)
    direction, bias = model.logit_diff_direction(answer_ids.to(device)[prompt],
                                                 foil_ids.to(device)[prompt])
    final = _run_blocks(model, into, x, 2 * layer + offset, start, prompt,
                        final_pos.to(device)[prompt])
    return fw.read_logit_diff(model, final, direction, bias).reshape(n_var, batch)


def _run_blocks(model: FoldedGPT2, into: Acts, x: Float[Tensor, "n pos d_model"],
                enter_at: Int[Tensor, " n"], start: Int[Tensor, " n"], prompt: Int[Tensor, " n"],
                final_pos: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
    """Half-steps (attention, MLP) of every block from the earliest entry; returns final rows.

    Variants that have entered form a prefix of the batch. Row (n, t) is computed only once
    variant n has entered and t >= start[n]; the other rows equal the into run's, and their
    keys and values are read from its trace. The last block computes the final rows only.
    """
    n_pos, last = x.shape[1], model.n_layers - 1
    pos = torch.arange(n_pos, device=x.device)
    entered = torch.searchsorted(enter_at, torch.arange(2 * last, device=x.device), right=True)
    for step in range(int(enter_at[0]), 2 * last):
        layer, n = step // 2, int(entered[step])
        rows = (pos[None] >= start[:n, None]).flatten()
        flat = None if bool(rows.all()) else rows.nonzero().squeeze(1)
        if step % 2 == 0:
            out = _attention_step(model, layer, x[:n], flat, into["qkv"][layer][prompt[:n]])
        else:
            out = _mlp_step(model, layer, x[:n], flat)
        if flat is None:  # partial steps wrote into x already
            x[:n] = out
    return _last_block(model, into, x, enter_at, start, prompt, final_pos)


def _attention_step(model: FoldedGPT2, layer: int, x: Tensor, flat: Tensor | None,
                    clean_qkv: Float[Tensor, "n pos 3 head d_head"]) -> Tensor:
    """Attention sublayer on the rows `flat` of x viewed as [n*pos, d], in place.

    flat=None: every row, returned as a new tensor.
    """
    if flat is None:
        q, k, v = fw.qkv(model, layer, x)
        return x + fw.attn_output(model, layer, fw.attend(q, k, v))
    n, n_pos, d_model = x.shape
    rows = x.reshape(-1, d_model).index_select(0, flat)
    qkv = clean_qkv.reshape(n * n_pos, -1).index_copy_(0, flat, fw.qkv_flat(model, layer, rows))
    q, k, v = qkv.view(*clean_qkv.shape).unbind(2)
    z = fw.attend(q, k, v).reshape(n * n_pos, -1).index_select(0, flat)
    out = rows + fw.attn_output(model, layer, z.unflatten(-1, (model.n_heads, -1)))
    x.view(-1, d_model).index_copy_(0, flat, out)  # in place: x is a prefix of the batch
    return x


def _mlp_step(model: FoldedGPT2, layer: int, x: Tensor, flat: Tensor | None) -> Tensor:
    if flat is None:
        return x + fw.mlp_output(model, layer, fw.mlp_post(model, layer, x))
    n, n_pos, d_model = x.shape
    rows = x.reshape(-1, d_model).index_select(0, flat)
    out = rows + fw.mlp_output(model, layer, fw.mlp_post(model, layer, rows))
    x.view(-1, d_model).index_copy_(0, flat, out)
    return x


def _last_block(model: FoldedGPT2, into: Acts, x: Tensor, enter_at: Tensor, start: Tensor,
                prompt: Tensor, final_pos: Tensor) -> Float[Tensor, "n d_model"]:
    """Last block, final rows only: keys/values for the changed rows, one query per variant."""
    layer, (n, n_pos, d_model) = model.n_layers - 1, x.shape
    pos = torch.arange(n_pos, device=x.device)
    in_attn = enter_at <= 2 * layer
    changed = (in_attn[:, None] & (pos[None] >= start[:, None])).flatten()
    flat = changed.nonzero().squeeze(1)
    clean_qkv = into["qkv"][layer][prompt]
    new = fw.qkv_flat(model, layer, x.reshape(-1, d_model).index_select(0, flat))
    qkv = clean_qkv.reshape(n * n_pos, -1).index_copy_(0, flat, new).view(*clean_qkv.shape)
    final = torch.arange(n, device=x.device) * n_pos + final_pos
    resid = x.reshape(-1, d_model)[final]
    unchanged = in_attn & (final_pos < start)  # never computed: the into run's residual
    resid = torch.where(unchanged[:, None], into["resid_pre"][layer][prompt, final_pos], resid)
    if bool(in_attn.any()):
        _, k, v = qkv[in_attn].unbind(2)
        q = fw.qkv(model, layer, resid[in_attn])[0]
        allowed = (pos[None] <= final_pos[in_attn, None])[:, None, None, :]
        z = fw.attend(q[:, None], k, v, allowed)[:, 0]
        resid[in_attn] = resid[in_attn] + fw.attn_output(model, layer, z)
    in_mlp = enter_at <= 2 * layer + 1
    post = fw.mlp_post(model, layer, resid[in_mlp])
    resid[in_mlp] = resid[in_mlp] + fw.mlp_output(model, layer, post)
    return resid


ENTRY_OFFSET = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2, "attn_out": 1, "z": 1, "q": 1,
                "k": 1, "v": 1, "pattern": 1, "mlp_post": 2, "mlp_out": 2}


def _enter(model: FoldedGPT2, site: str, layer: Int[Tensor, " n"], masks: Tensor, into: Acts,
           source: Acts, prompt: Int[Tensor, " n"]) -> tuple[Float[Tensor, "n pos d_model"], int]:
    """Residual stream of every variant where it enters: half-step 2*layer + offset.

    Offsets: 0 = before the attention sublayer, 1 = before the MLP, 2 = before the next block.
    """
    n_var, batch = masks.shape[0], prompt.shape[0] // masks.shape[0]
    mask = masks.expand(n_var, batch, *masks.shape[2:]).flatten(0, 1)

    def clean(name: str) -> Tensor:
        return into[name][layer, prompt]

    def patched(name: str) -> Tensor:
        return torch.where(mask, source[name][layer, prompt], clean(name))

    offset = ENTRY_OFFSET[site]
    if site in ("resid_pre", "resid_mid", "resid_post"):
        return patched(site), offset
    if site == "mlp_out":
        return clean("resid_mid") + patched("mlp_out"), offset
    if site == "mlp_post":
        out = _per_layer(layer, patched("mlp_post"), lambda lay, a: fw.mlp_output(model, lay, a))
        return clean("resid_mid") + out, offset
    if site == "attn_out":
        return clean("resid_pre") + patched("attn_out"), offset
    z = patched("z") if site == "z" else _patched_z(site, patched, clean)
    out = _per_layer(layer, z, lambda lay, a: fw.attn_output(model, lay, a))
    return clean("resid_pre") + out, offset


def _per_layer(layer: Int[Tensor, " n"], acts: Tensor, fn) -> Tensor:
    """Apply a layer's own weights to each run of rows (rows are sorted by layer)."""
    layers, counts = torch.unique_consecutive(layer, return_counts=True)
    parts = [fn(int(lay), a) for lay, a in zip(layers.tolist(), acts.split(counts.tolist()))]
    return torch.cat(parts)


def _patched_z(site: str, patched, clean) -> Tensor:
    """Head outputs after patching q, k, v or the pattern of the attention layer."""
    if site == "pattern":
        return fw.mix_values(patched("pattern"), clean("v"))
    q, k, v = (patched(n) if n == site else clean(n) for n in ("q", "k", "v"))
    return fw.mix_values(fw.attention_pattern(q, k, fw.causal_mask(q.shape[1], q.device)), v)


def _first_patched_pos(site: str, masks: Tensor, n_pos: int) -> Int[Tensor, " variant"]:
    """First position each variant changes; rows before it are identical to the into run."""
    pos_dim = 3 if site == "pattern" else 2  # masks: [variant, batch, (head,) pos, ...]
    if masks.shape[pos_dim] == 1:  # broadcast over positions: all patched (if any)
        return torch.where(masks.flatten(1).any(1), 0, n_pos)
    hit = masks.movedim(pos_dim, 1).flatten(2).any(2)  # [variant, pos]
    first = torch.where(hit, torch.arange(n_pos, device=masks.device), n_pos)
    return first.min(1).values


# ---- attribution patching -----------------------------------------------------------------------
def _site_gradients(model: FoldedGPT2, tokens: Tensor, final_pos: Tensor, site: str,
                    answer_ids, foil_ids) -> Float[Tensor, "layer batch ..."]:
    """d (sum of logit diffs) / d activation at `site` of every layer, at the clean run."""
    with torch.inference_mode(False), torch.enable_grad():
        shift: list[Tensor] = []

        def hook(name: str, layer: int, act: Tensor) -> Tensor:
            if name != site:
                return act
            shift.append(torch.zeros_like(act, requires_grad=True))
            return act + shift[-1]

        acts = fw.trace(model, tokens.clone(), hook)
        direction, bias = model.logit_diff_direction(answer_ids.clone(), foil_ids.clone())
        metric = fw.read_logit_diff(model, fw.final_rows(acts["final"], final_pos.clone()),
                                    direction, bias).sum()
        grads = torch.autograd.grad(metric, shift)
    return torch.stack([g.detach() for g in grads])


