"""Patching, sweeps and ablations read with a sequence metric (loss or accuracy over a span).

The logit-difference engine (patching.py) reads one position and two unembedding columns; a
sequence metric needs the whole vocabulary at every scored position, so this path runs the
bridge itself with TransformerLens hooks (`run_with_hooks`), which works for any architecture
the bridge loads. Variants of a sweep are stacked along the batch: one forward runs many
variants on a slice of prompts, each variant's rows patched by its own mask, within the memory
budget. Selections mean what they mean in the engine (non-negative positions are token columns,
negative ones count back from each prompt's final token; mean ablation averages over prompts
and real positions, patterns over prompts).

The metric scores each run against the clean prompt's tokens (`targets`), like the answer and
foil of the logit difference: a corrupt run is scored on predicting the clean text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from harness.errors import MeasureError
from harness.measure.general_forward import write_hooks
from harness.measure.logits import _device, prompts_per_forward
from harness.measure.results import (
    Grid,
    PatchEffect,
    check_same_shape,
    normalized_effect,
    position_labels,
)
from harness.measure.sequence import metric_of_logits, sequence_metric
from harness.sites import SITE_TABLE, n_heads_of

Variant = dict[int, Bool[Tensor, "batch_or_1 ..."]]   # layer -> mask of the site's activation


# ---- selections (the engine's masks, from the site table) ------------------------------------
def dims_of(bridge):
    """Sizes and sites of a bridge, probed as the general patching path does."""
    from harness.measure.general_forward import _probe_dims

    return _probe_dims(bridge)


def selection(site: str, bridge, final_pos: Tensor, n_pos: int, *, layers=None, heads=None,
              positions=None, neurons=None) -> Variant:
    """layer -> mask of the activations one patch (or ablation) replaces."""
    from harness.measure.patch_masks import selection_masks

    return selection_masks(site, dims_of(bridge), final_pos, n_pos, layers=layers, heads=heads,
                           positions=positions, neurons=neurons)


def sweep_variants(site: str, bridge, over: Sequence[str], n_pos: int) -> list[Variant]:
    """One single-layer variant per grid cell, in the grid's row-major order."""
    from harness.measure.patch_masks import check_over
    from harness.measure.patch_masks import sweep_variants as engine_variants

    dims = dims_of(bridge)
    over = check_over(site, over, dims)
    variants = engine_variants(site, over, list(range(dims.n_layers)), dims, n_pos)
    return [{int(layer): mask} for layer, mask in zip(variants.layers, variants.masks)]


# ---- runs --------------------------------------------------------------------------------------
def site_acts(bridge, tokens: Tensor, site: str, layers: Sequence[int]) -> dict[int, Tensor]:
    """The site's activations of a clean run at the given layers."""
    names = {SITE_TABLE[site].hook_name(layer): layer for layer in layers}
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens.to(_device(bridge)),
                                         names_filter=lambda n: n in names)
    return {layer: cache[name] for name, layer in names.items()}


