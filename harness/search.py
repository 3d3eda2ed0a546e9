"""Counterexample search: hypothesis looks for the prompt of a claim's family that breaks it.

The family is every template of the claim's prompt set (any combination of its values) and
every word substitution the claim lists. Hypothesis shrinks a failure towards the first value
of each list, so the reported counterexample is minimal. Runs are derandomized (same examples
every CI run) and every counterexample found is stored beside the spec
(`<spec>.counterexamples.json`) and tried first next time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from harness.baselines import write_atomic
from harness.spec import Prompt, PromptEntry


@dataclass(frozen=True)
class Counterexample:
    prompt: Prompt
    choices: dict          # the template values and substitutions that produced it
    detail: str            # why the claim fails on it
    known: bool            # found in the store from an earlier run


def store_path(spec_file: str) -> Path:
    path = Path(spec_file)
    return path.with_name(path.stem + ".counterexamples.json")


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
    entry = entries[choices["entry"]]
    text = entry.template.format(**choices["values"]) if entry.template else entry.text
    for word, replacement in choices["swap"].items():
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
        if choices.get("entry", 0) < len(entries):
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
    _remember(spec_file, claim_id, choices, store)
    return Counterexample(prompt, choices, holds(prompt)[1], known=False)


def _read_store(spec_file: str) -> dict:
    path = store_path(spec_file)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def _remember(spec_file: str, claim_id: str, choices: dict, store: dict) -> None:
    known = store.setdefault(claim_id, [])
    if choices not in known:
        known.insert(0, choices)
    write_atomic(store_path(spec_file), json.dumps(store, indent=1, sort_keys=True) + "\n")
