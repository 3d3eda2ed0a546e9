"""The text of a report's parts, shared by the table, the Markdown and the HTML report: the
summary line every report opens with, the order of statuses, and the measured / expected
cells of a claim of the JSON report. No torch, no report writing."""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness.errors import HarnessError, safe_text
from harness.expect import fmt
from harness.files import UnreadableFile, read_regular_text
from harness.jsonfiles import MAX_STORED_BYTES

STATUS_ORDER = {"error": 0, "failed": 1, "xfailed": 2, "skipped": 3, "passed": 4}


def one_line(value) -> str:
    """Text on one line: control characters (escape codes) and line breaks shown escaped."""
    return safe_text(str(value)).replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")


MARKDOWN_PUNCTUATION = set("\\`*_[]#!|~$")   # inline markup; backslash escapes keep it literal
HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(value) -> str:
    """Any text as it reads, in a Markdown heading or table cell: one line, every Markdown
    punctuation mark backslash-escaped (no links, images, emphasis, table breaks) and HTML's
    `&`, `<`, `>` as entities (no raw HTML)."""
    return "".join(HTML_ENTITIES.get(c) or ("\\" + c if c in MARKDOWN_PUNCTUATION else c)
                   for c in one_line(value))


def md_code(value, in_table: bool = True) -> str:
    """Text as an inline code span on one line: a fence longer than any backtick run in it."""
    text = one_line(value)
    if in_table:   # GitHub splits table cells at `|` even inside code spans
        text = text.replace("|", "\\|")
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_block(text: str) -> list[str]:
    """Lines of a fenced code block holding `text` as written (control characters escaped): the
    fence is longer than any backtick run inside, so nothing in it can close the block."""
    text = safe_text(str(text))
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return [fence, text, fence]


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def read_report(path: str | Path) -> dict:
    """A JSON report from a file, as `harness merge`, `diff` and `freeze` read it; any other
    file is a HarnessError naming it and what is wrong (exit 2), never a traceback."""
    try:
        data = json.loads(read_regular_text(path, MAX_STORED_BYTES))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, UnreadableFile) as exc:
        raise HarnessError(f"cannot read JSON report {path}: {exc}; pass a file that "
                           "`--report-json` wrote") from None
    return check_report(data, path)


def check_report(data, source) -> dict:
    """`data` if it has the shape every reader of a JSON report relies on (specs with names,
    files and claims; claims with an id, a measure, a known status, an `expected` mapping);
    else a HarnessError naming `source` and the first field that is not."""
    def refuse(where: str, what: str):
        raise HarnessError(f"{source}: not a harness JSON report: {where} {what}; pass a file "
                           "that `--report-json` wrote")

    def need(value, kind, where: str, what: str) -> None:
        if not isinstance(value, kind) or isinstance(value, bool):
            refuse(where, f"{what}, got {json.dumps(value, default=str)[:40]}")

    need(data, dict, "the file", "must hold a JSON object")
    need(data.get("specs"), list, "`specs`", "must be a list")
    for i, spec in enumerate(data["specs"]):
        where = f"specs[{i}]"
        need(spec, dict, where, "must be an object")
        for key in ("spec", "file"):
            need(spec.get(key), str, f"{where}.{key}", "must be a string")
        if spec.get("error") is not None:
            need(spec["error"], str, f"{where}.error", "must be a string")
        need(spec.get("claims"), list, f"{where}.claims", "must be a list")
        for j, claim in enumerate(spec["claims"]):
            at = f"{where}.claims[{j}]"
            need(claim, dict, at, "must be an object")
            for key in ("id", "measure"):
                need(claim.get(key), str, f"{at}.{key}", "must be a string")
            if claim.get("status") not in STATUS_ORDER:
                refuse(f"{at}.status", f"must be one of {', '.join(STATUS_ORDER)}, got "
                       f"{json.dumps(claim.get('status'), default=str)[:40]}")
            need(claim.get("expected", {}), dict, f"{at}.expected", "must be an object")
            need(claim.get("params", {}), dict, f"{at}.params", "must be an object")
            need(claim.get("models", []), list, f"{at}.models", "must be a list")
            need(claim.get("message", ""), str, f"{at}.message", "must be a string")
            for key in ("seconds", "margin", "line"):
                if claim.get(key) is not None:
                    need(claim[key], (int, float), f"{at}.{key}", "must be a number")
    return data


