"""Activation patching, sweeps and ablations: one batched engine behind all three.

A *run* is a model and a token batch. Patching copies activations of a `from` run into an
`into` run (different models on the same tokens, or clean -> corrupt tokens on one model) and
reads the into model's logit difference (answer - foil) at each prompt's final position.

Why it is fast (compared with TransformerLens's `patching` module, one full forward per cell):
- clean runs are traced once per (model key, tokens) and shared by every claim;
- every variant of a sweep starts where it first differs from the clean run: at the patched
  layer (from the cached residual stream) and at the first patched position (earlier rows are
  unchanged under causal attention, their keys and values come from the cache);
- variants entering at different layers share one staggered batch, so each block's weights are
  used in one large matrix product per chunk;
- the last block computes only the final rows, and the metric reads two unembedding columns
  instead of the whole vocabulary.
Chunks of variants are sized to `memory_budget_mb`. Patches spanning several layers (e.g. heads
L3H0 + L5H1) run through the bridge's own hooks instead: one forward, no shortcut needed.

Positions: non-negative positions are columns of the (right-padded) token tensor, as in
TransformerLens; negative positions count back from each prompt's final token (-1 = final_pos).
Sweep position labels are the into run's first prompt as token strings
(`bridge.to_str_tokens`, falling back to ints); `Grid.extras["positions"]` has the ints.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from harness.errors import MeasureError, did_you_mean
from harness.measure import gpt2_forward as fw
from harness.measure.budget import CACHE_SHARE, SLICE_SHARE, WORK_SHARE, budget_bytes
from harness.measure.gpt2_forward import HEAD_SITES, SITES, FoldedGPT2
from harness.measure.logits import logit_diff_reader, read_final_logits
from harness.measure.results import Grid, PatchEffect, normalized_effect

OVERS = (("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"))
BRIDGE_HOOKS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
                "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
                "mlp_out": "hook_mlp_out", "q": "attn.hook_q", "k": "attn.hook_k",
                "v": "attn.hook_v", "z": "attn.hook_z", "pattern": "attn.hook_pattern",
                "mlp_post": "mlp.hook_post"}
Acts = dict[str, Tensor]  # site -> [layer, batch, ...], as produced by gpt2_forward.trace


@dataclass(frozen=True, eq=False)
class Run:
    """A model (identified by `key` for caching) applied to a right-padded token batch."""

    key: str
    bridge: Any
    tokens: Int[Tensor, "batch pos"]
    final_pos: Int[Tensor, " batch"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def rows(self, rows: slice) -> Run:
        """The same model on some of the prompts."""
        return Run(self.key, self.bridge, self.tokens[rows], self.final_pos[rows])


@dataclass(frozen=True)
class _Variants:
    """Single-layer patches of one site: variant i patches `layers[i]` where `masks[i]` is True.

    masks: [variant, batch or 1, *site dims without batch], broadcastable to the activation.
    """

    site: str
    layers: Int[Tensor, " variant"]
    masks: Bool[Tensor, "variant ..."]

    def __len__(self) -> int:
        return len(self.layers)


class PatchingEngine:
    """Shared clean runs and batched patching; one engine per evaluation session.

    Memory: `memory_budget_mb` bounds the activations the engine holds at any time (weights are
    not counted), shared as `harness.measure.budget` says: clean traces kept between claims
    (least recently used dropped first), traces of prompt slices when a run's whole trace does
    not fit the cache, and batches of variants. Results are the same whatever the budget.
    """

    def __init__(self, memory_budget_mb: float = 2048, *, verify: bool = True):
        if memory_budget_mb <= 0:
            raise MeasureError(f"memory_budget_mb={memory_budget_mb} must be positive")
        self.memory_budget_mb = memory_budget_mb
        self.verify = verify
        self._models: dict[str, tuple[Any, FoldedGPT2]] = {}
        self._traces: OrderedDict[tuple[str, str], tuple[Acts, int]] = OrderedDict()
        self._verified: set[str] = set()

    def _bytes(self, share: float) -> int:
        return budget_bytes(self.memory_budget_mb, share)

    def cached_trace_bytes(self) -> int:
        """Bytes of the clean traces kept for later claims (at most the budget's cache share)."""
        return sum(size for _, size in self._traces.values())

    # ---- clean runs -------------------------------------------------------------------------
    def model(self, run: Run) -> FoldedGPT2:
        """The run's processed weights, read from the bridge once per model key."""
        if run.key not in self._models:
            self._models[run.key] = (run.bridge, FoldedGPT2.from_bridge(run.bridge))
        bridge, model = self._models[run.key]
        if bridge is not run.bridge:
            raise MeasureError(f"model key {run.key!r} names two different models in one "
                               "engine; give each model its own key")
        return model

    def clean(self, run: Run) -> Acts:
        """Every activation of the unpatched run: kept for later claims if it fits the budget.

        For runs of many prompts prefer `slices`, which bounds the memory of the traces.
        """
        key = (run.key, _tokens_hash(run.tokens))
        if key in self._traces:
            self._traces.move_to_end(key)
            return self._traces[key][0]
        size = fw.trace_nbytes(self.model(run), *run.shape)
        if size > self._bytes(CACHE_SHARE):
            return self._trace(run)
        self._evict(self._bytes(CACHE_SHARE) - size, keep=())
        self._traces[key] = (self._trace(run), size)
        return self._traces[key][0]

    def slices(self, *runs: Run) -> Iterator[tuple[slice, list[Run], list[Acts]]]:
        """The runs (of one batch size) in prompt slices whose clean traces fit the budget.

        Yields (prompts, runs restricted to them, their traces). One slice, with the traces
        kept for later claims, when the runs' whole traces fit the budget's cache share.
        """
        batch = runs[0].shape[0]
        keys = [(r.key, _tokens_hash(r.tokens)) for r in runs]
        sizes = {key: fw.trace_nbytes(self.model(r), *r.shape) for key, r in zip(keys, runs)}
        if sum(sizes.values()) <= self._bytes(CACHE_SHARE):
            missing = sum(size for key, size in sizes.items() if key not in self._traces)
            self._evict(self._bytes(CACHE_SHARE) - missing, keep=sizes.keys())
            yield slice(0, batch), list(runs), [self.clean(r) for r in runs]
            return
        per_prompt = sum(sizes.values()) / batch
        step = max(1, int(self._bytes(SLICE_SHARE) // per_prompt))
        for start in range(0, batch, step):
            rows = slice(start, min(start + step, batch))
            subs = [r.rows(rows) for r in runs]
            traces: dict[tuple[str, str], Acts] = {}
            for key, sub in zip(keys, subs):
                if key not in traces:  # from and into may be one run (e.g. ablations)
                    cached = self._traces.get(key)
                    traces[key] = _rows_of(cached[0], rows) if cached else self._trace(sub)
            yield rows, subs, [traces[key] for key in keys]

    def _trace(self, run: Run) -> Acts:
        model = self.model(run)
        with torch.no_grad():
            acts = fw.trace(model, run.tokens)
            acts["qkv"] = torch.stack([acts.pop("q"), acts.pop("k"), acts.pop("v")], 3)
            acts["q"], acts["k"], acts["v"] = acts["qkv"].unbind(3)  # views: no copies
        if self.verify and run.key not in self._verified:
            fw.check_against_bridge(model, run.bridge, run.tokens[:4], acts["final"][:4])
            self._verified.add(run.key)
        return acts

    def _evict(self, limit: float, keep) -> None:
        """Drop least recently used traces (not those in `keep`) until at most `limit` bytes."""
        for key in list(self._traces):
            if self.cached_trace_bytes() <= limit:
                return
            if key not in keep:
                del self._traces[key]

    def logit_diff(self, run: Run, answer_ids: Tensor, foil_ids: Tensor) -> Float[Tensor, " batch"]:
        """The clean per-prompt logit difference (answer - foil) at each final position."""
        return torch.cat([_read_clean(self.model(sub), acts, sub.final_pos, answer_ids[rows],
                                      foil_ids[rows]).cpu()
                          for rows, (sub,), (acts,) in self.slices(run)])

    # ---- public measurements ----------------------------------------------------------------
    def patch(self, from_run: Run, into_run: Run, answer_ids: Tensor, foil_ids: Tensor, *,
              site: str, layers: Sequence[int] | None = None, heads: Sequence | None = None,
              positions: Sequence[int] | None = None, neurons: Sequence[int] | None = None
              ) -> PatchEffect:
        """Copy `site` activations of `from_run` into `into_run` at the selection, all at once."""
        _check_pair(from_run, into_run)
        parts = []
        for rows, (fr, ir), (source, into) in self.slices(from_run, into_run):
            a, f = answer_ids[rows], foil_ids[rows]
            patched = self._patch_selection(source, ir, into, a, f, site=site, layers=layers,
                                            heads=heads, positions=positions, neurons=neurons)
            parts.append((patched, _read_clean(self.model(fr), source, fr.final_pos, a, f),
                          _read_clean(self.model(ir), into, ir.final_pos, a, f)))
        return _effect(*(torch.cat([p.cpu() for p in part], -1) for part in zip(*parts)))

    def ablate(self, run: Run, answer_ids: Tensor, foil_ids: Tensor, *, site: str,
               kind: str = "zero", layers: Sequence[int] | None = None,
               heads: Sequence | None = None, positions: Sequence[int] | None = None,
               neurons: Sequence[int] | None = None, reference: Tensor | float | None = None
               ) -> PatchEffect:
        """Zero- or mean-ablate a selection; effect = (ablated - clean) / (reference - clean).

        Mean ablation replaces each activation with its mean over the batch's prompts and real
        (non-padding) positions, per layer (attention patterns: mean over prompts only). With no
        `reference` the reference logit diff is 0, so 1 means the logit diff is fully destroyed.
        """
        if kind not in ("zero", "mean"):
            raise MeasureError(f"unknown ablation kind {kind!r}"
                               + did_you_mean(kind, ["zero", "mean"]))
        _check_site(site)
        mean = self._site_mean(run, site) if kind == "mean" else None
        patched, clean = [], []
        for rows, (sub,), (acts,) in self.slices(run):
            a, f = answer_ids[rows], foil_ids[rows]
            source = {site: (mean if mean is not None else acts[site].new_zeros(()))
                      .expand_as(acts[site])}
            patched.append(self._patch_selection(source, sub, acts, a, f, site=site,
                                                 layers=layers, heads=heads,
                                                 positions=positions, neurons=neurons).cpu())
            clean.append(_read_clean(self.model(sub), acts, sub.final_pos, a, f).cpu())
        clean_value = torch.cat(clean)
        ref = torch.as_tensor(0.0 if reference is None else reference, dtype=clean_value.dtype)
        return _effect(torch.cat(patched), ref.cpu().expand_as(clean_value), clean_value)

    def patch_sweep(self, from_run: Run, into_run: Run, answer_ids: Tensor, foil_ids: Tensor, *,
                    site: str, over: Sequence[str] = ("layer", "pos"), method: str = "exact",
                    layers: Sequence[int] | None = None) -> Grid:
        """One patch per cell of `over`; values = normalized effect, raw = patched logit diff.

        over=("layer",) patches every position of the layer at once. method="attribution" is
        the gradient (linear) approximation (act_from - act_into) . d metric / d act, taken at
        the into run: one forward and one backward pass, an approximation, not a patch.
        """
        over = _check_over(site, over)
        _check_pair(from_run, into_run)
        if method not in ("exact", "attribution"):
            raise MeasureError(f"unknown method {method!r}"
                               + did_you_mean(method, ["exact", "attribution"]))
        model = self.model(into_run)
        layer_list = _check_layers(layers, model.n_layers)
        shape = _grid_shape(over, len(layer_list), model.n_heads, into_run.shape[1])
        variants = _sweep_variants(site, over, layer_list, model.n_heads, into_run.shape[1])
        parts = []
        for rows, (fr, ir), (source, into) in self.slices(from_run, into_run):
            a, f = answer_ids[rows], foil_ids[rows]
            if method == "exact":
                patched = self._run_variants(ir, into, source, variants, a, f)
            else:
                patched = self._attribution(ir, source, into, site, over, layer_list, a, f)
            parts.append((patched, _read_clean(self.model(fr), source, fr.final_pos, a, f).cpu(),
                          _read_clean(model, into, ir.final_pos, a, f).cpu()))
        patched, from_value, into_value = (torch.cat(part, -1) for part in zip(*parts))
        return _sweep_grid(over, layer_list, model.n_heads, into_run,
                           patched.reshape(*shape, -1), from_value, into_value, method, site)

    # ---- the engine -------------------------------------------------------------------------
    def _patch_selection(self, source: Acts, into_run: Run, into: Acts, answer_ids, foil_ids, *,
                         site, layers, heads, positions, neurons) -> Tensor:
        """Patched logit diff per prompt for one selection (possibly spanning several layers)."""
        model = self.model(into_run)
        masks = selection_masks(site, model, into_run, layers=layers, heads=heads,
                                positions=positions, neurons=neurons)
        if len(masks) == 1:
            (layer, mask), = masks.items()
            variants = _Variants(site, torch.tensor([layer]), mask[None])
            return self._run_variants(into_run, into, source, variants, answer_ids, foil_ids)[0]
        return _patch_with_bridge(into_run, site, masks, source, answer_ids, foil_ids,
                                  self.memory_budget_mb)

    def _site_mean(self, run: Run, site: str) -> Tensor:
        """Mean of `site` over prompts and real positions (patterns: over prompts), per layer."""
        total, count = None, 0.0
        for _, (sub,), (acts,) in self.slices(run):
            part, n = _site_sum(acts[site], site, sub.final_pos)
            total, count = (part if total is None else total + part), count + n
        return total / count

    def _run_variants(self, into_run: Run, into: Acts, source: Acts, variants: _Variants,
                      answer_ids: Tensor, foil_ids: Tensor) -> Float[Tensor, "variant batch"]:
        """Patched logit diffs of every variant, in chunks that fit the memory budget."""
        model = self.model(into_run)
        chunk = self._chunk_size(model, into_run)
        order = torch.argsort(variants.layers, stable=True)
        out = torch.empty(len(variants), into_run.shape[0], device=model.device)
        with torch.no_grad():
            for i in range(0, len(variants), chunk):
                idx = order[i:i + chunk]
                part = _Variants(variants.site, variants.layers[idx], variants.masks[idx])
                out[idx] = _run_chunk(model, into, source, part, into_run.final_pos,
                                      answer_ids, foil_ids)
        return out.cpu()

    def _chunk_size(self, model: FoldedGPT2, run: Run) -> int:
        """Variants per chunk: a generous estimate of the live tensors one variant needs."""
        batch, n_pos = run.shape
        d_model, d_mlp = model.W_O.shape[-1], model.W_in.shape[-1]
        per_row = 8 * d_model + 3 * d_mlp + 4 * model.n_heads * n_pos
        per_variant = model.W_E.element_size() * batch * n_pos * per_row
        return max(1, int(self._bytes(WORK_SHARE) // per_variant))

    def _attribution(self, into_run: Run, source: Acts, into: Acts, site: str, over, layer_list,
                     answer_ids, foil_ids) -> Float[Tensor, "cells batch"]:
        """Linear approximation of every cell: (from - into) . gradient at the into run."""
        model = self.model(into_run)
        grads = _site_gradients(model, into_run, site, answer_ids, foil_ids)
        with torch.no_grad():
            delta = (source[site] - into[site]) * grads
            cells = _reduce_cells(delta[layer_list], site, over)  # [layer, batch, ...]
            cells = cells.movedim(1, -1).flatten(0, -2)
            base = _read_clean(model, into, into_run.final_pos, answer_ids, foil_ids)
        return (base + cells).cpu()


def _read_clean(model: FoldedGPT2, acts: Acts, final_pos: Tensor, answer_ids: Tensor,
                foil_ids: Tensor) -> Float[Tensor, " batch"]:
    """The clean logit difference of a traced run at each prompt's final position."""
    direction, bias = model.logit_diff_direction(answer_ids, foil_ids)
    with torch.no_grad():
        return fw.read_logit_diff(model, fw.final_rows(acts["final"], final_pos), direction, bias)


def _rows_of(acts: Acts, rows: slice) -> Acts:
    """A trace restricted to some prompts (views: every site but "final" is [layer, batch, ...])."""
    return {name: t[rows] if name == "final" else t[:, rows] for name, t in acts.items()}


def _site_sum(acts: Tensor, site: str, final_pos: Tensor) -> tuple[Tensor, float]:
    """Sum of a site's activations over prompts and real positions, and how many were summed."""
    if site == "pattern":
        return acts.sum(1, keepdim=True), float(acts.shape[1])
    pos = torch.arange(acts.shape[2], device=acts.device)
    real = (pos[None] <= final_pos.to(acts.device)[:, None]).to(acts.dtype)  # [batch, pos]
    count = float(real.sum())
    real = real.reshape(1, *real.shape, *[1] * (acts.dim() - 3))
    return (acts * real).sum((1, 2), keepdim=True), count


# ---- staggered batched forward ------------------------------------------------------------------
def _run_chunk(model: FoldedGPT2, into: Acts, source: Acts, variants: _Variants,
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


# ---- selections ---------------------------------------------------------------------------------
def site_shape(site: str, model: FoldedGPT2, n_pos: int) -> tuple[int, ...]:
    """Mask shape of one layer's activation without the batch axis (1 = broadcast)."""
    if site in ("q", "k", "v", "z"):
        return (n_pos, model.n_heads, 1)
    if site == "pattern":
        return (model.n_heads, n_pos, 1)
    if site == "mlp_post":
        return (n_pos, model.W_in.shape[-1])
    return (n_pos, 1)


def selection_masks(site: str, model: FoldedGPT2, run: Run, *, layers=None, heads=None,
                    positions=None, neurons=None) -> dict[int, Bool[Tensor, "batch ..."]]:
    """layer -> boolean mask [batch or 1, *site dims] of the activations a selection patches."""
    _check_site(site)
    head_sets = _heads_by_layer(heads, model) if heads is not None else None
    if head_sets is not None and site not in HEAD_SITES:
        raise MeasureError(f"heads= selects attention heads; site {site!r} has none "
                           f"(use one of {', '.join(HEAD_SITES)})")
    if neurons is not None and site != "mlp_post":
        raise MeasureError(f"neurons= applies to site 'mlp_post', not {site!r}")
    layer_list = sorted(head_sets) if head_sets is not None else layers
    if not layer_list:
        raise MeasureError("a patch needs layers= (or heads=) to say where to patch")
    layer_list = _check_layers(layer_list, model.n_layers)
    pos_mask = _position_mask(positions, run)
    return {layer: _mask_for(site, model, run.shape[1], pos_mask,
                             None if head_sets is None else head_sets[layer], neurons)
            for layer in layer_list}


def _mask_for(site, model, n_pos, pos_mask: Tensor, heads, neurons) -> Tensor:
    shape = site_shape(site, model, n_pos)
    mask = torch.ones((1, *shape), dtype=torch.bool, device=model.device)
    pos = pos_mask.to(model.device)  # [batch or 1, pos]
    if site == "pattern":
        mask = mask & pos[:, None, :, None]
    else:
        mask = mask & pos.reshape(pos.shape[0], n_pos, *[1] * (len(shape) - 1))
    if heads is not None:
        head_mask = torch.zeros(model.n_heads, dtype=torch.bool, device=model.device)
        head_mask[list(heads)] = True
        mask = mask & (head_mask[:, None, None] if site == "pattern" else head_mask[:, None])
    if neurons is not None:
        _check_range("neuron", neurons, shape[-1])
        neuron_mask = torch.zeros(shape[-1], dtype=torch.bool, device=model.device)
        neuron_mask[list(neurons)] = True
        mask = mask & neuron_mask
    return mask


def _position_mask(positions, run: Run) -> Bool[Tensor, "batch_or_1 pos"]:
    """Non-negative: token columns; negative: counted back from each prompt's final token."""
    batch, n_pos = run.shape
    if positions is None:
        return torch.ones(1, n_pos, dtype=torch.bool)
    mask = torch.zeros(batch, n_pos, dtype=torch.bool)
    final_pos = run.final_pos.cpu()
    for p in positions:
        cols = final_pos + 1 + int(p) if p < 0 else torch.full((batch,), int(p))
        if (cols < 0).any() or (cols >= n_pos).any():
            raise MeasureError(f"position {p} is outside the prompts (length {n_pos})")
        mask[torch.arange(batch), cols] = True
    return mask


def _heads_by_layer(heads, model: FoldedGPT2) -> dict[int, list[int]]:
    """Heads given as (layer, head) pairs or 'L10H4' strings -> {layer: [head, ...]}."""
    out: dict[int, list[int]] = {}
    for h in heads:
        if isinstance(h, str):
            m = re.fullmatch(r"L(\d+)H(\d+)", h.strip())
            if not m:
                raise MeasureError(f"head {h!r} must look like 'L3H0' (layer 3, head 0)")
            layer, head = int(m.group(1)), int(m.group(2))
        else:
            layer, head = (int(x) for x in h)
        _check_range("layer", [layer], model.n_layers)
        _check_range("head", [head], model.n_heads)
        out.setdefault(layer, []).append(head)
    return out


def _sweep_variants(site: str, over, layer_list: list[int], n_heads: int, n_pos: int
                    ) -> _Variants:
    """One variant per grid cell, in the grid's row-major order."""
    n_layers = len(layer_list)
    eye_pos = torch.eye(n_pos, dtype=torch.bool)
    eye_head = torch.eye(n_heads, dtype=torch.bool)
    pattern = site == "pattern"
    if over == ("layer",):
        cells = torch.ones(1, *([1] * (3 if site in HEAD_SITES else 2)), dtype=torch.bool)
    elif over == ("layer", "pos"):
        cells = eye_pos[:, None, :, None] if pattern else (
            eye_pos[:, :, None, None] if site in HEAD_SITES else eye_pos[:, :, None])
    elif over == ("layer", "head"):
        cells = eye_head[:, :, None, None] if pattern else eye_head[:, None, :, None]
    else:  # layer, head, pos
        both = eye_head[:, None, :, None] & eye_pos[None, :, None, :]  # [h, p, head, pos]
        cells = both[..., None] if pattern else both.transpose(-1, -2)[..., None]
        cells = cells.flatten(0, 1)
    cells = cells[:, None]  # batch axis
    masks = cells.repeat(n_layers, *[1] * (cells.dim() - 1))
    layers = torch.tensor(layer_list).repeat_interleave(cells.shape[0])
    return _Variants(site, layers, masks)


# ---- multi-layer patches through the bridge -----------------------------------------------------
def _patch_with_bridge(run: Run, site: str, masks: dict[int, Tensor], source: Acts,
                       answer_ids: Tensor, foil_ids: Tensor, memory_budget_mb: float
                       ) -> Float[Tensor, " batch"]:
    """Hooked forwards of the bridge for patches spanning several layers, in prompt slices
    within the budget's work share (the slice's traces hold the rest)."""
    def hooks_for(rows: slice):
        def hook_for(layer: int):
            mask = masks[layer] if masks[layer].shape[0] == 1 else masks[layer][rows]
            new = source[site][layer][rows]

            def hook(act, hook):
                return torch.where(mask.to(act.device), new.to(act.device, act.dtype), act)
            return hook

        return [(f"blocks.{layer}.{BRIDGE_HOOKS[site]}", hook_for(layer)) for layer in masks]

    return read_final_logits(run.bridge, run.tokens, run.final_pos,
                             logit_diff_reader(answer_ids, foil_ids), memory_budget_mb,
                             share=WORK_SHARE, hooks_for=hooks_for)


# ---- attribution patching -----------------------------------------------------------------------
def _site_gradients(model: FoldedGPT2, run: Run, site: str, answer_ids, foil_ids
                    ) -> Float[Tensor, "layer batch ..."]:
    """d (sum of logit diffs) / d activation at `site` of every layer, at the clean run."""
    with torch.inference_mode(False), torch.enable_grad():
        shift: list[Tensor] = []

        def hook(name: str, layer: int, act: Tensor) -> Tensor:
            if name != site:
                return act
            shift.append(torch.zeros_like(act, requires_grad=True))
            return act + shift[-1]

        acts = fw.trace(model, run.tokens.clone(), hook)
        direction, bias = model.logit_diff_direction(answer_ids.clone(), foil_ids.clone())
        metric = fw.read_logit_diff(model, fw.final_rows(acts["final"], run.final_pos.clone()),
                                    direction, bias).sum()
        grads = torch.autograd.grad(metric, shift)
    return torch.stack([g.detach() for g in grads])


def _reduce_cells(delta: Tensor, site: str, over) -> Float[Tensor, "layer batch ..."]:
    """Sum (from - into) * grad over everything a cell covers; keep layer, batch, cell axes."""
    if site == "pattern":  # [L, B, head, dest, src]
        by = {("layer",): delta.sum((2, 3, 4)), ("layer", "pos"): delta.sum((2, 4)),
              ("layer", "head"): delta.sum((3, 4)), ("layer", "head", "pos"): delta.sum(4)}
    elif site in HEAD_SITES:  # [L, B, pos, head, d_head]
        by = {("layer",): delta.sum((2, 3, 4)), ("layer", "pos"): delta.sum((3, 4)),
              ("layer", "head"): delta.sum((2, 4)),
              ("layer", "head", "pos"): delta.sum(4).transpose(2, 3)}
    else:  # [L, B, pos, features]
        by = {("layer",): delta.sum((2, 3)), ("layer", "pos"): delta.sum(3)}
    return by[tuple(over)]


# ---- results ------------------------------------------------------------------------------------
def _effect(patched: Tensor, from_value: Tensor, into_value: Tensor) -> PatchEffect:
    patched, from_value, into_value = patched.cpu(), from_value.cpu(), into_value.cpu()
    return PatchEffect(normalized=float(normalized_effect(patched, from_value, into_value)),
                       patched=patched, from_value=from_value, into_value=into_value)


def _grid_shape(over, n_layers: int, n_heads: int, n_pos: int) -> tuple[int, ...]:
    sizes = {"layer": n_layers, "head": n_heads, "pos": n_pos}
    return tuple(sizes[a] for a in over)


def _sweep_grid(over, layer_list, n_heads, into_run: Run, patched: Tensor, from_value: Tensor,
                into_value: Tensor, method: str, site: str) -> Grid:
    labels = {"layer": tuple(layer_list), "head": tuple(range(n_heads)),
              "pos": _pos_labels(into_run)}
    from_value, into_value = from_value.cpu(), into_value.cpu()
    extras = {"from": float(from_value.mean()), "into": float(into_value.mean()), "site": site,
              "positions": tuple(range(into_run.shape[1])), "per_prompt": patched,
              "approximation": method == "attribution"}
    return Grid(axes=tuple(over), labels=tuple(labels[a] for a in over),
                values=normalized_effect(patched, from_value, into_value),
                raw=patched.mean(-1), method=method, extras=extras)


def _pos_labels(run: Run) -> tuple:
    try:
        labels = tuple(run.bridge.to_str_tokens(run.tokens[0]))
        if len(labels) == run.shape[1]:
            return labels
    except Exception:  # a bridge without a tokenizer: fall back to column numbers
        pass
    return tuple(range(run.shape[1]))


# ---- validation ---------------------------------------------------------------------------------
def _check_site(site: str) -> None:
    if site not in SITES:
        raise MeasureError(f"unknown site {site!r}" + did_you_mean(site, SITES))


def _check_over(site: str, over) -> tuple[str, ...]:
    _check_site(site)
    over = tuple(over)
    if over not in OVERS:
        raise MeasureError(f"over={list(over)} is not a sweep; use one of "
                           + ", ".join(str(list(o)) for o in OVERS))
    if "head" in over and site not in HEAD_SITES:
        raise MeasureError(f"over={list(over)} needs a head site ({', '.join(HEAD_SITES)}), "
                           f"not {site!r}")
    return over


def _check_pair(from_run: Run, into_run: Run) -> None:
    if from_run.shape != into_run.shape:
        raise MeasureError(f"patching needs from and into runs of equal token shape (batch, "
                           f"length); got {from_run.shape} and {into_run.shape}: pad the prompts "
                           "to the same length")


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = [int(x) for x in layers]
    _check_range("layer", layers, n_layers)
    return sorted(set(layers))


def _check_range(what: str, values, size: int) -> None:
    for v in values:
        if not 0 <= int(v) < size:
            raise MeasureError(f"{what} {v} is out of range: the model has {size} ({what}s "
                               f"0..{size - 1})")


def _tokens_hash(tokens: Tensor) -> str:
    data = tokens.detach().cpu().to(torch.int64).numpy().tobytes()
    return f"{tuple(tokens.shape)}:{hashlib.sha1(data).hexdigest()}"
