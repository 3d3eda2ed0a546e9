"""Evaluating claims: a claim's measurement (its kind's function, `harness/kinds/`) run in a
`ClaimContext`, judged (`judging.py`), searched for counterexamples (`search.py`), compared
with its baseline, and turned into a `Verdict` (`verdicts.py`). Never raises for claim-level
problems. A kind without its measurement stops this module's import (`check_registry`)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from harness import kinds
from harness.errors import HarnessError, MeasureError, ModelUnavailable, SpecError
from harness.expect import MODIFIERS, PAIR, Measurement, evaluate, kind_of
from harness.judging import _combine, judge  # noqa: F401  (re-exported)
from harness.kinds.base import MEASUREMENTS, ClaimBase
from harness.kinds.features import _ranked  # noqa: F401  (re-exported)
from harness.models import LoadedModel
from harness.session import Session
from harness.spec import Spec
from harness.stability import gate, stability, with_interval
from harness.verdicts import (  # noqa: F401  (re-exported)
    ERROR,
    FAILED,
    PASSED,
    SKIPPED,
    XFAILED,
    Verdict,
    report_extras,
    to_jsonable,
)


class Skip(Exception):
    """A claim that cannot run here for a stated, acceptable reason (an optional model)."""


@dataclass
class ClaimContext:
    spec: Spec
    claim: ClaimBase
    session: Session
    prompts: tuple | None = None   # overrides the claim's prompts (counterexample search)

    @property
    def prepend_bos(self) -> bool:
        own = self.claim.prepend_bos
        return self.spec.defaults.prepend_bos if own is None else own

    def model(self, name: str) -> LoadedModel:
        try:
            return self.session.model(self.spec, name)
        except ModelUnavailable as exc:
            if self.spec.models[name].optional:
                raise Skip(f"optional model '{name}' is unavailable: {exc}") from None
            raise

    def batch(self, model: LoadedModel):
        prompts = self.prompts or self.spec.claim_prompts(self.claim)
        if self.session.limit is not None:   # --limit N: a quick look at the first N
            prompts = prompts[: self.session.limit]
        return self.session.batch(self.spec, prompts, model, self.prepend_bos,
                                  answers=self.claim.reads_answers())


MEASURES: dict[str, Callable[[ClaimContext], Measurement]] = {}


# The measurement of each kind, registered by the kinds' modules (`@measurement`).
MEASURES: dict[str, Callable[[ClaimContext], Measurement]] = MEASUREMENTS


def measure(name: str):
    """Register the measurement of the claim kind `name` (a measure of kinds.CLAIM_CLASSES)."""
    if name not in kinds.MEASURES:
        raise ValueError(f"@measure({name!r}): no claim class in kinds.CLAIM_CLASSES declares "
                         "that measure; add its class there first")

    def register(fn):
        MEASURES[name] = fn
        return fn
    return register


def check_registry() -> None:
    """Every claim kind of the spec has exactly one measurement here (checked at import)."""
    missing = [m for m in kinds.MEASURES if m not in MEASURES]
    if missing:
        raise ImportError(f"harness/kinds/ has no @measure for {', '.join(missing)}: every claim "
                          "class of kinds.CLAIM_CLASSES needs its measurement")


def evaluate_claim(spec: Spec, index: int, session: Session) -> Verdict:
    """Measure one claim and apply its expectation. Never raises for claim-level problems."""
    claim = spec.claims[index]
    verdict = Verdict(spec.spec, spec.file, spec.line_of(("claims", index)), claim.id,
                      claim.measure, claim.model_names(), ERROR, claim.expect)
    verdict.extras["params"] = claim.model_dump(
        mode="json", by_alias=True, exclude_none=True,
        exclude={"id", "expect", "measure", "description", "model", "models"})
    if claim.skip:
        verdict.status, verdict.message = SKIPPED, claim.skip
        return verdict
    start = time.perf_counter()
    try:
        ctx = ClaimContext(spec, claim, session)
        measurement = with_interval(claim, MEASURES[claim.measure](ctx))
        if claim.against is not None:
            _against_chance(ctx, measurement)
        defaults = spec.defaults.tolerance.model_dump()
        if claim.tolerance:
            defaults.update(claim.tolerance.model_dump())
        verdict.measured = to_jsonable(measurement)
        verdict.extras.update(report_extras(measurement, type(claim)))
        _refuse_nan(verdict, measurement)
        expect = {k: v for k, v in claim.expect.items() if k != "baseline"}
        if any(k not in MODIFIERS for k in expect):
            ok, message, margin = judge(claim, measurement, defaults, expect)
            trust = stability(claim, measurement, defaults, expect)
            if trust:
                verdict.extras["trust"] = {**verdict.extras.get("trust", {}), **trust}
            ok, message, margin = gate(claim, trust, (ok, message, margin))
        elif claim.expect.get("baseline") or spec.defaults.baseline:
            ok, message, margin = True, "", None     # the baseline comparison below decides
        else:
            raise MeasureError("`expect` holds no check (only a tolerance): nothing to judge")
        if claim.holdout is not None:
            ok, message, margin = _on_holdout(ctx, defaults, expect, verdict,
                                              (ok, message, margin))
        if claim.search is not None and ok:
            ok, message = _search(spec, claim, session, defaults, expect, verdict, message)
        if claim.expect.get("baseline") or spec.defaults.baseline:
            ok, message, margin = _with_baseline(spec, claim, session, verdict, defaults,
                                                 (ok, message, margin))
        verdict.status, verdict.message, verdict.margin = (PASSED if ok else FAILED), message, \
            margin
    except Skip as exc:
        verdict.status, verdict.message = SKIPPED, str(exc)
    except SpecError:
        raise
    except HarnessError as exc:
        verdict.status, verdict.message = ERROR, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a bug or an unsupported model: report, keep going
        verdict.status = ERROR
        verdict.message = f"{type(exc).__name__}: {exc}"
        verdict.extras["traceback"] = traceback.format_exc()
    verdict.seconds = time.perf_counter() - start
    session.note_claim(verdict.seconds)
    return _apply_xfail(claim, verdict)


def _refuse_nan(verdict: Verdict, measurement: Measurement) -> None:
    """A NaN (or the inf of a division by zero) is not a value any expectation can judge: the
    claim is an error that says why, and reports hold null instead (strict JSON). The values
    judged are the measured value, each prompt's and a `ci` interval's ends."""
    from harness.jsonfiles import finite, not_finite

    judged = [verdict.measured, list(measurement.per_prompt or ()),
              measurement.extras.get("stats")]
    if not_finite(judged):
        verdict.measured = finite(verdict.measured)
        verdict.extras = finite(verdict.extras)
        raise MeasureError("the measurement is not a finite number (NaN or inf), e.g. a "
                           "normalized effect whose `from` and `into` runs have the same "
                           "logit difference; use `metric: logit_diff` or runs that differ")


def _against_chance(ctx: ClaimContext, measurement: Measurement) -> None:
    """`against: random`: the claim's value for N random selections (its kind's
    `chance_measurement`), and the named one's percentile and p-value among them, into the
    measurement's `trust` (the random values beside it, for histograms)."""
    from harness.chance import summary
    from harness.kinds.base import CHANCE_MEASUREMENTS

    against = ctx.claim.against
    values = CHANCE_MEASUREMENTS[ctx.claim.measure](ctx, against.random, against.seed)
    trust = measurement.extras.setdefault("trust", {})
    trust.update(summary(measurement.value, values, ctx.claim.expect, against.seed))
    measurement.extras["random_values"] = list(values)


