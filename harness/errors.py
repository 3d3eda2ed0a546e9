"""Errors the harness raises on purpose. Front ends turn these into messages, never tracebacks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """Base class: a problem the user can act on."""


class SpecError(HarnessError):
    """A spec file is malformed; names the file, line, field path and how to fix it."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None):
        self.file, self.line, self.path, self.message = file, line, path, message
        self.others: list[SpecError] = []
        super().__init__(message)

    def __str__(self) -> str:
        return "\n".join(e.one_line() for e in [self, *self.others])

    def one_line(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class ModelUnavailable(HarnessError):
    """A model could not be loaded; says what was tried."""


class MeasureError(HarnessError):
    """A measurement could not be computed (the claim is an error, not a failure)."""


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """' did you mean 'x'?' for the nearest choice, or a list of valid choices."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid choices: {', '.join(choices)}"


def safe_text(text: str) -> str:
    """Terminal control characters (escape codes in prompt texts) shown escaped, not obeyed."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
