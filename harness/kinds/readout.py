"""Readouts of the residual stream as logit differences per layer or component: `logit_lens`
and `dla` (one model: a grid; two: a pair, b - a)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from harness.expect import GRID, PAIR, Measurement
from harness.kinds.base import ClaimBase, MeasureContext, measurement
from harness.measure.results import Grid, grid_parts


class OneOrTwoModels(ClaimBase):
    """One model (a grid), or two (a pair: b - a, both grids kept)."""

    VALUE_KIND = GRID        # PAIR with `models: [A, B]`
    REPORT_EXTRAS = ("path", "approximation")
    PRIVATE_EXTRAS = ("each", "a", "b", "names")
    RESAMPLES_PROMPTS = True

    model: str | None = None
    models: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _one_or_two(self):
        if (self.model is None) == (self.models is None):
            raise ValueError("give either `model: NAME` or `models: [A, B]`")
        return self

    def model_names(self) -> tuple[str, ...]:
        return self.models if self.models else (self.model,)

    def value_kind(self) -> str:
        return PAIR if self.models else GRID


class LogitLensClaim(OneOrTwoModels):
    measure: Literal["logit_lens"]
    FREEZE = "grid"
    FIGURE = "lines"
    incl_mid: bool = False


class DlaClaim(OneOrTwoModels):
    measure: Literal["dla"]
    FREEZE = "grid"
    FIGURE = "bars"
    by: Literal["layer", "component", "head"] = "component"


def _per_model_grids(ctx: MeasureContext, compute) -> Measurement:
    names = ctx.claim.model_names()
    grids = [compute(m, ctx.batch(m)) for m in map(ctx.model, names)]
    extras = {key: grids[0].extras[key] for key in ("path", "approximation")
              if key in grids[0].extras}
    if len(grids) == 1:
        return Measurement(GRID, grids[0], extras=extras, parts=_parts(grids[0]))
    a, b = grids
    diff = Grid(a.axes, a.labels, b.values - a.values, method=a.method)
    parts = None if a.extras.get("per_prompt") is None or b.extras.get("per_prompt") is None \
        else grid_parts(b.extras["per_prompt"] - a.extras["per_prompt"])
    return Measurement(PAIR, diff, extras={"a": a, "b": b, "names": names, **extras},
                       parts=parts)


def _parts(grid: Grid):
    """Each prompt's entries ([entry, prompt], kept by the readouts), for the bootstrap."""
    per_prompt = grid.extras.get("per_prompt")
    return None if per_prompt is None else grid_parts(per_prompt)


@measurement("dla")
def _dla(ctx: MeasureContext) -> Measurement:
    from harness.measure.attribution import dla

    return _per_model_grids(ctx, lambda m, batch: dla(m.bridge, batch, by=ctx.claim.by,
                                                      engine=ctx.session.engine, key=m.key))


@measurement("logit_lens")
def _logit_lens(ctx: MeasureContext) -> Measurement:
    from harness.measure.attribution import logit_lens

    return _per_model_grids(
        ctx, lambda m, batch: logit_lens(m.bridge, batch, incl_mid=ctx.claim.incl_mid,
                                         engine=ctx.session.engine, key=m.key))
