"""Spec files -> verdicts, for the CLI (pytest drives `evaluate_claim` itself, per item)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.claims import Verdict, evaluate_claim
from harness.errors import HarnessError, ModelUnavailable, SpecError
from harness.prompts import single_token_id
from harness.session import Session
from harness.spec import Spec, read_spec, resolve_prompts


@dataclass
class SpecResult:
    """One spec file's outcome: verdicts, or the spec error that stopped it."""

    file: str
    spec: Spec | None = None
    error: SpecError | None = None
    verdicts: list[Verdict] = field(default_factory=list)


def check_tokens(spec: Spec, session: Session | None = None) -> list[SpecError]:
    """Answers, foils and span markers are one token, clean/corrupt pairs equally long, for
    each model that reads them (tokenizers only; models that cannot be had are left for claim
    time, where they are errors or skips). The same check as `harness validate`'s."""
    from harness.validate import token_errors

    session = session or Session(verbose=False)
    return token_errors(spec, lambda name: _tokenizer_or_none(spec, name, session),
                        single_token_id)


def _tokenizer_or_none(spec: Spec, name: str, session: Session):
    try:
        return session.tokenizer(spec, name)
    except ModelUnavailable:
        return None


def load_and_check(path: Path, session: Session, allow_remote_code: bool | None = None) -> Spec:
    """The stages before any weights load, each once and in order, for both front ends: read
    the spec (the file only), resolve its prompts (files, datasets, the corpus), check it
    against the models' config and tokenizer files, then (tokenizers loaded) that answers and
    foils are single tokens. Returns the spec with its prompts; raises SpecError."""
    return check_loaded(resolve_prompts(read_spec(path)), session, allow_remote_code)


def check_loaded(spec: Spec, session: Session, allow_remote_code: bool | None = None) -> Spec:
    """The static and token checks of `load_and_check` on a spec already read and resolved
    (`load_spec`: a notebook's)."""
    from harness.static_checks import check_spec

    allow = session.allow_remote_code if allow_remote_code is None else allow_remote_code
    errors = check_spec(spec, allow) or check_tokens(spec, session)
    if errors:
        errors[0].others = errors[1:]
        raise errors[0]
    return spec


def run_spec_file(path: Path, session: Session, result: SpecResult | None = None,
                  stop=None, select=None, indices: set[int] | None = None,
                  spec: Spec | None = None) -> SpecResult:
    """Load, check and evaluate one spec into `result` (filled as claims finish, so an
    interrupted run still knows what it did); `stop()` true stops between claims. `indices`:
    only the claims at these indices (a shard's). `spec`: the file already read and resolved
    (a shard plan read it), so only the checks run."""
    result = result or SpecResult(str(path))
    try:
        result.spec = load_and_check(path, session) if spec is None else \
            check_loaded(spec, session)
    except SpecError as exc:
        result.error = exc
        return result
    except HarnessError as exc:
        result.error = SpecError(str(exc), file=str(path))
        return result
    try:
        return run_spec(result.spec, session, result, select=select, stop=stop,
                        indices=indices)
    except SpecError as exc:   # found only at claim time: this spec stops, the run goes on
        result.error = exc
        return result


def run_spec(spec: Spec, session: Session, result: SpecResult | None = None, select=None,
             stop=None, indices: set[int] | None = None) -> SpecResult:
    """Evaluate the claims of a loaded spec (its tokens already checked) that `select`
    (selection.py) keeps, all without it, and only those at `indices` (a shard's) when given;
    `stop()` true stops between claims."""
    result = result or SpecResult(spec.file, spec)
    for index, claim in enumerate(spec.claims):
        if stop is not None and stop():
            raise KeyboardInterrupt
        if indices is not None and index not in indices:
            continue
        if select is None or select(spec.file, spec.spec, claim.id, claim.measure):
            result.verdicts.append(_evaluate_shown(spec, index, session))
    return result


def _evaluate_shown(spec: Spec, index: int, session: Session) -> Verdict:
    """`evaluate_claim`, shown as it runs when the session has a `progress` (a bar on a
    terminal) and as it finishes (a line)."""
    progress = session.progress
    if progress is None:
        return evaluate_claim(spec, index, session)
    with progress.claim(f"{spec.spec}::{spec.claims[index].id}"):
        verdict = evaluate_claim(spec, index, session)
    progress.line(verdict)
    return verdict


def exit_code(results: list[SpecResult]) -> int:
    """0 all passed; 1 a claim failed or errored; 2 a spec could not be evaluated."""
    if any(r.error for r in results):
        return 2
    bad = {"failed", "error"}
    return 1 if any(v.status in bad for r in results for v in r.verdicts) else 0


LIMITED = 3   # every claim run held, but on the first N prompts only (--limit): not a full check


def exit_code_limited(results: list[SpecResult], limit: int | None) -> int:
    """`exit_code`, except that a passing run limited to the first N prompts exits 3: CI must
    not mistake a quick look for a full check."""
    code = exit_code(results)
    return LIMITED if code == 0 and limit is not None else code
