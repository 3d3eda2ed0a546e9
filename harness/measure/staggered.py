"""The staggered batched forward that every fast path shares, generic over a family's block ops.

Why it is fast (compared with TransformerLens's `patching` module, one full forward per cell):
every variant of a sweep starts where it first differs from the clean run: at the patched
layer (from the cached residual stream) and at the first patched position (earlier rows are
unchanged under causal attention, their keys and values come from the cache); variants entering
at different layers share one staggered batch, so each block's weights are used in one large
matrix product per chunk; the last block computes only the final rows, and the metric reads two
unembedding columns instead of the whole vocabulary.

A family plugs in by providing `BlockOps` (its projections, attention, MLP and readout on
plain tensors) and a clean `trace`; `StaggeredForward` turns those into the engine's Forward.
Two block shapes: the sequential pre-norm one (x + attn(x), then x + mlp(x)) and, where
`ops.parallel_block` is set (GPT-NeoX/Pythia, Phi), the parallel one (x + attn(x) + mlp(x),
both reading the block's input, no resid_mid): the whole block runs in the attention
half-step, and a patch inside a block enters the stream after that block.
"""

from __future__ import annotations

from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness import progress
from harness.measure.forward import Acts, Dims
from harness.measure.general_forward import GeneralForward
from harness.measure.patch_masks import Variants
from harness.measure.readout import Readout


class BlockOps(Protocol):
    """One family's block computations on plain tensors (weights read off the bridge once).

    q, k, v are [..., head, d_head] as the hooks see them (before any rotary embedding); k and
    v have the model's key/value heads. `qkv_flat` packs them side by side (q, then k, then v);
    `kv_flat` computes only the k and v columns (the last block needs no queries but one).
    `attend` and `attention_pattern` get the layer (Gemma 2's sliding window is per layer).
    `parallel_block`: the MLP reads the block's input (resid_pre), not attention's output.
    `head_output_weight`: W_O where `attn_output` is z.flatten(-2) @ W_O + b, linear in z;
    None where it is not (Gemma 2's norm after attention). `attn_output` and `mlp_output`
    with `add_to` (a residual stream) sum their output into it in place and return it.
    """

    parallel_block: bool
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    device: torch.device
    dtype: torch.dtype

    def qkv_flat(self, layer: int, resid: Float[Tensor, "... d_model"]
                 ) -> Float[Tensor, "... qkv"]: ...
    def split_qkv(self, flat: Float[Tensor, "... qkv"]) -> tuple[Tensor, Tensor, Tensor]: ...
    def kv_flat(self, layer: int, resid: Float[Tensor, "... d_model"]
                ) -> Float[Tensor, "... kv"]: ...
    def split_kv(self, flat: Float[Tensor, "... kv"]) -> tuple[Tensor, Tensor]: ...
    def attend(self, q: Float[Tensor, "n dest head d_head"], k: Tensor, v: Tensor,
               allowed: Tensor | None = None, q_pos: Tensor | None = None,
               layer: int | None = None) -> Float[Tensor, "n dest head d_head"]: ...
    def attention_pattern(self, q: Tensor, k: Tensor, layer: int | None = None
                          ) -> Float[Tensor, "n head dest src"]: ...
    def mix_values(self, pattern: Tensor, v: Tensor) -> Float[Tensor, "n dest head d_head"]: ...
    def attn_output(self, layer: int, z: Float[Tensor, "... head d_head"],
                    add_to: Tensor | None = None) -> Float[Tensor, "... d_model"]: ...
    def head_output_weight(self, layer: int) -> Float[Tensor, "hd d_model"] | None: ...
    def mlp_post(self, layer: int, resid_mid: Tensor) -> Float[Tensor, "... d_mlp"]: ...
    def mlp_output(self, layer: int, post: Tensor, add_to: Tensor | None = None
                   ) -> Float[Tensor, "... d_model"]: ...
    def logit_diff(self, resid: Float[Tensor, "n d_model"], answer_ids: Tensor,
                   foil_ids: Tensor) -> Float[Tensor, " n"]: ...
    def trace(self, tokens: Tensor, hook=None) -> dict[str, Tensor]: ...


