"""`path_patch`: IOI path patching, the senders' effect that reaches the receivers' q/k/v (or
the final residual) directly."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.expect import GRID, PATCH, Measurement
from harness.kinds.base import (
    ClaimBase,
    Index,
    MeasureContext,
    chance_measurement,
    measurement,
    model_sizes,
)
from harness.kinds.fields import (
    FromInto,
    RunRef,
    _components,
    component_indices,
    head_indices,
)
from harness.kinds.measuring import (
    component_pool,
    patch_measurement,
    patch_runs,
    random_selections,
)
from harness.measure.results import Grid, PatchEffect, PromptParts, normalized_from_means
from harness.sites import parse_head


class PathPatchClaim(FromInto, ClaimBase):
    """IOI path patching: the senders' effect that reaches the receivers' q/k/v (or the final
    residual) directly, every other component frozen at its `into` value."""

    measure: Literal["path_patch"]
    FREEZE = "grid|patch"
    VALUE_KIND = GRID        # PATCH with `senders`
    RESAMPLES_PROMPTS = True
    REPORT_EXTRAS = ("per_prompt_raw", "raw", "from", "into", "normalized", "path")
    AGAINST = "senders"
    from_: RunRef = Field(alias="from")
    into: RunRef
    senders: tuple[str, ...] | None = None   # components; omitted: one cell per head (a grid)
    path: Literal["q", "k", "v", "resid"]
    receivers: tuple[str, ...] = ()          # heads (L1H0; L1KV0 for k and v on GQA models)
    metric: Literal["normalized", "logit_diff"] = "normalized"

    @field_validator("senders")
    @classmethod
    def _sender_names(cls, value):
        return _components(value)

    @model_validator(mode="after")
    def _receivers_fit_path(self):
        if self.from_.model != self.into.model:
            raise ValueError("path patching runs one model on two inputs: give `from` and "
                             "`into` the same model (e.g. input: clean / input: corrupt)")
        if self.path == "resid" and self.receivers:
            raise ValueError("path `resid` is the final residual stream; drop `receivers`")
        if self.path != "resid" and not self.receivers:
            raise ValueError(f"path '{self.path}' needs `receivers:`, the heads whose "
                             f"{self.path} input the effect must pass through")
        for label in self.receivers:
            parse_head(label, self.path)
        return self

    def model_names(self) -> tuple[str, ...]:
        return (self.into.model,)

    def indices(self) -> list[Index]:
        receivers = head_indices(self.receivers, "receivers", self.path) \
            if self.path != "resid" else []
        return component_indices(self.senders, "senders") + receivers

    def value_kind(self) -> str:
        return PATCH if self.senders else GRID

    def accepts_against(self) -> bool:
        return bool(self.senders)

    def chance_pool(self, sizes: dict):
        return component_pool(self.senders, sizes)


@measurement("path_patch")
def _path_patch(ctx: MeasureContext) -> Measurement:
    from harness.measure.circuits import Component, parse_component

    claim = ctx.claim
    from_run, into_run, batch = patch_runs(ctx)
    cfg = into_run.bridge.cfg
    if claim.senders:
        sender_sets = [[parse_component(s, cfg) for s in claim.senders]]
    else:
        sender_sets = [[Component(layer, h)] for layer in range(cfg.n_layers)
                       for h in range(cfg.n_heads)]
    args = (batch.answer_ids, batch.foil_ids)
    engine = ctx.session.engine
    patched = engine.path_patch(from_run, into_run, *args, sender_sets, claim.path,
                                claim.receivers)                       # [variant, batch]
    from_value, into_value = engine.logit_diff(from_run, *args), engine.logit_diff(into_run, *args)
    normalized = (patched.mean(-1) - into_value.mean()) / (from_value.mean() - into_value.mean())
    extras = {"from": float(from_value.mean()), "into": float(into_value.mean()),
              "path": engine.path_of(into_run)}
    if claim.senders:
        effect = PatchEffect(float(normalized[0]), patched[0].cpu(), from_value.cpu(),
                             into_value.cpu())
        measured = patch_measurement(effect, claim.metric, None)
        return Measurement(PATCH, measured.value, measured.per_prompt,
                           {**extras, **measured.extras})
    values = patched.mean(-1) if claim.metric == "logit_diff" else normalized
    grid = Grid(("layer", "head"), (tuple(range(cfg.n_layers)), tuple(range(cfg.n_heads))),
                values.view(cfg.n_layers, cfg.n_heads),
                raw=patched.mean(-1).view(cfg.n_layers, cfg.n_heads), extras=extras)
    parts = PromptParts({"value": patched.cpu().T.reshape(-1, cfg.n_layers, cfg.n_heads)}) \
        if claim.metric == "logit_diff" else PromptParts(
            {"patched": patched.cpu().T.reshape(-1, cfg.n_layers, cfg.n_heads),
             "from": from_value.cpu(), "into": into_value.cpu()}, normalized_from_means)
    return Measurement(GRID, grid, extras=extras, parts=parts)


@chance_measurement("path_patch")
def _path_patch_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Random sender sets, batched as the engine's sender sets."""
    from harness.measure.circuits import parse_component

    claim = ctx.claim
    from_run, into_run, batch = patch_runs(ctx)
    cfg = into_run.bridge.cfg
    selections = random_selections(ctx, model_sizes(cfg), n, seed)
    sender_sets = [[parse_component(s, cfg) for s in selection] for selection in selections]
    args = (batch.answer_ids, batch.foil_ids)
    engine = ctx.session.engine
    patched = engine.path_patch(from_run, into_run, *args, sender_sets, claim.path,
                                claim.receivers)
    if claim.metric == "logit_diff":
        return patched.mean(-1).tolist()
    from_value, into_value = engine.logit_diff(from_run, *args), engine.logit_diff(into_run, *args)
    return ((patched.mean(-1) - into_value.mean())
            / (from_value.mean() - into_value.mean())).tolist()
