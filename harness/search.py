"""Counterexample search: hypothesis looks for the prompt of a claim's family that breaks it.

The family is every template of the claim's prompt set (any combination of its values) and
every word substitution the claim lists. Hypothesis shrinks a failure towards the first value
of each list, so the reported counterexample is minimal. Runs are derandomized (same examples
every CI run) and every counterexample found is stored beside the spec
(`<spec>.counterexamples.json`) and tried first next time, as long as it is still a prompt of
the family (one from a removed template value or substitution is ignored).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from harness.jsonfiles import (
    CorruptFile,
    adopt_legacy_companion,
    companion_path,
    companion_to_read,
    dumps,
    locked,
    read_object,
    write_atomic,
)
from harness.spec import Prompt, PromptEntry


@dataclass(frozen=True)
class Counterexample:
    prompt: Prompt
    choices: dict          # the template values and substitutions that produced it
    detail: str            # why the claim fails on it
    known: bool            # found in the store from an earlier run


def store_path(spec_file: str) -> Path:
    """specs/x.yaml -> specs/x.counterexamples.json (x.yml -> x.yml.counterexamples.json)"""
    return companion_path(spec_file, "counterexamples")


def family_strategy(entries: tuple[PromptEntry, ...], substitute: dict[str, list[str]]):
    """Examples are dicts {"entry": i, "values": {...}, "swap": {...}}."""
    options = []
    for i, entry in enumerate(entries):
        values = entry.values or {}
        options.append(st.fixed_dictionaries({
            "entry": st.just(i),
            "values": st.fixed_dictionaries({k: st.sampled_from(v) for k, v in values.items()}),
            "swap": st.fixed_dictionaries({w: st.sampled_from([w, *alts])
                                           for w, alts in substitute.items()}),
        }))
    return st.one_of(options)


def build_prompt(entries: tuple[PromptEntry, ...], choices: dict) -> Prompt:
    entry = entries[choices.get("entry", 0)]
    text = entry.template.format(**choices.get("values", {})) if entry.template else entry.text
    for word, replacement in choices.get("swap", {}).items():
        text = re.sub(rf"\b{re.escape(word)}\b", replacement, text)
    return Prompt(text=text, answer=entry.answer, foil=entry.foil, loc=("prompts",))


def search(entries: tuple[PromptEntry, ...], substitute: dict[str, list[str]],
           holds: Callable[[Prompt], tuple[bool, str]], max_examples: int,
           spec_file: str, claim_id: str) -> Counterexample | None:
    """The minimal prompt of the family on which `holds` is False, or None."""
    entries = tuple(e for e in entries if e.text is not None or e.template is not None)
    if not entries:
        return None
    store = _read_store(spec_file)
    for choices in store.get(claim_id, []):
        if _still_fits(entries, substitute, choices):
            prompt = build_prompt(entries, choices)
            ok, detail = holds(prompt)
            if not ok:
                return Counterexample(prompt, choices, detail, known=True)
    try:
        choices = find(family_strategy(entries, substitute),
                       lambda c: not holds(build_prompt(entries, c))[0],
                       settings=settings(max_examples=max_examples, derandomize=True,
                                         database=None, deadline=None,
                                         phases=[Phase.generate, Phase.shrink],
                                         suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        return None
    prompt = build_prompt(entries, choices)
    _remember(spec_file, claim_id, choices)
    return Counterexample(prompt, choices, holds(prompt)[1], known=False)


def stale_stored(entries: tuple[PromptEntry, ...], substitute: dict[str, list[str]],
                 spec_file: str, claim_id: str) -> int:
    """How many stored counterexamples of a claim are no longer prompts of its family (and so
    were not tried), for the report."""
    entries = tuple(e for e in entries if e.text is not None or e.template is not None)
    return sum(not _still_fits(entries, substitute, c)
               for c in _read_store(spec_file).get(claim_id, []))


def _still_fits(entries: tuple[PromptEntry, ...], substitute: dict[str, list[str]],
                choices: dict) -> bool:
    """A stored counterexample is still a prompt of the claim's family: its entry exists, and
    each of its template values and substitutions is still listed (the spec may have changed
    since). One that is not is ignored, never judged: a prompt removed from the family says
    nothing about the claim (it stays in the store)."""
    entry = choices.get("entry", 0)
    if not 0 <= entry < len(entries):
        return False
    values, listed = choices.get("values", {}), entries[entry].values or {}
    swaps = choices.get("swap", {})
    return set(values) == set(listed) and all(v in listed[k] for k, v in values.items()) \
        and all(w in substitute and r in [w, *substitute[w]] for w, r in swaps.items())


def _read_store(spec_file: str) -> dict:
    """Stored counterexamples {claim id: [choices, ...]}; CorruptFile naming the file when it
    is not what the harness wrote (never silently replaced: it holds other claims' finds)."""
    path = companion_to_read(spec_file, "counterexamples")
    store = read_object(path, "fix it or delete it (it holds the counterexamples earlier runs "
                              "found; deleting forgets them)")
    for claim_id, found in store.items():
        if not isinstance(found, list) or not all(
                isinstance(c, dict) and isinstance(c.get("entry", 0), int)
                and isinstance(c.get("values", {}), dict) and isinstance(c.get("swap", {}), dict)
                for c in found):
            raise CorruptFile(f"{path}: the entry of claim '{claim_id}' is not a list of "
                              "{entry, values, swap} choices; fix it or delete the file")
    return store


def _remember(spec_file: str, claim_id: str, choices: dict) -> None:
    """Add a counterexample to the store: read again under the lock so that finds of other
    runs since this one read it are kept."""
    path = store_path(spec_file)
    with locked(path):
        adopt_legacy_companion(spec_file, "counterexamples")
        store = _read_store(spec_file)
        known = store.setdefault(claim_id, [])
        if choices not in known:
            known.insert(0, choices)
        write_atomic(path, dumps(store, indent=1, sort_keys=True) + "\n")


def search_claim(spec, claim, holds: Callable[[Prompt], tuple[bool, str]],
                 message: str) -> tuple[bool, str, dict]:
    """A claim's `search:` over its prompt family: (still holds, the verdict's message, what
    the report records of the search)."""
    entries = spec.prompt_sets[claim.prompts] if claim.prompts else spec.prompts
    found = search(entries, claim.search.substitute, holds, claim.search.max_examples,
                   spec.file, claim.id)
    stale = stale_stored(entries, claim.search.substitute, spec.file, claim.id)
    ignored = f"; {stale} stored counterexample{'s' * (stale > 1)} ignored: no longer " \
              "prompts of the claim's family" if stale else ""
    if found is None:
        record = {"max_examples": claim.search.max_examples, "found": None,
                  **({"ignored_stored": stale} if stale else {})}
        return True, f"{message}; search of {claim.search.max_examples} examples found no " \
                     f"counterexample{ignored}", record
    record = {"found": found.prompt.text, "choices": found.choices, "known": found.known,
              "detail": found.detail, **({"ignored_stored": stale} if stale else {})}
    origin = "known counterexample still fails" if found.known else "counterexample found"
    return False, f"{origin}: {found.prompt.text!r} ({found.detail}); {message}{ignored}", \
        record
