"""`harness diff OLD.json NEW.json`: which claims changed status and how far values moved."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from harness.baselines import drift
from harness.errors import safe_text
from harness.expect import fmt
from harness.report_text import md_text, measured_cell, read_report

HEADERS = ["spec", "claim", "old status", "new status", "old measured", "new measured", "moved"]


def load_report(path: Path) -> dict:
    return read_report(path)


def _claims(report: dict) -> dict[tuple[str, str], dict]:
    return {(s["spec"], c["id"]): c for s in report["specs"] for c in s["claims"]}


def diff_rows(old: dict, new: dict, changed_only: bool = False) -> list[list]:
    """One row per claim in either report; status changes and the largest value movement."""
    before, after = _claims(old), _claims(new)
    rows = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        moved = _moved(a, b)
        same = a and b and a["status"] == b["status"] and moved in ("0", "same")
        if changed_only and same:
            continue
        rows.append([key[0], key[1], a["status"] if a else "(absent)",
                     b["status"] if b else "(absent)", measured_cell(a) if a else "",
                     measured_cell(b) if b else "", moved])
    # status changes first, then the largest movements
    return sorted(rows, key=lambda r: (r[2] == r[3], -_as_number(r[6])))


def _moved(a: dict | None, b: dict | None) -> str:
    if not a or not b:
        return ""
    amount = drift(b.get("measured"), a.get("measured"))
    if amount is None:
        return "same" if a.get("measured") == b.get("measured") else "changed"
    return fmt(amount)


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def diff_table(old: dict, new: dict, markdown: bool = False, changed_only: bool = False) -> str:
    rows = diff_rows(old, new, changed_only)
    if not rows:
        return "no claims differ"
    if markdown:   # every field shown as written: no markup, no broken table
        return tabulate([[md_text(cell) for cell in row] for row in rows], HEADERS,
                        tablefmt="github")
    return safe_text(tabulate(rows, HEADERS, tablefmt="simple"))
