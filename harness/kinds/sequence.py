"""Sequence metrics over a span of each prompt: `loss` and `accuracy`."""

from __future__ import annotations

from typing import Literal

from harness import labels
from harness.expect import SCALAR, Measurement
from harness.kinds.base import SEQUENCE_METRICS, MeasureContext, SingleModelClaim, measurement
from harness.kinds.fields import SpanSpec
from harness.kinds.measuring import interval, span_mask_of


class SequenceClaim(SingleModelClaim):
    VALUE_KIND = SCALAR
    HAS_INTERVALS = True
    RESAMPLES_PROMPTS = True

    PRIVATE_EXTRAS = ("each", "positions")

    span: SpanSpec = labels.DEFAULT_SPAN

    def reads_answers(self) -> bool:
        return False

    def scores_span(self) -> bool:
        return True


class LossClaim(SequenceClaim):
    """Mean next-token cross-entropy (nats) over a span, per prompt."""

    measure: Literal["loss"]
    FREEZE = "scalar"


class AccuracyClaim(SequenceClaim):
    """Share of a span's tokens that are the previous position's argmax, per prompt."""

    measure: Literal["accuracy"]
    FREEZE = "scalar"


@measurement(*SEQUENCE_METRICS)
def _sequence(ctx: MeasureContext) -> Measurement:
    from harness.measure.sequence import sequence_metric

    model = ctx.model(ctx.claim.model)
    batch = ctx.batch(model)
    mask = span_mask_of(ctx, model, batch)
    per_prompt = sequence_metric(model.bridge, batch.tokens, batch.tokens, mask,
                                 ctx.claim.measure, ctx.session.memory_budget_mb)
    extras = {"prompts": batch.texts, "positions": [int(n) for n in mask.sum(1)]}
    if ctx.claim.ci:
        extras["stats"] = interval(per_prompt, ctx.claim.ci, batch.texts)
    return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()), extras)
