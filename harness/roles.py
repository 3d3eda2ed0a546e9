"""One vocabulary of attention roles for the spec's `attention` (`source:`) and `head_scores`
(`role:`) claims and their measurements: the harness's names, with TransformerLens's
head-detector names accepted as aliases, and errors that list the choices and a did-you-mean.
No torch import (the spec reads it)."""

from __future__ import annotations

from harness.errors import did_you_mean

# Source rules of `attention` (docs/spec-format.md: "Role names").
RULES = ("previous", "first", "bos", "self", "duplicate", "induction")
# The rules TransformerLens's head detector has a pattern for: the roles of `head_scores`.
DETECTOR_ROLES = ("previous", "duplicate", "induction")
# TransformerLens's names (its head detector's patterns, without the `_head` suffix).
ALIASES = {"previous_token": "previous", "duplicate_token": "duplicate"}


def role_name(value: str, allowed: tuple[str, ...], what: str) -> str:
    """`value` as the harness names it (aliases resolved), if `allowed`; else a ValueError
    that lists the choices (and suggests the closest name)."""
    name = ALIASES.get(value, value)
    if name in allowed:
        return name
    choices = ", ".join(allowed)
    if name in RULES:
        raise ValueError(f"{what} '{value}' has no TransformerLens head-detector pattern "
                         f"(choices: {choices}); to measure attention to it, use `measure: "
                         f"attention` with `source: {name}`")
    hint = did_you_mean(value, list(allowed) + [a for a, n in ALIASES.items() if n in allowed])
    listed = "" if "did you mean" not in hint else f" (choices: {choices})"
    raise ValueError(f"unknown {what} '{value}'{hint}{listed}")