class StaggeredForward:
    """The engine's Forward on a family's BlockOps (subclasses set path, ops, readout, dims)."""

    path: str
    ops: BlockOps
    dims: Dims
    readout: Readout

    def __init__(self, bridge):
        self.bridge = bridge
        self._general: GeneralForward | None = None

    def trace(self, tokens: Int[Tensor, "batch pos"]) -> Acts:
        """Every site of every layer (q, k, v as views of one packed "qkv"), plus "final"."""
        with torch.no_grad():
            acts = self.ops.trace(tokens.to(self.ops.device))
            q, k, v = (acts.pop(n) for n in ("q", "k", "v"))
            acts["qkv"] = torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], -1)
            acts["q"], acts["k"], acts["v"] = self.ops.split_qkv(acts["qkv"])  # views
        return acts

    def read_clean(self, acts: Acts, final_pos: Tensor, answer_ids: Tensor, foil_ids: Tensor
                   ) -> Float[Tensor, " batch"]:
        with torch.no_grad():
            return self.ops.logit_diff(final_rows(acts["final"], final_pos),
                                       answer_ids.to(self.ops.device),
                                       foil_ids.to(self.ops.device))

    def run_variants(self, tokens: Tensor, final_pos: Tensor, into: Acts, source: Acts,
                     variants: Variants, answer_ids: Tensor, foil_ids: Tensor, work_bytes: int
                     ) -> Float[Tensor, "variant batch"]:
        """Patched logit diffs of every variant, in chunks that fit `work_bytes`."""
        ops = self.ops
        chunk = _chunk_size(ops, tokens.shape, work_bytes)
        order = torch.argsort(variants.layers, stable=True)
        out = torch.empty(len(variants), tokens.shape[0], device=ops.device)
        done = progress.steps(len(variants))
        with torch.no_grad():
            for i in range(0, len(variants), chunk):
                idx = order[i:i + chunk]
                out[idx] = _run_chunk(ops, into, source, variants.take(idx), final_pos,
                                      answer_ids, foil_ids).to(out.dtype)
                done(len(idx))
        return out.cpu()

    def patch_layers(self, tokens, final_pos, site, masks, source, answer_ids, foil_ids):
        """Patches spanning several layers: through the bridge's hooks (one forward)."""
        return self._hooked().patch_layers(tokens, final_pos, site, masks, source, answer_ids,
                                           foil_ids)

    def patch_layers_each(self, tokens, final_pos, site, masks, source, answer_ids, foil_ids,
                          work_bytes):
        """Several such patches, stacked along the batch of the bridge's hooked forward."""
        return self._hooked().patch_layers_each(tokens, final_pos, site, masks, source,
                                                answer_ids, foil_ids, work_bytes)

    def _hooked(self) -> GeneralForward:
        if self._general is None:
            self._general = GeneralForward(self.bridge)
        self._general.readout = self.readout  # the verified one (e.g. Gemma's 1 + w norm)
        return self._general

    def site_gradients(self, tokens, final_pos, site, answer_ids, foil_ids):
        return site_gradients(self.ops, tokens, final_pos, site, answer_ids, foil_ids)


def final_rows(resid: Float[Tensor, "batch pos d_model"], final_pos: Int[Tensor, " batch"]
               ) -> Float[Tensor, "batch d_model"]:
    return resid[torch.arange(resid.shape[0], device=resid.device), final_pos.to(resid.device)]