def _on_holdout(ctx: ClaimContext, defaults, expect, verdict, judged):
    """`holdout: SET`: the claim measured again on that prompt set, where the expectation
    (but `significant`, which reads the claim's own prompts) must hold too."""
    from harness.judging import CLAIM_LEVEL, both

    claim = ctx.claim
    held = with_interval(claim, MEASURES[claim.measure](
        ClaimContext(ctx.spec, claim, ctx.session, prompts=ctx.spec.prompt_set(claim.holdout))))
    rest = {k: v for k, v in expect.items() if k not in CLAIM_LEVEL}
    if any(k not in MODIFIERS for k in rest):
        ok, message, margin = judge(claim, held, defaults, rest)
    else:
        ok, message, margin = True, "", None
    trust = verdict.extras.setdefault("trust", {})
    trust.update({"holdout": to_jsonable(held), "holdout_passed": ok})
    return both(judged, (ok, f"on holdout '{claim.holdout}': {message}" if message else "",
                         margin))


def _search(spec, claim, session, defaults, expect, verdict, message):
    """Look for a prompt of the family that breaks the claim; record what was found."""
    from harness.search import search_claim

    def holds(prompt) -> tuple[bool, str]:
        ctx = ClaimContext(spec, claim, session, prompts=(prompt,))
        single = MEASURES[claim.measure](ctx)
        ok, detail, _ = _combine(evaluate(expect, Measurement(single.kind, single.per_prompt[0]),
                                          defaults))
        return ok, detail

    ok, message, verdict.extras["search"] = search_claim(spec, claim, holds, message)
    return ok, message


def _with_baseline(spec, claim, session, verdict, defaults, judged):
    """Add the comparison with the stored baseline (or, when updating, with itself)."""
    from harness.baselines import drift, stored_value
    from harness.expect import OPERATORS

    stored = verdict.measured if session.update_baselines else \
        stored_value(spec.file, claim.id)
    mods = {**defaults, **{k: v for k, v in claim.expect.items() if k in ("atol", "rtol")},
            "stored": stored}
    outcome = OPERATORS["baseline"].check(verdict.measured, True, mods)
    verdict.extras["baseline"] = {"stored": stored, "drift": drift(verdict.measured, stored)}
    ok, message, margin = judged
    margins = [m for m in (margin, outcome.margin) if m is not None]
    return (ok and outcome.ok, "; ".join(x for x in (message, outcome.detail) if x),
            min(margins) if margins else None)


def _apply_xfail(claim, verdict: Verdict) -> Verdict:
    if not claim.xfail:
        return verdict
    if verdict.status == FAILED:
        verdict.status = XFAILED
        verdict.message = f"expected failure ({claim.xfail}): {verdict.message}"
    elif verdict.status == PASSED:
        verdict.status = FAILED
        verdict.message = f"unexpectedly passed, but is marked xfail ({claim.xfail}); " \
                          f"remove the mark: {verdict.message}"
    return verdict


check_registry()

__all__ = ["evaluate_claim", "Verdict", "MEASURES", "PASSED", "FAILED", "ERROR", "SKIPPED",
           "XFAILED", "kind_of", "PAIR"]
