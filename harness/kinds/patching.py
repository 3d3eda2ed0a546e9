"""Activation patching: `patch` (one selection), `patch_sweep` (a grid over layers, positions,
heads) and `ablate` (zero, mean or resample), read as logit differences or sequence metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from harness import labels
from harness.errors import MeasureError
from harness.expect import GRID, PATCH, SCALAR, Measurement
from harness.kinds.base import (
    SEQUENCE_METRICS,
    ClaimBase,
    Index,
    MeasureContext,
    SingleModelClaim,
    chance_measurement,
    measurement,
)
from harness.kinds.fields import FromInto, ReferencePrompts, RunRef, SiteSelection, SpanSpec
from harness.kinds.measuring import (
    SEQUENCE_PATH,
    ablation_reference,
    check_indices,
    patch_measurement,
    patch_runs,
    random_selections,
    remeasured,
    sequence_runs,
    site_kwargs,
    span_mask_of,
    sweep_parts,
)
from harness.measure.results import Grid, PatchEffect
from harness.sites import HEAD_SITES, KV_SITES, head_label

# what a patch or ablation reads: the logit difference (normalized or raw) or a sequence metric
PATCH_METRICS = ("normalized", "logit_diff", *SEQUENCE_METRICS)
PatchMetric = Literal[PATCH_METRICS]  # type: ignore[valid-type]


class RandomSelection:
    """`against: random` for a site selection naming `heads` (random heads of the same layers)
    or `neurons` (random neurons of the MLP)."""

    AGAINST = "heads or neurons"

    def accepts_against(self) -> bool:
        return bool(self.heads) or bool(self.neurons)

    def chance_pool(self, sizes: dict):
        from harness.chance import Pool

        if not self.heads:
            return Pool({"neurons": tuple(self.neurons)}, {"neurons": tuple(range(sizes["d_mlp"]))})
        count = sizes["n_kv_heads"] if self.site in KV_SITES else sizes["n_heads"]
        named: dict = {}
        for layer, head in self.head_pairs():     # canonical labels, as candidates are
            named[layer] = named.get(layer, ()) + (head_label(self.site, layer, head),)
        return Pool(named, {layer: tuple(head_label(self.site, layer, h) for h in range(count))
                            for layer in named})

    def with_selection(self, selection: tuple):
        """This claim naming another selection of the same kind (no interval: one value)."""
        field = "heads" if self.heads else "neurons"
        return self.model_copy(update={field: tuple(selection), "ci": None, "against": None})

    def selection_kwargs(self, selection: tuple) -> dict:
        """`site_kwargs` of the claim naming `selection` instead."""
        return site_kwargs(self.with_selection(selection))


class PatchClaim(RandomSelection, FromInto, ClaimBase, SiteSelection):
    measure: Literal["patch"]
    FREEZE = "patch"
    VALUE_KIND = PATCH
    REPORT_EXTRAS = ("per_prompt_raw", "raw", "from", "into", "normalized", "path")
    MODEL_ARROW = True
    RESAMPLES_PROMPTS = True
    from_: RunRef = Field(alias="from")
    into: RunRef
    metric: PatchMetric = "normalized"
    span: SpanSpec = labels.DEFAULT_SPAN    # metric loss / accuracy: the scored positions

    def model_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.from_.model, self.into.model)))

    def indices(self) -> list[Index]:
        return self.selection_indices()

    def sites(self) -> list[tuple[tuple, str]]:
        return [(("site",), self.site)]


SWEEP_AXES = labels.SWEEP_AXES


class PatchSweepClaim(PatchClaim):
    measure: Literal["patch_sweep"]
    FREEZE = "grid"
    VALUE_KIND = GRID
    REPORT_EXTRAS = ("method", "path")
    FIGURE = "heatmap"
    AGAINST = None       # a grid of every cell: no named selection
    over: tuple[str, ...]
    method: Literal["exact", "attribution"] = "exact"

    def accepts_against(self) -> bool:
        return False

    @model_validator(mode="after")
    def _axes_fit_site(self):
        problem = labels.sweep_axes_problem(self.over)
        if problem:
            raise ValueError(problem)
        if "head" in self.over and self.site not in HEAD_SITES:
            raise ValueError(f"a sweep over heads needs a per-head site "
                             f"({', '.join(HEAD_SITES)}), not '{self.site}'")
        return self

    def cost(self, n_prompts: int) -> float:
        return 2.0


class AblateClaim(RandomSelection, SingleModelClaim, SiteSelection):
    measure: Literal["ablate"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    RESAMPLES_PROMPTS = True
    REPORT_EXTRAS = ("per_prompt_raw", "raw", "from", "into", "normalized", "prompts", "path",
                     "reference")
    kind: Literal["zero", "mean", "resample"] = "zero"
    # a model name: its logit diff counts as "fully ablated"; {prompts: SET}: the prompts
    # whose mean (kind mean) or activations (kind resample) replace the selection
    reference: str | ReferencePrompts | None = None
    seed: int = 0                  # resample: which reference prompt each prompt draws
    metric: PatchMetric = "normalized"
    span: SpanSpec = labels.DEFAULT_SPAN    # metric loss / accuracy: the scored positions

    @model_validator(mode="after")
    def _resample_needs_prompts(self):
        if self.kind == "resample" and not isinstance(self.reference, ReferencePrompts):
            raise ValueError("`kind: resample` needs `reference: {prompts: SET}`, the prompt "
                             "set whose activations replace the selection")
        if isinstance(self.reference, ReferencePrompts) and self.metric in SEQUENCE_METRICS:
            raise ValueError("`reference: {prompts: SET}` ablations read the logit difference; "
                             "use `metric: normalized` or `metric: logit_diff`")
        return self

    @property
    def reference_model(self) -> str | None:
        return self.reference if isinstance(self.reference, str) else None

    @property
    def reference_prompts(self) -> str | None:
        return self.reference.prompts if isinstance(self.reference, ReferencePrompts) else None

    def model_names(self) -> tuple[str, ...]:
        return (self.model,) + ((self.reference_model,) if self.reference_model else ())

    def model_refs(self) -> list[tuple[str, str]]:
        refs = super().model_refs()
        if self.reference_model:
            refs[-1] = ("reference", self.reference_model)
        return refs

    def indices(self) -> list[Index]:
        return self.selection_indices()

    def sites(self) -> list[tuple[tuple, str]]:
        return [(("site",), self.site)]


@measurement("patch")
def _patch(ctx: MeasureContext) -> Measurement:
    if ctx.claim.metric in SEQUENCE_METRICS:
        from harness.measure import sequence_patching as sp

        fr, ir, targets, score = sequence_runs(ctx)
        effect = sp.patch(fr.bridge, fr.tokens, ir.bridge, ir.tokens, ir.final_pos, targets,
                          score, ctx.claim.metric, memory_budget_mb=ctx.session.memory_budget_mb,
                          **site_kwargs(ctx.claim))
        return patch_measurement(effect, "normalized", SEQUENCE_PATH)
    from_run, into_run, batch = patch_runs(ctx)
    engine = ctx.session.engine
    effect = engine.patch(from_run, into_run, batch.answer_ids, batch.foil_ids,
                          **site_kwargs(ctx.claim))
    return patch_measurement(effect, ctx.claim.metric, engine.path_of(into_run))


@chance_measurement("patch")
def _patch_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Random selections patched as the variants of one batched run (logit-diff metrics)."""
    from harness.kinds.base import model_sizes
    from harness.measure.results import normalized_effect

    claim = ctx.claim
    model = ctx.model(claim.into.model)
    selections = random_selections(ctx, model_sizes(model.bridge.cfg), n, seed)
    if claim.metric in SEQUENCE_METRICS:
        return remeasured(ctx, [claim.with_selection(s) for s in selections])
    from_run, into_run, batch = patch_runs(ctx)
    engine = ctx.session.engine
    patched = engine.patch_each(from_run, into_run, batch.answer_ids, batch.foil_ids,
                                site=claim.site,
                                selections=[_selection(claim, s) for s in selections])
    if claim.metric == "logit_diff":
        return patched.mean(-1).tolist()
    args = (batch.answer_ids, batch.foil_ids)
    return normalized_effect(patched, engine.logit_diff(from_run, *args),
                             engine.logit_diff(into_run, *args)).tolist()