def _chunk_size(ops: BlockOps, shape, work_bytes: int) -> int:
    """Variants per chunk: a generous estimate of the live tensors one variant needs."""
    batch, n_pos = shape
    per_row = 8 * ops.d_model + 3 * ops.d_mlp + 4 * ops.n_heads * n_pos
    per_variant = torch.empty((), dtype=ops.dtype).element_size() * batch * n_pos * per_row
    return max(1, int(work_bytes // per_variant))


# ---- staggered batched forward ------------------------------------------------------------------
def _run_chunk(ops: BlockOps, into: Acts, source: Acts, variants: Variants,
               final_pos: Tensor, answer_ids: Tensor, foil_ids: Tensor
               ) -> Float[Tensor, "variant batch"]:
    """Enter every variant where it first differs, run the blocks once for all, read the metric.

    `variants` are sorted by layer, so entries are non-decreasing along the batch.
    """
    batch, device, n_var = final_pos.shape[0], ops.device, len(variants)
    masks = variants.masks.to(device)
    layer = variants.layers.to(device).repeat_interleave(batch)  # per row of the batch
    prompt = torch.arange(batch, device=device).repeat(n_var)
    x, offset = _enter(ops, variants.site, layer, masks, into, source, prompt)
    start = _first_patched_pos(variants.site, masks, x.shape[1]).repeat_interleave(batch)
    final = _run_blocks(ops, into, x, 2 * layer + offset, start, prompt,
                        final_pos.to(device)[prompt])
    return ops.logit_diff(final, answer_ids.to(device)[prompt],
                          foil_ids.to(device)[prompt]).reshape(n_var, batch)


def _run_blocks(ops: BlockOps, into: Acts, x: Float[Tensor, "n pos d_model"],
                enter_at: Int[Tensor, " n"], start: Int[Tensor, " n"], prompt: Int[Tensor, " n"],
                final_pos: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
    """Half-steps (attention, MLP) of every block from the earliest entry; returns final rows.

    Variants that have entered form a prefix of the batch. Row (n, t) is computed only once
    variant n has entered and t >= start[n]; the other rows equal the into run's, and their
    keys and values are read from its trace. The last block computes the final rows only.
    """
    n_pos, last = x.shape[1], ops.n_layers - 1
    entered = torch.searchsorted(enter_at, torch.arange(2 * last, device=x.device),
                                 right=True).tolist()
    keep_rows = (start > 0).nonzero()  # variants that keep some of the into run's rows
    all_changed = int(keep_rows[0, 0]) if len(keep_rows) else len(start)  # those before: all
    for step in range(int(enter_at[0]), 2 * last):
        if step % 2 and ops.parallel_block:  # the MLP ran beside the attention
            continue
        layer, n = step // 2, entered[step]
        flat = None if n <= all_changed else _changed_rows(start[:n], n_pos)
        if step % 2 == 0:  # both steps write into x
            clean_qkv = None if flat is None else into["qkv"][layer][prompt[:n]]
            _attention_step(ops, layer, x[:n], flat, clean_qkv)
        else:
            _mlp_step(ops, layer, x[:n], flat)
    return _last_block(ops, into, x, enter_at, start, prompt, final_pos)


def _attention_step(ops: BlockOps, layer: int, x: Tensor, flat: Tensor | None,
                    clean_qkv: Float[Tensor, "n pos qkv"] | None) -> Tensor:
    """Attention sublayer on the rows `flat` of x viewed as [n*pos, d] (None: every row), in
    place; `clean_qkv`, the into run's q/k/v of these variants' prompts, only with `flat`."""
    if flat is None:
        q, k, v = ops.split_qkv(ops.qkv_flat(layer, x))
        return _add_attention(ops, layer, x, ops.attend(q, k, v, layer=layer))
    n, n_pos, d_model = x.shape
    rows = x.reshape(-1, d_model).index_select(0, flat)
    q, k, v = ops.split_qkv(_over_clean(ops, layer, rows, flat, clean_qkv))
    z = ops.attend(q, k, v, layer=layer)
    z = z.reshape(n * n_pos, *z.shape[2:]).index_select(0, flat)
    out = _add_attention(ops, layer, rows, z)
    x.view(-1, d_model).index_copy_(0, flat, out)  # in place: x is a prefix of the batch
    return x


def _add_attention(ops: BlockOps, layer: int, x: Tensor, z: Float[Tensor, "... head d_head"]
                   ) -> Tensor:
    """x, in place, made the residual after the attention sublayer with head outputs z (its
    output product accumulates into x); on a parallel block, after the whole block (its MLP
    reads the same input x), summed in the order the HF blocks use and copied into x."""
    if ops.parallel_block:
        return x.copy_(ops.mlp_output(layer, ops.mlp_post(layer, x)) + ops.attn_output(layer, z)
                       + x)
    return ops.attn_output(layer, z, add_to=x)


def _mlp_step(ops: BlockOps, layer: int, x: Tensor, flat: Tensor | None) -> Tensor:
    """MLP sublayer on the rows `flat` of x (None: every row), in place."""
    if flat is None:
        return ops.mlp_output(layer, ops.mlp_post(layer, x), add_to=x)
    n, n_pos, d_model = x.shape
    rows = x.reshape(-1, d_model).index_select(0, flat)
    out = ops.mlp_output(layer, ops.mlp_post(layer, rows), add_to=rows)
    x.view(-1, d_model).index_copy_(0, flat, out)
    return x


def _last_block(ops: BlockOps, into: Acts, x: Tensor, enter_at: Tensor, start: Tensor,
                prompt: Tensor, final_pos: Tensor) -> Float[Tensor, "n d_model"]:
    """Last block, final rows only: keys/values for the changed rows, one query per variant.

    Entries are sorted, so the variants that pass through the last attention (or MLP) are a
    prefix of the batch: slices, not masked copies."""
    layer, (n, n_pos, d_model) = ops.n_layers - 1, x.shape
    in_attn = int((enter_at <= 2 * layer).sum())
    final = torch.arange(n, device=x.device) * n_pos + final_pos
    resid = x.reshape(-1, d_model)[final]
    unchanged = (enter_at <= 2 * layer) & (final_pos < start)  # the into run's residual
    resid = torch.where(unchanged[:, None], into["resid_pre"][layer][prompt, final_pos], resid)
    if in_attn:
        mine = slice(0, in_attn)
        k, v = _keys_values(ops, into, layer, x[mine], start[mine], prompt[mine])
        q = ops.split_qkv(ops.qkv_flat(layer, resid[mine]))[0]
        pos = torch.arange(n_pos, device=x.device)
        allowed = (pos[None] <= final_pos[mine, None])[:, None, None, :]
        z = ops.attend(q[:, None], k, v, allowed, q_pos=final_pos[mine], layer=layer)[:, 0]
        _add_attention(ops, layer, resid[mine], z)   # a view: in place
    if ops.parallel_block:  # the MLP ran with the attention
        return resid
    in_mlp = int((enter_at <= 2 * layer + 1).sum())
    ops.mlp_output(layer, ops.mlp_post(layer, resid[:in_mlp]), add_to=resid[:in_mlp])
    return resid


def _keys_values(ops: BlockOps, into: Acts, layer: int, x: Float[Tensor, "n pos d_model"],
                 start: Int[Tensor, " n"], prompt: Int[Tensor, " n"]) -> tuple[Tensor, Tensor]:
    """k and v of x's rows from `start` on, the into run's before it. When every row
    changed (a head sweep) only the k and v columns are computed, with no gather: the
    queries of all rows but the final one would be a third of the product (GPT-2), unread."""
    flat = _changed_rows(start, x.shape[1])
    if flat is None:
        return ops.split_kv(ops.kv_flat(layer, x))
    rows = x.reshape(-1, x.shape[-1]).index_select(0, flat)
    return ops.split_qkv(_over_clean(ops, layer, rows, flat, into["qkv"][layer][prompt]))[1:]


def _changed_rows(start: Int[Tensor, " n"], n_pos: int) -> Int[Tensor, " rows"] | None:
    """Flat indices (into n * pos) of each variant's rows from its `start` on; None when
    that is every row."""
    changed = (torch.arange(n_pos, device=start.device)[None] >= start[:, None]).flatten()
    return None if bool(changed.all()) else changed.nonzero().squeeze(1)


def _over_clean(ops: BlockOps, layer: int, rows: Float[Tensor, "rows d_model"],
                flat: Int[Tensor, " rows"], clean_qkv: Float[Tensor, "n pos qkv"]
                ) -> Float[Tensor, "n pos qkv"]:
    """The packed q/k/v of `rows` (at the flat indices `flat`) written over the clean ones."""
    new = ops.qkv_flat(layer, rows)
    return clean_qkv.reshape(-1, clean_qkv.shape[-1]).index_copy_(0, flat, new).view(
        *clean_qkv.shape)


ENTRY_OFFSET = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2, "attn_out": 1, "z": 1, "q": 1,
                "k": 1, "v": 1, "pattern": 1, "mlp_post": 2, "mlp_out": 2}


def _enter(ops: BlockOps, site: str, layer: Int[Tensor, " n"], masks: Tensor, into: Acts,
           source: Acts, prompt: Int[Tensor, " n"]) -> tuple[Float[Tensor, "n pos d_model"], int]:
    """Residual stream of every variant where it enters: half-step 2*layer + offset.

    Offsets: 0 = before the attention sublayer, 1 = before the MLP, 2 = before the next block;
    on a parallel block every site inside the block enters at 2 (its resid_post).
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
    if site in ("mlp_out", "mlp_post"):
        mlp = patched("mlp_out") if site == "mlp_out" else \
            _per_layer(layer, patched("mlp_post"), ops.mlp_output)
        if ops.parallel_block:  # resid_post, as the block sums it
            return mlp + clean("attn_out") + clean("resid_pre"), 2
        return clean("resid_mid") + mlp, offset
    if site == "z":
        entry = _one_head_entry(ops, layer, mask, into, source, prompt)
        if entry is not None:
            return entry, 2 if ops.parallel_block else offset
    if site == "attn_out":
        attn = patched("attn_out")
    else:
        z = patched("z") if site == "z" else _patched_z(ops, site, layer, patched, clean)
        attn = _per_layer(layer, z, ops.attn_output)
    if ops.parallel_block:
        return clean("mlp_out") + attn + clean("resid_pre"), 2
    return clean("resid_pre") + attn, offset


def _one_head_entry(ops: BlockOps, layer: Int[Tensor, " n"], mask: Tensor, into: Acts,
                    source: Acts, prompt: Int[Tensor, " n"]
                    ) -> Float[Tensor, "n pos d_model"] | None:
    """The residual stream where a z patch enters, when every variant patches one head (a
    head sweep): the into run's (resid_mid; resid_post on a parallel block) plus that head's
    change of z through its own d_head rows of W_O, a 1/n_heads share of the full output
    product, summed into it as the product runs. None where a variant patches several heads
    or the family's attention output is not linear in z."""
    z_clean = into["z"]
    mask = mask.expand(prompt.shape[0], *z_clean.shape[2:])           # [n, pos, head, d_head]
    touched = mask.any(-1).any(1)                                      # [n, head]
    if bool((touched.sum(1) > 1).any()):
        return None
    layers, counts = (t.tolist() for t in torch.unique_consecutive(layer, return_counts=True))
    weights = [ops.head_output_weight(lay) for lay in layers]
    if any(w is None for w in weights):
        return None
    head, n_heads = touched.int().argmax(1), z_clean.shape[3]
    rows = torch.arange(len(head), device=head.device)
    dz = torch.where(mask[rows, :, head],                              # [n, pos, d_head]
                     source["z"][layer, prompt, :, head] - z_clean[layer, prompt, :, head], 0)
    resid = into["resid_post" if ops.parallel_block else "resid_mid"][layer, prompt]  # a copy
    for d, h, w, out in zip(dz.split(counts), head.split(counts), weights, resid.split(counts)):
        _through_heads(d, h, w.unflatten(0, (n_heads, -1)), out)
    return resid


def _through_heads(dz: Float[Tensor, "n pos d_head"], head: Int[Tensor, " n"],
                   w_o: Float[Tensor, "head d_head d_model"],
                   add_to: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n pos d_model"]:
    """Each row's dz through its own head's rows of W_O, summed into `add_to` (contiguous)
    in place. Rows in equal runs head by head (a head sweep's layer) meet W_O as it lies, in
    one batched product; others meet a gathered copy of their heads' rows (a strided
    gather: several times slower, an ad hoc timing)."""
    n_heads = w_o.shape[0]
    per_head = len(head) // n_heads
    in_runs = torch.arange(n_heads, device=head.device).repeat_interleave(per_head)
    if per_head and len(head) == len(in_runs) and torch.equal(head, in_runs):
        add_to.view(n_heads, -1, add_to.shape[-1]).baddbmm_(
            dz.reshape(n_heads, -1, dz.shape[-1]), w_o)
        return add_to
    return add_to.baddbmm_(dz, w_o[head])


def _per_layer(layer: Int[Tensor, " n"], acts: Tensor, fn) -> Tensor:
    """Apply a layer's own weights to each run of rows (rows are sorted by layer)."""
    layers, counts = torch.unique_consecutive(layer, return_counts=True)
    parts = [fn(int(lay), a) for lay, a in zip(layers.tolist(), acts.split(counts.tolist()))]
    return torch.cat(parts)


def _patched_z(ops: BlockOps, site: str, layer: Int[Tensor, " n"], patched, clean) -> Tensor:
    """Head outputs after patching q, k, v or the pattern of the attention layer (rows sorted
    by layer; each run of rows attends with its own layer's pattern)."""
    if site == "pattern":
        return ops.mix_values(patched("pattern"), clean("v"))
    q, k, v = (patched(n) if n == site else clean(n) for n in ("q", "k", "v"))
    layers, counts = torch.unique_consecutive(layer, return_counts=True)
    parts = zip(layers.tolist(), *(t.split(counts.tolist()) for t in (q, k, v)))
    return torch.cat([ops.mix_values(ops.attention_pattern(q_, k_, layer=lay), v_)
                      for lay, q_, k_, v_ in parts])


def _first_patched_pos(site: str, masks: Tensor, n_pos: int) -> Int[Tensor, " variant"]:
    """First position each variant changes; rows before it are identical to the into run."""
    pos_dim = 3 if site == "pattern" else 2  # masks: [variant, batch, (head,) pos, ...]
    if masks.shape[pos_dim] == 1:  # broadcast over positions: all patched (if any)
        return torch.where(masks.flatten(1).any(1), 0, n_pos)
    hit = masks.movedim(pos_dim, 1).flatten(2).any(2)  # [variant, pos]
    first = torch.where(hit, torch.arange(n_pos, device=masks.device), n_pos)
    return first.min(1).values


# ---- attribution patching -----------------------------------------------------------------------
def site_gradients(ops: BlockOps, tokens: Tensor, final_pos: Tensor, site: str,
                   answer_ids, foil_ids) -> Float[Tensor, "layer batch ..."]:
    """d (sum of logit diffs) / d activation at `site` of every layer, at the clean run."""
    with torch.inference_mode(False), torch.enable_grad():
        shift: list[Tensor] = []

        def hook(name: str, layer: int, act: Tensor) -> Tensor:
            if name != site:
                return act
            shift.append(torch.zeros_like(act, requires_grad=True))
            return act + shift[-1]

        acts = ops.trace(tokens.clone().to(ops.device), hook)
        metric = ops.logit_diff(final_rows(acts["final"], final_pos.clone()),
                                answer_ids.clone().to(ops.device),
                                foil_ids.clone().to(ops.device)).sum()
        grads = torch.autograd.grad(metric, shift)
    return torch.stack([g.detach() for g in grads])
