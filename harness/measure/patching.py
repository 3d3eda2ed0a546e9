"""Activation patching, sweeps and ablations: the public API of the batched engine.

Patching copies activations of a `from` run into an `into` run (different models on the same
tokens, or clean -> corrupt tokens on one model) and reads the into model's logit difference
(answer - foil) at each prompt's final position.

Each model runs on a `Forward` (harness.measure.forward): a registered fast path for its family
(GPT-2: a plain-torch forward that starts each variant where it first differs), verified against
the bridge once, or the general path through the bridge's own hooks, which every architecture
the TransformerBridge loads has. `engine.path_of(run)` says which one measured a run.
Clean traces are cached within the memory budget (`harness.measure.traces`); selections are
masks shaped by the site table (`harness.measure.patch_masks`).

Positions: non-negative positions are columns of the (right-padded) token tensor, as in
TransformerLens; negative positions count back from each prompt's final token (-1 = final_pos).
Sweep position labels are the into run's first prompt as token strings
(`bridge.to_str_tokens`, falling back to ints); `Grid.extras["positions"]` has the ints.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from harness.errors import MeasureError, did_you_mean
from harness.measure import circuits, gpt2_fast, llama_fast, parallel_fast
from harness.measure import path_patching as staggered_paths
from harness.measure.budget import CACHE_SHARE, SLICE_SHARE, WORK_SHARE, budget_bytes
from harness.measure.forward import Acts, Forward, fast_path_for, register_fast_path
from harness.measure.general_forward import GeneralForward
from harness.measure.patch_masks import (
    Variants,
    check_layers,
    check_over,
    check_site,
    grid_shape,
    selection_masks,
    sweep_variants,
)
from harness.measure.results import (
    Grid,
    PatchEffect,
    check_same_shape,
    normalized_effect,
    position_labels,
)
from harness.measure.staggered import StaggeredForward
from harness.measure.traces import Run, TraceCache
from harness.sites import HEAD_SITES

__all__ = ["PatchingEngine", "Run"]

# The built-in fast paths, registered by the engine that uses them (forward.py holds only the
# interface and the registry, so the families can import it without an import circle).
register_fast_path("gpt2", gpt2_fast.applies, gpt2_fast.GPT2Forward)
register_fast_path("llama", llama_fast.applies, llama_fast.LlamaForward)
register_fast_path("parallel", parallel_fast.applies, parallel_fast.ParallelForward)


class PatchingEngine:
    """Shared clean runs and batched patching; one engine per evaluation session.

    Memory: `memory_budget_mb` bounds the activations the engine holds at any time (weights are
    not counted), shared as `harness.measure.budget` says: clean traces kept between claims
    (least recently used dropped first), traces of prompt slices when a run's whole trace does
    not fit the cache, and batches of variants. Results are the same whatever the budget.
    `path="general"` forces the general path for every model (tests, benchmarks).
    """

    def __init__(self, memory_budget_mb: float = 2048, *, verify: bool = True,
                 path: str = "auto"):
        if memory_budget_mb <= 0:
            raise MeasureError(f"memory_budget_mb={memory_budget_mb} must be positive")
        if path not in ("auto", "general"):
            raise MeasureError(f"path={path!r} must be 'auto' or 'general'")
        self.memory_budget_mb = memory_budget_mb
        self.verify, self.path = verify, path
        self._forwards: dict[str, tuple[object, Forward]] = {}
        self._verified: set[str] = set()
        self.traces = TraceCache(self._trace, lambda r: self.forward(r).trace_nbytes(*r.shape),
                                 self._bytes(CACHE_SHARE), self._bytes(SLICE_SHARE))

    def _bytes(self, share: float) -> int:
        return budget_bytes(self.memory_budget_mb, share)

    def cached_trace_bytes(self) -> int:
        """Bytes of the clean traces kept for later claims (at most the budget's cache share)."""
        return self.traces.kept_bytes()

    # ---- models -----------------------------------------------------------------------------
    def forward(self, run: Run) -> Forward:
        """The run's Forward: the family's fast path if one applies, else the general path."""
        if run.key not in self._forwards:
            self._forwards[run.key] = (run.bridge, self._choose(run.bridge))
        bridge, forward = self._forwards[run.key]
        if bridge is not run.bridge:
            raise MeasureError(f"model key {run.key!r} names two different models in one "
                               "engine; give each model its own key")
        return forward

    def _choose(self, bridge) -> Forward:
        fast = fast_path_for(bridge) if self.path == "auto" else None
        if fast is not None:
            try:
                return fast.build(bridge)
            except MeasureError as exc:  # weights it cannot read: the general path can
                warnings.warn(f"{fast.name} fast path unavailable ({exc}); using the general "
                              "path", stacklevel=2)
        return GeneralForward(bridge)

    def path_of(self, run: Run) -> str:
        """Which path measures this run's model ("gpt2-fast", "general", ...)."""
        return self.forward(run).path

    # ---- clean runs -------------------------------------------------------------------------
    def clean(self, run: Run) -> Acts:
        return self.traces.clean(run)

    def slices(self, *runs: Run):
        return self.traces.slices(*runs)

    def _trace(self, run: Run) -> Acts:
        forward = self.forward(run)
        acts = forward.trace(run.tokens)
        if self.verify and run.key not in self._verified:
            try:
                forward.verify(run.tokens[:4], acts)
            except MeasureError:
                if forward.path == "general":
                    raise
                warnings.warn(f"the {forward.path} path does not reproduce model {run.key!r}; "
                              "using the general path", stacklevel=2)
                self._forwards[run.key] = (run.bridge, GeneralForward(run.bridge))
                self.traces.entries.clear()
                return self._trace(run)
            self._verified.add(run.key)
        return acts

    def logit_diff(self, run: Run, answer_ids: Tensor, foil_ids: Tensor) -> Float[Tensor, " batch"]:
        """The clean per-prompt logit difference (answer - foil) at each final position."""
        forward = self.forward(run)
        return torch.cat([forward.read_clean(acts, sub.final_pos, answer_ids[rows],
                                             foil_ids[rows]).float().cpu()
                          for rows, (sub,), (acts,) in self.slices(run)])

    # ---- public measurements ----------------------------------------------------------------
    def patch(self, from_run: Run, into_run: Run, answer_ids: Tensor, foil_ids: Tensor, *,
              site: str, layers: Sequence[int] | None = None, heads: Sequence | None = None,
              positions: Sequence[int] | None = None, neurons: Sequence[int] | None = None
              ) -> PatchEffect:
        """Copy `site` activations of `from_run` into `into_run` at the selection, all at once."""
        check_same_shape(from_run.shape, into_run.shape)
        parts = []
        for rows, (fr, ir), (source, into) in self.slices(from_run, into_run):
            a, f = answer_ids[rows], foil_ids[rows]
            patched = self._patch_selection(source, ir, into, a, f, site=site, layers=layers,
                                            heads=heads, positions=positions, neurons=neurons)
            parts.append((patched, self._read(fr, source, a, f), self._read(ir, into, a, f)))
        return _effect(*(torch.cat([p.cpu() for p in part], -1) for part in zip(*parts)))

    def ablate(self, run: Run, answer_ids: Tensor, foil_ids: Tensor, *, site: str,
               kind: str = "zero", layers: Sequence[int] | None = None,
               heads: Sequence | None = None, positions: Sequence[int] | None = None,
               neurons: Sequence[int] | None = None, reference: Tensor | float | None = None,
               mean: Tensor | None = None) -> PatchEffect:
        """Zero- or mean-ablate a selection; effect = (ablated - clean) / (reference - clean).

        Mean ablation replaces each activation with its mean over the batch's prompts and real
        (non-padding) positions, per layer (attention patterns: mean over prompts only), or
        with `mean` ([layer, 1, ...], e.g. `site_mean` of a reference run) when given. With no
        `reference` the reference logit diff is 0, so 1 means the logit diff is fully destroyed.
        """
        if kind not in ("zero", "mean"):
            raise MeasureError(f"unknown ablation kind {kind!r}"
                               + did_you_mean(kind, ["zero", "mean"]))
        check_site(site, self.forward(run).dims)
        if kind == "mean" and mean is None:
            mean = self.site_mean(run, site)
        patched, clean = [], []
        for rows, (sub,), (acts,) in self.slices(run):
            a, f = answer_ids[rows], foil_ids[rows]
            fill = mean.to(acts[site].device, acts[site].dtype) if kind == "mean" else \
                acts[site].new_zeros(())
            source = {site: fill.expand_as(acts[site])}
            patched.append(self._patch_selection(source, sub, acts, a, f, site=site,
                                                 layers=layers, heads=heads,
                                                 positions=positions, neurons=neurons).cpu())
            clean.append(self._read(sub, acts, a, f))
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
        forward = self.forward(into_run)
        dims = forward.dims
        over = check_over(site, over, dims)
        check_same_shape(from_run.shape, into_run.shape)
        if method not in ("exact", "attribution"):
            raise MeasureError(f"unknown method {method!r}"
                               + did_you_mean(method, ["exact", "attribution"]))
        layer_list = check_layers(layers, dims.n_layers)
        n_heads = dims.heads_of(site) if "head" in over else 0
        shape = grid_shape(over, len(layer_list), n_heads, into_run.shape[1])
        variants = sweep_variants(site, over, layer_list, dims, into_run.shape[1])
        parts = []
        for rows, (fr, ir), (source, into) in self.slices(from_run, into_run):
            a, f = answer_ids[rows], foil_ids[rows]
            if method == "exact":
                patched = forward.run_variants(ir.tokens, ir.final_pos, into, source, variants,
                                               a, f, self._bytes(WORK_SHARE))
            else:
                patched = self._attribution(ir, source, into, site, over, layer_list, a, f)
            parts.append((patched.cpu(), self._read(fr, source, a, f),
                          self._read(ir, into, a, f)))
        patched, from_value, into_value = (torch.cat(part, -1) for part in zip(*parts))
        return _sweep_grid(over, layer_list, n_heads, into_run, patched.reshape(*shape, -1),
                           from_value, into_value, method, site, forward.path)

    def path_patch(self, from_run: Run, into_run: Run, answer_ids: Tensor, foil_ids: Tensor,
                   sender_sets: Sequence[Sequence[circuits.Component]], path: str,
                   receivers: Sequence[str] = ()) -> Float[Tensor, "variant batch"]:
        """IOI path patching (`circuits.path_patch`): the into run's logit diff per sender set
        and prompt. On a fast path from the clean traces (`measure/path_patching.py`), every
        sender set batched; on the general path through the bridge's hooks."""
        check_same_shape(from_run.shape, into_run.shape)
        cfg = into_run.bridge.cfg
        targets = circuits.receiver_heads(cfg, path, receivers)
        heads, mlps = circuits.sender_masks(cfg, sender_sets)
        parts = []
        if isinstance(self.forward(into_run), StaggeredForward):
            for rows, (_, ir), (source, into) in self.slices(from_run, into_run):
                forward = self.forward(ir)
                if not isinstance(forward, StaggeredForward):  # it failed its check
                    break
                parts.append(staggered_paths.path_patch(
                    forward.ops, into, source, ir.final_pos, answer_ids[rows], foil_ids[rows],
                    heads, mlps, path, targets, self._bytes(WORK_SHARE)))
            else:
                return torch.cat(parts, -1)
        return circuits.path_patch(into_run.bridge, from_run.tokens, into_run.tokens,
                                   into_run.final_pos, answer_ids, foil_ids, sender_sets, path,
                                   receivers, self.memory_budget_mb)

    def patch_each(self, from_run: Run, into_run: Run, answer_ids: Tensor, foil_ids: Tensor,
                   *, site: str, selections: Sequence[dict]) -> Float[Tensor, "selection batch"]:
        """The patched logit diff per prompt of each selection (a dict of `patch`'s layers /
        heads / positions / neurons): `against: random`'s random selections, batched."""
        check_same_shape(from_run.shape, into_run.shape)
        parts = []
        for rows, (_, ir), (source, into) in self.slices(from_run, into_run):
            parts.append(self._patch_each(source, ir, into, answer_ids[rows], foil_ids[rows],
                                          site, selections))
        return torch.cat(parts, -1)

    def ablate_each(self, run: Run, answer_ids: Tensor, foil_ids: Tensor, *, site: str,
                    selections: Sequence[dict], kind: str = "zero",
                    mean: Tensor | None = None) -> Float[Tensor, "selection batch"]:
        """The ablated logit diff per prompt of each selection (as `ablate` fills it)."""
        check_site(site, self.forward(run).dims)
        if kind == "mean" and mean is None:
            mean = self.site_mean(run, site)
        parts = []
        for rows, (sub,), (acts,) in self.slices(run):
            fill = mean.to(acts[site].device, acts[site].dtype) if kind == "mean" else \
                acts[site].new_zeros(())
            source = {site: fill.expand_as(acts[site])}
            parts.append(self._patch_each(source, sub, acts, answer_ids[rows], foil_ids[rows],
                                          site, selections))
        return torch.cat(parts, -1)

    def _patch_each(self, source: Acts, into_run: Run, into: Acts, answer_ids, foil_ids,
                    site: str, selections: Sequence[dict]) -> Tensor:
        """Single-layer selections stacked as the variants of one batched run (every fast
        path starts each where it first differs); selections over several layers stacked
        along the batch of the bridge's hooked forward."""
        forward = self.forward(into_run)
        masks = [selection_masks(site, forward.dims, into_run.final_pos, into_run.shape[1],
                                 **selection) for selection in selections]
        out = torch.empty(len(selections), into_run.shape[0])
        single = [i for i, m in enumerate(masks) if len(m) == 1]
        if single:
            layers = torch.tensor([next(iter(masks[i])) for i in single])
            stacked = torch.stack(torch.broadcast_tensors(
                *[next(iter(masks[i].values())) for i in single]))
            out[single] = forward.run_variants(
                into_run.tokens, into_run.final_pos, into, source,
                Variants(site, layers, stacked), answer_ids, foil_ids,
                self._bytes(WORK_SHARE)).float().cpu()
        several = [i for i, m in enumerate(masks) if len(m) > 1]
        if several:
            out[several] = forward.patch_layers_each(
                into_run.tokens, into_run.final_pos, site, [masks[i] for i in several], source,
                answer_ids, foil_ids, self._bytes(WORK_SHARE)).float().cpu()
        return out

    def site_mean(self, run: Run, site: str) -> Tensor:
        """Mean of `site` over prompts and real positions (patterns: over prompts), per layer:
        [layer, 1, ...], ready to be the fill of a mean ablation."""
        check_site(site, self.forward(run).dims)
        total, count = None, 0.0
        for _, (sub,), (acts,) in self.slices(run):
            part, n = _site_sum(acts[site], site, sub.final_pos)
            total, count = (part if total is None else total + part), count + n
        return total / count

    # ---- the engine -------------------------------------------------------------------------
    def _read(self, run: Run, acts: Acts, answer_ids, foil_ids) -> Tensor:
        return self.forward(run).read_clean(acts, run.final_pos, answer_ids,
                                            foil_ids).float().cpu()

    def _patch_selection(self, source: Acts, into_run: Run, into: Acts, answer_ids, foil_ids, *,
                         site, layers, heads, positions, neurons) -> Tensor:
        """Patched logit diff per prompt for one selection (possibly spanning several layers)."""
        forward = self.forward(into_run)
        masks = selection_masks(site, forward.dims, into_run.final_pos, into_run.shape[1],
                                layers=layers, heads=heads, positions=positions,
                                neurons=neurons)
        if len(masks) == 1:
            (layer, mask), = masks.items()
            variants = Variants(site, torch.tensor([layer]), mask[None])
            return forward.run_variants(into_run.tokens, into_run.final_pos, into, source,
                                        variants, answer_ids, foil_ids,
                                        self._bytes(WORK_SHARE))[0]
        return forward.patch_layers(into_run.tokens, into_run.final_pos, site, masks, source,
                                    answer_ids, foil_ids)

    def _attribution(self, into_run: Run, source: Acts, into: Acts, site: str, over, layer_list,
                     answer_ids, foil_ids) -> Float[Tensor, "cells batch"]:
        """Linear approximation of every cell: (from - into) . gradient at the into run."""
        forward = self.forward(into_run)
        grads = forward.site_gradients(into_run.tokens, into_run.final_pos, site, answer_ids,
                                       foil_ids)
        with torch.no_grad():
            delta = (source[site] - into[site]).float() * grads.float()
            cells = _reduce_cells(delta[layer_list], site, over)  # [layer, batch, ...]
            cells = cells.movedim(1, -1).flatten(0, -2)
            base = self._read(into_run, into, answer_ids, foil_ids).to(cells.device)
        return (base + cells).cpu()


def _site_sum(acts: Tensor, site: str, final_pos: Tensor) -> tuple[Tensor, float]:
    """Sum of a site's activations over prompts and real positions, and how many were summed
    (in float32, whatever the model's dtype)."""
    acts = acts.float()
    if site == "pattern":
        return acts.sum(1, keepdim=True), float(acts.shape[1])
    pos = torch.arange(acts.shape[2], device=acts.device)
    real = (pos[None] <= final_pos.to(acts.device)[:, None]).to(acts.dtype)  # [batch, pos]
    count = float(real.sum())
    real = real.reshape(1, *real.shape, *[1] * (acts.dim() - 3))
    return (acts * real).sum((1, 2), keepdim=True), count


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


# ---- results --------------------------------------------------------------------------------
def _effect(patched: Tensor, from_value: Tensor, into_value: Tensor) -> PatchEffect:
    patched, from_value, into_value = patched.cpu(), from_value.cpu(), into_value.cpu()
    return PatchEffect(normalized=float(normalized_effect(patched, from_value, into_value)),
                       patched=patched, from_value=from_value, into_value=into_value)


def _sweep_grid(over, layer_list, n_heads, into_run: Run, patched: Tensor, from_value: Tensor,
                into_value: Tensor, method: str, site: str, path: str) -> Grid:
    labels = {"layer": tuple(layer_list), "head": tuple(range(n_heads)),
              "pos": position_labels(into_run.bridge, into_run.tokens)}
    from_value, into_value = from_value.cpu(), into_value.cpu()
    extras = {"from": float(from_value.mean()), "into": float(into_value.mean()), "site": site,
              "positions": tuple(range(into_run.shape[1])), "per_prompt": patched,
              "from_per_prompt": from_value, "into_per_prompt": into_value,
              "approximation": method == "attribution", "path": path}
    return Grid(axes=tuple(over), labels=tuple(labels[a] for a in over),
                values=normalized_effect(patched, from_value, into_value),
                raw=patched.mean(-1), method=method, extras=extras)