def run_variants(bridge, tokens: Tensor, targets: Tensor, score: Tensor, site: str,
                 variants: list[Variant], source: dict[int, Tensor], metric: str,
                 rows_per_forward: int) -> Float[Tensor, "variant batch"]:
    """The metric of every variant on a slice of prompts: variants stacked along the batch,
    `source[layer]` ([batch, ...], or broadcastable) written where a variant's mask is set."""
    batch = tokens.shape[0]
    chunk = max(1, rows_per_forward // batch)
    out = []
    device = _device(bridge)
    for start in range(0, len(variants), chunk):
        part = variants[start:start + chunk]
        n = len(part)
        hooks = [h for layer in sorted({lay for v in part for lay in v})
                 for h in write_hooks(site, layer, _replacer(part, layer, source[layer], batch))]
        with torch.inference_mode():
            logits = bridge.run_with_hooks(tokens.to(device).repeat(n, 1), fwd_hooks=hooks,
                                           return_type="logits")
        out.append(metric_of_logits(logits, targets.repeat(n, 1), score.repeat(n, 1),
                                    metric).reshape(n, batch))
        del logits
    return torch.cat(out)


def _replacer(part: list[Variant], layer: int, new: Tensor, batch: int):
    """act -> act patched, for each stacked variant, with its own mask at this layer (or not)."""
    masks = []
    for variant in part:
        mask = variant.get(layer)
        if mask is None:
            mask = torch.zeros_like(next(iter(variant.values()))[:1])
        masks.append(mask.expand(batch, *mask.shape[1:]))
    stacked = torch.cat(masks)

    def replace(act):
        mask = stacked.to(act.device)
        source = new.to(act.device, act.dtype).expand(batch, *act.shape[1:])
        return torch.where(mask, source.repeat(len(part), *[1] * (act.dim() - 1)), act)
    return replace


def _rows_per_forward(bridge, n_pos: int, memory_budget_mb: float) -> int:
    return prompts_per_forward(bridge.cfg, n_pos, memory_budget_mb)


# ---- public measurements -------------------------------------------------------------------------
def patch(from_bridge, from_tokens: Tensor, into_bridge, into_tokens: Tensor,
          final_pos: Tensor, targets: Tensor, score: Tensor, metric: str, *, site: str,
          layers=None, heads=None, positions=None, neurons=None,
          memory_budget_mb: float = 2048) -> PatchEffect:
    """Copy `site` activations of the from run into the into run at the selection, all at once;
    the metric of the patched, from and into runs per prompt."""
    check_same_shape(from_tokens.shape, into_tokens.shape)
    variant = selection(site, into_bridge, final_pos, into_tokens.shape[1], layers=layers,
                        heads=heads, positions=positions, neurons=neurons)
    patched = _over_slices(from_bridge, from_tokens, into_bridge, into_tokens, targets, score,
                           site, [variant], metric, memory_budget_mb)[0]
    return _effect(patched, *_clean(from_bridge, from_tokens, into_bridge, into_tokens, targets,
                                    score, metric, memory_budget_mb))


def patch_sweep(from_bridge, from_tokens: Tensor, into_bridge, into_tokens: Tensor,
                targets: Tensor, score: Tensor, metric: str, *, site: str,
                over: Sequence[str], memory_budget_mb: float = 2048) -> Grid:
    """One patch per cell of `over`; values = normalized effect, raw = patched metric."""
    check_same_shape(from_tokens.shape, into_tokens.shape)
    over = tuple(over)
    cfg, n_pos = into_bridge.cfg, into_tokens.shape[1]
    variants = sweep_variants(site, into_bridge, over, n_pos)
    patched = _over_slices(from_bridge, from_tokens, into_bridge, into_tokens, targets, score,
                           site, variants, metric, memory_budget_mb)
    from_value, into_value = _clean(from_bridge, from_tokens, into_bridge, into_tokens, targets,
                                    score, metric, memory_budget_mb)
    n_heads = n_heads_of(site, cfg)
    sizes = {"layer": cfg.n_layers, "head": n_heads, "pos": n_pos}
    labels = {"layer": tuple(range(cfg.n_layers)), "head": tuple(range(n_heads)),
              "pos": position_labels(into_bridge, into_tokens)}
    patched = patched.reshape(*(sizes[a] for a in over), -1)
    return Grid(axes=over, labels=tuple(labels[a] for a in over),
                values=normalized_effect(patched, from_value, into_value),
                raw=patched.mean(-1), extras={"from": float(from_value.mean()),
                                              "into": float(into_value.mean()), "site": site,
                                              "metric": metric, "per_prompt": patched,
                                              "from_per_prompt": from_value,
                                              "into_per_prompt": into_value})


def ablate(bridge, tokens: Tensor, final_pos: Tensor, targets: Tensor, score: Tensor,
           metric: str, *, site: str, kind: str = "zero", layers=None, heads=None,
           positions=None, neurons=None, reference: Tensor | float | None = None,
           memory_budget_mb: float = 2048) -> PatchEffect:
    """Zero- or mean-ablate a selection; effect = (ablated - clean) / (reference - clean).

    Without a reference model the reference is chance: the uniform distribution's loss
    ln(d_vocab) for `loss`, 0 for `accuracy`.
    """
    if kind not in ("zero", "mean"):
        raise MeasureError(f"unknown ablation kind {kind!r}; use zero or mean")
    variant = selection(site, bridge, final_pos, tokens.shape[1], layers=layers,
                        heads=heads, positions=positions, neurons=neurons)
    if kind == "mean":
        source = _site_means(bridge, tokens, final_pos, site, list(variant), memory_budget_mb)
    else:
        source = {layer: torch.zeros(()) for layer in variant}
    rows = _rows_per_forward(bridge, tokens.shape[1], memory_budget_mb)
    parts = []
    for start in range(0, tokens.shape[0], rows):
        s = slice(start, start + rows)
        parts.append(run_variants(bridge, tokens[s], targets[s], score[s], site, [variant],
                                  source, metric, rows)[0])
    clean = sequence_metric(bridge, tokens, targets, score, metric, memory_budget_mb)
    if reference is None:
        reference = math.log(bridge.cfg.d_vocab) if metric == "loss" else 0.0
    ref = torch.as_tensor(reference, dtype=clean.dtype).expand_as(clean)
    return _effect(torch.cat(parts), ref, clean)


def _site_means(bridge, tokens, final_pos, site, layers, memory_budget_mb) -> dict[int, Tensor]:
    """Per layer: the site's mean over prompts and real positions (patterns: over prompts)."""
    total: dict[int, Tensor] = {}
    count = 0.0
    step = _rows_per_forward(bridge, tokens.shape[1], memory_budget_mb)
    for start in range(0, tokens.shape[0], step):
        s = slice(start, start + step)
        acts = site_acts(bridge, tokens[s], site, layers)
        if site == "pattern":
            sums = {lay: a.sum(0, keepdim=True) for lay, a in acts.items()}
            n = float(tokens[s].shape[0])
        else:
            pos = torch.arange(tokens.shape[1])
            real = (pos[None] <= final_pos[s].cpu()[:, None]).float()
            n = float(real.sum())
            sums = {}
            for lay, a in acts.items():
                weight = real.to(a.device).reshape(*real.shape, *[1] * (a.dim() - 2))
                sums[lay] = (a.float() * weight).sum((0, 1), keepdim=True)
        for lay, value in sums.items():
            total[lay] = value if lay not in total else total[lay] + value
        count += n
    return {lay: value / count for lay, value in total.items()}


def _over_slices(from_bridge, from_tokens, into_bridge, into_tokens, targets, score, site,
                 variants: list[Variant], metric, memory_budget_mb) -> Float[Tensor, "v batch"]:
    """Variants over prompt slices: each slice's from activations cached, then stacked runs."""
    layers = sorted({layer for v in variants for layer in v})
    rows = _rows_per_forward(into_bridge, into_tokens.shape[1], memory_budget_mb)
    parts = []
    for start in range(0, into_tokens.shape[0], rows):
        s = slice(start, start + rows)
        source = site_acts(from_bridge, from_tokens[s], site, layers)
        sliced = [{lay: m if m.shape[0] == 1 else m[s] for lay, m in v.items()}
                  for v in variants]
        parts.append(run_variants(into_bridge, into_tokens[s], targets[s], score[s], site,
                                  sliced, source, metric, rows))
    return torch.cat(parts, -1)


def _clean(from_bridge, from_tokens, into_bridge, into_tokens, targets, score, metric,
           memory_budget_mb) -> tuple[Tensor, Tensor]:
    return (sequence_metric(from_bridge, from_tokens, targets, score, metric, memory_budget_mb),
            sequence_metric(into_bridge, into_tokens, targets, score, metric, memory_budget_mb))


def _effect(patched: Tensor, from_value: Tensor, into_value: Tensor) -> PatchEffect:
    patched, from_value, into_value = patched.cpu(), from_value.cpu(), into_value.cpu()
    return PatchEffect(normalized=float(normalized_effect(patched, from_value, into_value)),
                       patched=patched, from_value=from_value, into_value=into_value)