def _selection(claim, selection: tuple) -> dict:
    kwargs = claim.selection_kwargs(selection)
    kwargs.pop("site")
    return kwargs


@measurement("patch_sweep")
def _patch_sweep(ctx: MeasureContext) -> Measurement:
    claim = ctx.claim
    if claim.metric in SEQUENCE_METRICS:
        from harness.measure import sequence_patching as sp

        if claim.method != "exact":
            raise MeasureError("`method: attribution` reads the logit difference; use "
                               "`method: exact` with metric loss / accuracy")
        fr, ir, targets, score = sequence_runs(ctx)
        grid = sp.patch_sweep(fr.bridge, fr.tokens, ir.bridge, ir.tokens, targets, score,
                              claim.metric, site=claim.site, over=tuple(claim.over),
                              memory_budget_mb=ctx.session.memory_budget_mb)
        return Measurement(GRID, grid, extras={"method": grid.method, "path": SEQUENCE_PATH},
                           parts=sweep_parts(grid, "normalized"))
    from_run, into_run, batch = patch_runs(ctx)
    grid = ctx.session.engine.patch_sweep(from_run, into_run, batch.answer_ids, batch.foil_ids,
                                          site=claim.site, over=tuple(claim.over),
                                          method=claim.method)
    if claim.metric == "logit_diff" and grid.raw is not None:
        grid = Grid(grid.axes, grid.labels, grid.raw, grid.raw, grid.method, grid.extras)
    return Measurement(GRID, grid, extras={"method": grid.method, "path": grid.extras["path"]},
                       parts=sweep_parts(grid, claim.metric))


