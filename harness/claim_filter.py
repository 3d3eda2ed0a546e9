"""Which claims a run evaluates: `-k EXPR` (pytest's -k syntax), `--last-failed` (state kept
beside the specs in `.harness-state.json`, gitignored) and `SPEC::CLAIM` ids. Pure functions
apart from reading and writing the state file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError
from harness.files import UnreadableFile, read_regular_text

STATE_FILE = ".harness-state.json"
BAD = ("failed", "error")

Select = Callable[[str, str, str], bool]   # (spec file, spec name, claim id) -> run it?


def keyword_matcher(expression: str) -> Callable[[list[str]], bool]:
    """pytest's `-k`: `and`/`or`/`not` of case-insensitive substrings of a claim's names (its
    `spec::claim` id, the spec file's stem, its measure)."""
    from _pytest.mark.expression import Expression

    try:
        compiled = Expression.compile(expression)
    except SyntaxError as exc:   # pytest raises its own SyntaxError subclass
        raise HarnessError(f"-k: invalid expression {_shown(expression)}: {exc.msg}; write "
                           "it as for pytest, e.g. -k 'flip and not approx'") from None
    except RecursionError:       # the parser recurses once per level of nesting
        raise HarnessError(f"-k: expression {_shown(expression)} nests too deeply; write it "
                           "with fewer parentheses or `not`s") from None

    def matches(names: list[str]) -> bool:
        lowered = [n.lower() for n in names]
        return compiled.evaluate(lambda sub, **_: any(sub.lower() in n for n in lowered))
    return matches


def _shown(expression: str) -> str:
    return repr(expression if len(expression) <= 80 else expression[:77] + "...")


def state_path(spec_file: str | Path) -> Path:
    return Path(spec_file).resolve().parent / STATE_FILE


def read_state(path: Path) -> dict[str, dict]:
    """The state file's entries {spec file name: {"failed": [claim id, ...]}}. It is a cache:
    an unreadable file, or an entry of another shape (hand-edited, another tool's), counts as
    nothing known rather than stopping a run whose claims are already measured."""
    try:
        state = json.loads(read_regular_text(path, 64_000_000))
    except (OSError, ValueError, UnreadableFile):
        return {}
    if not isinstance(state, dict):
        return {}
    return {name: entry for name, entry in state.items()
            if isinstance(entry, dict) and isinstance(entry.get("failed"), list)
            and all(isinstance(c, str) for c in entry["failed"])}


def read_failed(spec_file: str | Path) -> set[str] | None:
    """The claim ids of a spec that failed or errored in its last run; None if never run."""
    entry = read_state(state_path(spec_file)).get(Path(spec_file).name)
    return None if entry is None else set(entry["failed"])


def record_run(spec_file: str | Path, statuses: dict[str, str], claim_ids: list[str]) -> Path:
    """Remember which claims failed: claims run now replace what was known about them; claims
    no longer in the spec are forgotten. Read and write under the folder's lock, so runs of
    other specs in the folder at the same time keep their entries."""
    from harness.jsonfiles import locked, write_atomic

    path = state_path(spec_file)
    with locked(path):
        state = read_state(path)
        before = set(state.get(Path(spec_file).name, {}).get("failed", []))
        failed = {c for c in before if c not in statuses} | {c for c, s in statuses.items()
                                                             if s in BAD}
        state[Path(spec_file).name] = {"failed": [c for c in claim_ids if c in failed]}
        write_atomic(path, json.dumps(state, indent=1, sort_keys=True) + "\n")
    return path


def selector(keyword: str | None = None, last_failed: bool = False,
             claim_id: str | None = None) -> Select | None:
    """A predicate over claims for the given options; None selects everything."""
    if not (keyword or last_failed or claim_id):
        return None
    match = keyword_matcher(keyword) if keyword else None

    def select(spec_file: str, spec_name: str, claim: str, measure: str = "") -> bool:
        if claim_id is not None and claim != claim_id:
            return False
        if match and not match([f"{spec_name}::{claim}", Path(spec_file).stem, measure]):
            return False
        if last_failed:
            failed = read_failed(spec_file)
            return failed is None or not _any_failed_known(spec_file) or claim in failed
        return True
    return select


def _any_failed_known(spec_file: str) -> bool:
    """Like pytest's --lf: with nothing known to have failed, everything runs."""
    return bool(read_failed(spec_file))
