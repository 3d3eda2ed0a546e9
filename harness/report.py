"""Verdicts -> rows -> table / JSON. Builds text and data; never prints."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from tabulate import tabulate

from harness import __version__
from harness.claims import Verdict, short_measured
from harness.expect import fmt

HEADERS = ["spec", "claim", "measure", "model(s)", "measured", "expected", "status", "seconds"]


def expected_text(expected: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in expected.items())


def rows(verdicts: list[Verdict]) -> list[list]:
    return [[v.spec, v.claim_id, v.measure, "->".join(v.models) if v.measure == "patch" or
             v.measure == "patch_sweep" else ", ".join(v.models), _cut(short_measured(v), 40),
             _cut(expected_text(v.expected), 40),
             v.status.upper() if v.status != "passed" else v.status, f"{v.seconds:.2f}"]
            for v in verdicts]


def table(verdicts: list[Verdict], spec_errors: list[str] = ()) -> str:
    """The summary table both front ends print."""
    out = tabulate(rows(verdicts), HEADERS, tablefmt="simple") if verdicts else "(no claims)"
    counts = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    parts = [f"{n} {s}" for s, n in sorted(counts.items())]
    if spec_errors:
        parts.append(f"{len(spec_errors)} spec error{'s' if len(spec_errors) > 1 else ''}")
    return f"{out}\n{', '.join(parts)}"


def failure_details(verdicts: list[Verdict]) -> str:
    lines = []
    for v in verdicts:
        if v.status in ("failed", "error"):
            where = f"{v.file}:{v.line}" if v.line else v.file
            lines.append(f"{v.status.upper()} {v.node_id} ({where}): {v.message}")
    skips: dict[str, int] = {}
    for v in verdicts:
        if v.status == "skipped":
            skips[v.message] = skips.get(v.message, 0) + 1
    lines += [f"SKIPPED {n} claim{'s' * (n > 1)}: {reason}" for reason, n in skips.items()]
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def environment(device: str | None = None) -> dict:
    import torch
    import transformer_lens
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
            "device": device or ("cuda" if torch.cuda.is_available() else "cpu")}


def verdict_json(v: Verdict) -> dict:
    out = {"id": v.claim_id, "status": v.status, "measure": v.measure, "models": list(v.models),
           "measured": v.measured, "expected": v.expected, "message": v.message,
           "seconds": round(v.seconds, 4)}
    if v.margin is not None:
        out["margin"] = v.margin
    out.update({k: val for k, val in v.extras.items() if k != "traceback"})
    return out


def json_report(results, device: str | None = None) -> dict:
    """The JSON report of spec-format.md; `results` are runner.SpecResult objects."""
    specs = []
    for r in results:
        entry = {"spec": r.spec.spec if r.spec else Path(r.file).stem, "file": r.file,
                 "claims": [verdict_json(v) for v in r.verdicts]}
        if r.error:
            entry["error"] = str(r.error)
        specs.append(entry)
    return {"harness_version": __version__, "environment": environment(device), "specs": specs}


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_default) + "\n", encoding="utf-8")
    tmp.replace(path)


def _default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


__all__ = ["table", "json_report", "write_json", "failure_details", "fmt"]