@measurement("ablate")
def _ablate(ctx: MeasureContext) -> Measurement:
    from harness.measure.patching import Run

    claim = ctx.claim
    if claim.reference_prompts:
        return _ablate_from_reference(ctx)
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    if claim.metric in SEQUENCE_METRICS:
        return _ablate_sequence(ctx, model, batch)
    run = Run(model.key, model.bridge, batch.tokens, batch.final_pos)
    reference = None
    if claim.reference_model:
        ref_model = ctx.model(claim.reference_model)
        ref_batch = ctx.batch(ref_model)
        reference = ctx.session.engine.logit_diff(
            Run(ref_model.key, ref_model.bridge, ref_batch.tokens, ref_batch.final_pos),
            ref_batch.answer_ids, ref_batch.foil_ids)
    effect = ctx.session.engine.ablate(run, batch.answer_ids, batch.foil_ids, kind=claim.kind,
                                       reference=reference, **site_kwargs(claim))
    measured = patch_measurement(effect, claim.metric, ctx.session.engine.path_of(run))
    return Measurement(SCALAR, measured.value, measured.per_prompt, measured.extras)


@chance_measurement("ablate")
def _ablate_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Random selections ablated as the variants of one batched run; sequence metrics and
    reference-prompt ablations measure each selection on its own."""
    import torch

    from harness.kinds.base import model_sizes
    from harness.measure.patching import Run
    from harness.measure.results import normalized_effect

    claim = ctx.claim
    model = ctx.model(claim.model)
    selections = random_selections(ctx, model_sizes(model.bridge.cfg), n, seed)
    if claim.metric in SEQUENCE_METRICS or claim.reference_prompts:
        return remeasured(ctx, [claim.with_selection(s) for s in selections])
    batch = ctx.batch(model)
    run = Run(model.key, model.bridge, batch.tokens, batch.final_pos)
    engine = ctx.session.engine
    args = (batch.answer_ids, batch.foil_ids)
    ablated = engine.ablate_each(run, *args, site=claim.site, kind=claim.kind,
                                 selections=[_selection(claim, s) for s in selections])
    if claim.metric == "logit_diff":
        return ablated.mean(-1).tolist()
    clean = engine.logit_diff(run, *args)
    reference = torch.zeros_like(clean)
    if claim.reference_model:
        ref_model = ctx.model(claim.reference_model)
        ref_batch = ctx.batch(ref_model)
        reference = engine.logit_diff(Run(ref_model.key, ref_model.bridge, ref_batch.tokens,
                                          ref_batch.final_pos), ref_batch.answer_ids,
                                      ref_batch.foil_ids)
    return normalized_effect(ablated, reference, clean).tolist()


def _ablate_sequence(ctx: MeasureContext, model, batch) -> Measurement:
    from harness.measure import sequence_patching as sp
    from harness.measure.sequence import sequence_metric

    claim, budget = ctx.claim, ctx.session.memory_budget_mb
    score = span_mask_of(ctx, model, batch)
    reference = None
    if claim.reference_model:
        ref_model = ctx.model(claim.reference_model)
        ref_batch = ctx.batch(ref_model)
        reference = sequence_metric(ref_model.bridge, ref_batch.tokens, batch.tokens, score,
                                    claim.metric, budget)
    effect = sp.ablate(model.bridge, batch.tokens, batch.final_pos, batch.tokens, score,
                       claim.metric, kind=claim.kind, reference=reference,
                       memory_budget_mb=budget, **site_kwargs(claim))
    measured = patch_measurement(effect, "normalized", SEQUENCE_PATH)
    return Measurement(SCALAR, measured.value, measured.per_prompt, measured.extras)


def _ablate_from_reference(ctx: MeasureContext) -> Measurement:
    """`ablate` with `reference: {prompts: SET}`: the selection replaced by the reference
    prompts' mean (kind mean) or by a seeded draw of them (kind resample)."""
    import torch

    from harness.measure.circuits import logit_diffs, site_replacement_hooks

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    check_indices(claim, model, claim.model)
    names = [_site_hook(claim.site, layer) for layer in _selected_layers(claim)]
    values, extras = ablation_reference(ctx, model, batch, claim.kind, names, claim.seed)
    hooks = site_replacement_hooks(model.bridge.cfg, claim.site, values, batch.final_pos,
                                   heads=claim.head_pairs(), positions=claim.positions,
                                   neurons=claim.neurons)
    args = (batch.tokens, batch.final_pos, batch.answer_ids, batch.foil_ids)
    clean = logit_diffs(model.bridge, *args)
    ablated = logit_diffs(model.bridge, *args, hooks=hooks)
    effect = PatchEffect(float((ablated.mean() - clean.mean()) / (0 - clean.mean())), ablated,
                         torch.zeros_like(clean), clean)
    measured = patch_measurement(effect, claim.metric, None)
    extras.update(measured.extras)
    extras["prompts"] = batch.texts
    return Measurement(SCALAR, measured.value, measured.per_prompt, extras)


def _site_hook(site_name: str, layer: int) -> str:
    from harness.sites import site

    return site(site_name).hook_name(layer)


def _selected_layers(claim) -> list[int]:
    pairs = claim.head_pairs()
    layers = sorted({layer for layer, _ in pairs}) if pairs else claim.layers
    if not layers:
        raise MeasureError("an ablation needs `layers:` (or `heads:`) to say what to ablate")
    return list(layers)
