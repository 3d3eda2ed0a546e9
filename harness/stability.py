"""How stable a verdict is under a bootstrap over prompts: the share of resamples of the
claim's prompts (drawn with replacement, seeded) on which its expectation still holds.

Every resample recomputes the measured value from the per-prompt tensors the measurement
kept (`Measurement.parts`, or each prompt's value for a scalar): one weighted mean per
resample, a matrix product, and no forward pass. `confidence:` on a claim fails it when the
expectation holds in fewer resamples than that share. Pure and seeded: the same measurement
gives the same numbers in any process."""

from __future__ import annotations

import dataclasses
import math

import torch

from harness.expect import (
    MODIFIERS,
    PATCH,
    SCALAR,
    Measurement,
    Outcome,
    evaluate,
)
from harness.judging import CLAIM_LEVEL
from harness.measure.results import Grid, PromptParts

RESAMPLES = 200   # enough for a share to +-0.035 (one standard error at 0.5)
SEED = 0          # a constant: never derived from the process, the time or the claim order


def resample_means(parts: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The mean of every part over `resamples` bootstrap draws of the prompts: [resample, ...]
    per part. One draw of prompt indices serves every part (the prompts stay paired)."""
    n = int(next(iter(parts.values())).shape[0])
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (resamples, n), generator=generator)
    weights = torch.zeros(resamples, n, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.full((resamples, n), 1.0 / n, dtype=torch.float64))
    return {name: (weights @ part.detach().cpu().to(torch.float64).reshape(n, -1))
            .reshape(resamples, *part.shape[1:]) for name, part in parts.items()}


def prompt_parts(claim, measurement: Measurement) -> PromptParts | None:
    """What to resample: the parts the measurement kept, or for a number judged on its mean
    each prompt's value (and the per-prompt numbers operators read beside it, `each`)."""
    if measurement.parts is not None:
        return measurement.parts
    if measurement.kind not in (SCALAR, PATCH) or not measurement.per_prompt \
            or claim.per_prompt != "mean":
        return None
    parts = {"value": torch.tensor(measurement.per_prompt, dtype=torch.float64)}
    each = measurement.extras.get("each")
    if each and all(isinstance(v, int | float) for v in each[0].values()):
        for key in each[0]:
            parts[key] = torch.tensor([row[key] for row in each], dtype=torch.float64)
    return PromptParts(parts, _means_as_they_are)


def _means_as_they_are(means: dict) -> dict:
    """A number's resample: its mean, and the means of `each` (read as modifiers)."""
    return means


def _resampled(measurement: Measurement, parts: PromptParts, combined, r: int) -> Measurement:
    """Resample r as a measurement the expectation can read."""
    if isinstance(combined, dict):   # a scalar: its mean, and `each`'s means as modifiers
        own = {k: float(v[r]) for k, v in combined.items() if k != "value"}
        return Measurement(measurement.kind, float(combined["value"][r]), None,
                           {**measurement.extras, **own})
    row = combined[r]
    if parts.read is not None:
        value = parts.read(row)
    elif isinstance(measurement.value, Grid):
        value = dataclasses.replace(measurement.value, values=row.float(), raw=None, extras={})
    else:
        value = float(row)
    return Measurement(measurement.kind, value, None, measurement.extras)


def checks(expect: dict) -> dict:
    """The part of `expect` a resample is judged on: its operators and tolerances (a baseline
    compares with a stored value, and `significant` with random selections, not with the
    prompts)."""
    return {k: v for k, v in expect.items() if k != "baseline" and k not in CLAIM_LEVEL}


def stability(claim, measurement: Measurement, defaults: dict, expect: dict,
              resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """The `trust` entries of a claim's bootstrap: `stability` (the share of resamples on which
    every check of `expect` holds), `resamples`, `seed`, the claim's `confidence`, and
    `bootstrap`, each resample's margin (distance to the bound, positive when it holds) where
    every check gives one. None where the measurement keeps no per-prompt values, has fewer
    than two prompts, or `expect` holds no check."""
    parts = prompt_parts(claim, measurement)
    expect = checks(expect)
    if parts is None or parts.n_prompts < 2 or all(k in MODIFIERS for k in expect):
        return None
    combined = parts.combine(resample_means(parts.parts, resamples, seed))
    held, margins = 0, []
    for r in range(resamples):
        outcomes = evaluate(expect, _resampled(measurement, parts, combined, r), defaults)
        held += bool(outcomes) and all(o.ok for o in outcomes)
        margins.append(_margin(outcomes))
    trust = {"stability": round(held / resamples, 4), "resamples": resamples, "seed": seed}
    if getattr(claim, "confidence", None) is not None:
        trust["confidence"] = claim.confidence
    if margins and None not in margins and all(map(math.isfinite, margins)):   # strict JSON
        trust["bootstrap"] = [float(f"{m:.4g}") for m in margins]
    return trust


def _margin(outcomes: list[Outcome]) -> float | None:
    margins = [o.margin for o in outcomes]
    return min(margins) if margins and None not in margins else None


def with_interval(claim, measurement: Measurement) -> Measurement:
    """`confidence:` on a number judged on its mean gates the bootstrap interval at that level,
    as `ci:` does: the interval is added where the kind did not compute one."""
    level = getattr(claim, "confidence", None)
    if level is None or "stats" in measurement.extras or not measurement.per_prompt \
            or measurement.kind not in (SCALAR, PATCH) or claim.per_prompt != "mean":
        return measurement
    from harness.kinds.measuring import interval

    texts = measurement.extras.get("prompts") or [""] * len(measurement.per_prompt)
    stats = interval(torch.tensor(measurement.per_prompt, dtype=torch.float64), level, texts)
    return dataclasses.replace(measurement, extras={**measurement.extras, "stats": stats})


def gate(claim, trust: dict | None, judged: tuple) -> tuple:
    """`confidence:` on a grid, ranking or circuit: the claim fails when its expectation holds
    in fewer resamples than that share. (A scalar's `confidence` gates its interval instead,
    in `judging.judge`.)"""
    ok, message, margin = judged
    level = getattr(claim, "confidence", None)
    if level is None or claim.value_kind() in (SCALAR, PATCH):
        return judged
    if trust is None:    # never a silent pass: the share asked for was not measured
        note = f"confidence {level:g} cannot be checked: the measurement has fewer than two " \
               "prompts to resample (or kept no per-prompt values); give the claim more prompts"
        return False, f"{message}; {note}" if message else note, margin
    share = trust["stability"]
    word = "at least" if share >= level else "fewer than"
    note = f"holds in {share:.0%} of {trust['resamples']} bootstrap resamples of the prompts " \
           f"({word} confidence {level:g})"
    return ok and share >= level, f"{message}; {note}" if message else note, margin


__all__ = ["RESAMPLES", "SEED", "checks", "gate", "prompt_parts", "resample_means",
           "stability", "with_interval"]
