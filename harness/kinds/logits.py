"""Behavior at the final position: `logit_diff` (answer - foil) and `top_k` tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.expect import ANSWER_OPERATORS, SCALAR, TOKENS, Measurement
from harness.kinds.base import Index, MeasureContext, PerPrompt, SingleModelClaim, measurement
from harness.kinds.measuring import answers_of, scalar_over_prompts


class LogitDiffClaim(SingleModelClaim):
    measure: Literal["logit_diff"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    SEARCHABLE = True
    HAS_INTERVALS = True
    RESAMPLES_PROMPTS = True


class TopKClaim(SingleModelClaim):
    measure: Literal["top_k"]
    FREEZE = "tokens"
    VALUE_KIND = TOKENS
    SEARCHABLE = True
    k: int = Field(10, ge=1)
    per_prompt: PerPrompt = "all"
    REPORT_EXTRAS = ("probabilities", "prompts")
    PER_PROMPT_LISTING = "tokens"

    def indices(self) -> list[Index]:
        return [Index(("k",), "vocab", self.k)]

    def reads_answers(self) -> bool:
        return bool(set(self.expect) & set(ANSWER_OPERATORS))   # answer expectations only


@measurement("logit_diff")
def _logit_diff(ctx: MeasureContext) -> Measurement:
    from harness.measure.logits import logit_diff

    model = ctx.model(ctx.claim.model)
    batch = ctx.batch(model)
    per_prompt = logit_diff(model.bridge, batch, ctx.session.memory_budget_mb)
    return scalar_over_prompts(ctx, per_prompt, batch.texts)


@measurement("top_k")
def _top_k(ctx: MeasureContext) -> Measurement:
    from harness.measure.logits import top_k_tokens

    model = ctx.model(ctx.claim.model)
    batch = ctx.batch(model)
    tops = top_k_tokens(model.bridge, model.tokenizer, batch, ctx.claim.k,
                        ctx.session.memory_budget_mb)
    per_prompt = tuple([tok for tok, _ in row] for row in tops)
    return Measurement(TOKENS, per_prompt[0], per_prompt,
                       {"prompts": batch.texts, "probabilities": [[p for _, p in row]
                                                                  for row in tops],
                        "each": answers_of(ctx)})
