"""`edge_scores`: every edge of the model's graph scored on the claim's clean/corrupt prompts;
the value is a one-axis grid of edges (`top`, `argmax`, `only_above` name edges by label).

Methods live in `METHODS` (method name -> function of the context, the model's edge forward,
its inputs and the claim, returning per-edge, per-prompt effects): `exact` runs the clean input
once per edge with only that edge carrying its sender's corrupt-run output (small graphs);
`eap` and `eap-ig` estimate the same effects from gradients, every edge at once.
A new method is one function and one entry here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.expect import GRID, Measurement
from harness.kinds.base import MeasureContext, SingleModelClaim, measurement
from harness.kinds.measuring import edge_ablation


def _exact(ctx: MeasureContext, ef, clean, ablated, batch):
    """[edge, prompt] effects of patching each edge alone (edge_circuits.exact_edge_scores)."""
    from harness.measure.edge_circuits import exact_edge_scores

    effects, _ = exact_edge_scores(ef, clean, ablated, batch, ctx.claim.metric,
                                   ctx.session.memory_budget_mb)
    return effects


def _attribution(ctx: MeasureContext, ef, clean, ablated, batch):
    """[edge, prompt] EAP or EAP-IG estimates of the same effects (edge_attribution.py): one
    forward and backward pass (per integration step) for every edge."""
    from harness.measure.edge_attribution import Prompts, attribution_effects
    from harness.measure.edge_discovery import edge_pairs

    claim = ctx.claim
    prompts = Prompts(batch.tokens, batch.corrupt_tokens, batch.final_pos, batch.answer_ids,
                      batch.foil_ids)
    effects = attribution_effects(ef, prompts, claim.method, claim.steps or DEFAULT_STEPS,
                                  claim.metric, ctx.session.memory_budget_mb)
    s, r = (list(x) for x in zip(*edge_pairs(ef.graph)))
    return effects[:, s, r].T


DEFAULT_STEPS = 5    # EAP-IG's integration steps when a claim gives none
METHODS: dict[str, Callable] = {"exact": _exact, "eap": _attribution, "eap-ig": _attribution}


class EdgeScoresClaim(SingleModelClaim):
    """Every edge scored by how much corrupting it alone changes the metric."""

    measure: Literal["edge_scores"]
    FREEZE = "grid"
    VALUE_KIND = GRID
    RESAMPLES_PROMPTS = True
    REPORT_EXTRAS = ("prompts", "method", "metric")
    method: str = "exact"
    metric: Literal["logit_diff", "loss", "kl"] = "logit_diff"
    steps: int | None = Field(None, ge=1, le=1000)   # integration steps (eap-ig)
    # the score of an edge: how much the metric worsens when the edge is corrupted (logit diff
    # falls, loss or KL rises); `absolute: true` ranks by its size whatever the sign
    absolute: bool = True

    @field_validator("method")
    @classmethod
    def _known_method(cls, value):
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; use one of {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _steps_for_ig(self):
        if self.steps is not None and self.method != "eap-ig":
            raise ValueError(f"`steps` is EAP-IG's number of integration steps; `method: "
                             f"{self.method}` takes none")
        return self

    def needs_corrupt(self) -> bool:
        return True

    def pairs_clean_and_corrupt(self) -> bool:
        return True

    def reads_answers(self) -> bool:
        return self.metric != "kl"

    def scores_span(self) -> bool:
        return False


@measurement("edge_scores")
def _edge_scores(ctx: MeasureContext) -> Measurement:
    from harness.measure.results import Grid, PromptParts, mean_value

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    ef, clean, ablated, extras = edge_ablation(ctx, model, batch, "corrupt", 0)
    effects = METHODS[claim.method](ctx, ef, clean, ablated, batch)   # [edge, prompt]
    worse = -effects if claim.metric == "logit_diff" else effects
    scores = worse.mean(-1)
    if claim.absolute:
        scores = scores.abs()
    labels = tuple(e.label for e in ef.graph.edges)
    extras.update({"prompts": batch.texts, "method": claim.method, "metric": claim.metric})
    grid = Grid(("edge",), (labels,), scores.float(), extras=extras)
    parts = PromptParts({"value": worse.float().T.cpu()},
                        _absolute_mean if claim.absolute else mean_value)
    return Measurement(GRID, grid, extras=extras, parts=parts)


def _absolute_mean(means: dict):
    """An edge's score from its mean effect, ranked by size (`absolute: true`)."""
    return means["value"].abs()