def expected_text(expected: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in expected.items())


def summary_line(statuses: list[str], spec_errors: int = 0, limit: int | None = None) -> str:
    """`27 claims: 1 error, 2 failed, 24 passed` (worst first): the first line of every report."""
    counts: dict[str, int] = {}
    for status in sorted(statuses, key=lambda s: STATUS_ORDER.get(s, 9)):
        counts[status] = counts.get(status, 0) + 1
    parts = [f"{n} {s}" for s, n in counts.items()]
    if spec_errors:
        parts.append(f"{spec_errors} spec error{'s' if spec_errors > 1 else ''}")
    n = len(statuses)
    line = f"{n} claim{'s' * (n != 1)}: {', '.join(parts) or 'none run'}"
    if limit is not None:
        line += f" (LIMITED to the first {limit} prompt{'s' * (limit != 1)} of each claim)"
    return line


def report_summary_line(report: dict) -> str:
    """The summary line of a JSON report."""
    statuses = [c["status"] for s in report["specs"] for c in s["claims"]]
    return summary_line(statuses, sum(1 for s in report["specs"] if s.get("error")),
                        report.get("limit"))


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def short_measured(measured, width: int = 60) -> str:
    """A measured value in one short cell, the same in every report and front end: a grid as
    its shape and maximum, a number formatted, text as written in quotes, anything else as
    JSON; at most `width` characters."""
    if isinstance(measured, dict) and "values" in measured and "labels" in measured:
        flat = _flatten(measured["values"])
        return cut(f"{'x'.join(str(len(lab)) for lab in measured['labels'])} grid, max "
                   f"{fmt(max(flat)) if flat else ''}", width)
    if isinstance(measured, float):
        return fmt(measured)
    if measured is None:
        return ""
    text = repr(measured) if isinstance(measured, str) else \
        json.dumps(measured, ensure_ascii=False, default=str)
    return cut(text, width)


def measured_cell(claim: dict) -> str:
    """A claim's measured value of the JSON report in one short cell (grids summarized)."""
    return short_measured(claim.get("measured"))


def _flatten(values) -> list[float]:
    if isinstance(values, list):
        return [x for v in values for x in _flatten(v)]
    return [float(values)]


# ----------------------------------------------------------------------------- trust

# A claim's `trust` entry (stability of its bootstrap, and any other such number) is shown key
# by key, whatever keys it holds: the short names below where a table cell is narrow, the keys
# of TRUST_SETTINGS (how it was measured) in the full views only, and lists of numbers (the
# bootstrap's margins, a distribution) as histograms in the HTML report.
TRUST_SHORT = {"stability": "stab", "confidence": "conf", "p_value": "p",
               "percentile": "pct"}
TRUST_SETTINGS = ("resamples", "seed", "confidence", "random", "random_seed", "direction")


def trust_items(trust) -> list[tuple[str, object]]:
    """The entries of a `trust` mapping that read as one value (numbers, text, booleans)."""
    if not isinstance(trust, dict):
        return []
    return [(str(k), v) for k, v in trust.items()
            if isinstance(v, int | float | str | bool) or v is None]


def _trust_value(value) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.3g}"
    return one_line(value)


def trust_cell(trust) -> str:
    """`stab 0.97`: the trust values in one short cell (settings left out)."""
    return " ".join(f"{TRUST_SHORT.get(k, k)} {_trust_value(v)}"
                    for k, v in trust_items(trust) if k not in TRUST_SETTINGS)


def trust_text(trust) -> str:
    """Every trust value, named in full: `stability 0.97, resamples 200, seed 0`."""
    return ", ".join(f"{k} {_trust_value(v)}" for k, v in trust_items(trust))


def trust_distributions(trust) -> dict[str, list[float]]:
    """The trust entries that are lists of numbers (e.g. `bootstrap`: each resample's margin),
    for a histogram."""
    if not isinstance(trust, dict):
        return {}
    return {str(k): v for k, v in trust.items() if isinstance(v, list) and v and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in v)}
