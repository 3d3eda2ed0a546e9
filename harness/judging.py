"""Judging a measurement: the claim's expectation applied to its value, per prompt where the
claim asks (`per_prompt: all | any | {fraction}`), or to both ends of a bootstrap interval
(`ci`). Returns (held, detail, margin)."""

from __future__ import annotations

from harness.errors import MeasureError
from harness.expect import (
    MODIFIERS,
    PATCH,
    SCALAR,
    TEXT,
    TOKENS,
    Measurement,
    Outcome,
    compare,
    evaluate,
    fmt,
)
from harness.kinds.base import parse_comparison

# operators that read the whole claim's `trust` (never one prompt or an interval's end)
CLAIM_LEVEL = ("significant",)


def judge(claim, measurement: Measurement, defaults: dict,
          expect: dict) -> tuple[bool, str, float | None]:
    """Apply the expectation, per prompt where the claim asks for it. Per prompt means the
    quantity the claim reports, on each prompt; text and tokens are always judged on every
    prompt (their `mean` is `all`)."""
    whole = {k: v for k, v in expect.items() if k in CLAIM_LEVEL}
    if whole:
        rest = {k: v for k, v in expect.items() if k not in CLAIM_LEVEL}
        outcome = _combine(evaluate(whole, measurement, defaults))
        if all(k in MODIFIERS for k in rest):
            return outcome
        return both(judge(claim, measurement, defaults, rest), outcome)
    if _judged_per_prompt(claim, measurement):
        if not measurement.per_prompt:
            raise MeasureError(f"`per_prompt: {claim.per_prompt}` needs one value per prompt, "
                               f"and this {claim.measure} measurement has none")
        return _judge_per_prompt(claim, measurement, defaults, expect)
    if (getattr(claim, "ci", None) or getattr(claim, "confidence", None)) \
            and measurement.per_prompt:   # `confidence:` on a number gates its interval too
        return _judge_interval(measurement, defaults, expect)
    return _combine(evaluate(expect, measurement, defaults))


def _judged_per_prompt(claim, measurement: Measurement) -> bool:
    """Whether the expectation reads each prompt's value rather than one value."""
    if measurement.kind in (TEXT, TOKENS):
        return measurement.per_prompt is not None
    return measurement.kind in (SCALAR, PATCH) and claim.per_prompt != "mean"


def _judge_interval(measurement: Measurement, defaults: dict, expect: dict):
    """Gate on the bootstrap interval: scalar expectations accept an interval of values, so
    the whole confidence interval is inside it iff both of its ends are."""
    stats = measurement.extras["stats"]
    ends = [Measurement(SCALAR, stats[k]) for k in ("low", "high")]
    low, high = (_combine(evaluate(expect, m, defaults)) for m in ends)
    margins = [m for m in (low[2], high[2]) if m is not None]
    detail = f"{stats['ci']:.0%} interval [{fmt(stats['low'])}, {fmt(stats['high'])}] of " \
             f"the mean {fmt(stats['mean'])} over {stats['n']} prompts: " \
             f"low end {low[1]}; high end {high[1]}"
    return low[0] and high[0], detail, min(margins) if margins else None


def both(first: tuple, second: tuple) -> tuple[bool, str, float | None]:
    """Two judgements that must both hold, as one."""
    margins = [m for m in (first[2], second[2]) if m is not None]
    return (first[0] and second[0], "; ".join(x for x in (first[1], second[1]) if x),
            min(margins) if margins else None)


def _combine(outcomes: list[Outcome]) -> tuple[bool, str, float | None]:
    if not outcomes:     # no check ran: nothing held
        return False, "no expectation was checked", None
    margins = [o.margin for o in outcomes if o.margin is not None]
    return (all(o.ok for o in outcomes), "; ".join(o.detail for o in outcomes),
            min(margins) if margins else None)


def _judge_per_prompt(claim, measurement: Measurement, defaults: dict, expect: dict):
    prompts = measurement.extras.get("prompts", ())
    results = []
    each = measurement.extras.get("each") or [{}] * len(measurement.per_prompt)
    for value, own in zip(measurement.per_prompt, each):
        single = Measurement(measurement.kind, value, None, {**measurement.extras, **own})
        results.append(_combine(evaluate(expect, single, defaults)))
    held = [ok for ok, _, _ in results]
    worst = min(range(len(results)), key=lambda i: (results[i][0], results[i][2] or 0.0))
    worst_text = f"worst prompt {prompts[worst]!r}: {results[worst][1]}" if prompts else \
        results[worst][1]
    rule = claim.per_prompt
    if rule == "all" or (rule == "mean" and measurement.kind != SCALAR):
        ok = all(held)
    elif rule == "any":
        ok = any(held)
    else:
        op, bound = parse_comparison(rule["fraction"])
        fraction = sum(held) / len(held)
        outcome = compare(fraction, op, bound)
        return outcome.ok, f"held for {sum(held)}/{len(held)} prompts ({outcome.detail}); " \
                           f"{worst_text}", outcome.margin
    margins = [m for _, _, m in results if m is not None]
    margin = (min(margins) if rule == "all" else max(margins)) if margins else None
    return ok, f"held for {sum(held)}/{len(held)} prompts ({rule}); {worst_text}", margin
