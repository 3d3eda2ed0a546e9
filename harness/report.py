"""Verdicts -> rows -> table / JSON. Builds text and data; never prints."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from tabulate import tabulate

from harness import __version__
from harness.claims import Verdict, short_measured
from harness.errors import safe_text
from harness.expect import fmt
from harness.jsonfiles import dumps, finite

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
    return safe_text(f"{out}\n{', '.join(parts)}")


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
    return safe_text("\n".join(lines))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def environment(device: str | None = None, session=None) -> dict:
    """Library versions, device, and each loaded model's origin, device and dtype."""
    from importlib.metadata import version

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": version("transformers"), "transformer_lens": version("transformer-lens"),
           "trl": version("trl"), "device": device or ("cuda" if torch.cuda.is_available()
                                                       else "cpu"),
           "torch_seed": torch.initial_seed()}
    if session is not None:
        env["models"] = session.loaded_models()
    return env


def verdict_json(v: Verdict) -> dict:
    out = {"id": v.claim_id, "status": v.status, "measure": v.measure, "models": list(v.models),
           "measured": v.measured, "expected": v.expected, "message": v.message,
           "seconds": round(v.seconds, 4)}
    if v.line:
        out["line"] = v.line
    if v.margin is not None:
        out["margin"] = v.margin
    out.update({k: val for k, val in v.extras.items() if k != "traceback"})
    return out


def json_report(results, device: str | None = None, session=None) -> dict:
    """The JSON report of spec-format.md; `results` are runner.SpecResult objects."""
    specs = []
    for r in results:
        name = r.spec.spec if r.spec else r.verdicts[0].spec if r.verdicts else Path(r.file).stem
        entry = {"spec": name, "file": r.file,
                 "claims": [verdict_json(v) for v in r.verdicts]}
        if r.error:
            entry["error"] = str(r.error)
        specs.append(entry)
    return {"harness_version": __version__, "environment": environment(device, session),
            "specs": specs}


def write_reports(report: dict, json_path=None, md_path=None, html_dir=None) -> list[Path]:
    """Write whichever reports were asked for; returns their paths."""
    written = []
    if json_path:
        write_json(report, Path(json_path))
        written.append(Path(json_path))
    if md_path:
        write_text(Path(md_path), markdown_report(report))
        written.append(Path(md_path))
    if html_dir:
        from harness.report_html import html_report

        path = Path(html_dir) / "report.html"
        write_text(path, html_report(json.loads(dumps(report, default=_default))))
        written.append(path)
    return written


def write_json(report: dict, path: Path) -> None:
    from harness.baselines import write_atomic

    write_atomic(Path(path), dumps(report, indent=2, default=_default) + "\n")


def _default(obj):
    if hasattr(obj, "tolist"):
        return finite(obj.tolist())
    return str(obj)


__all__ = ["table", "json_report", "write_json", "write_reports", "failure_details"]


# ----------------------------------------------------------------------------- Markdown

STATUS_ORDER = {"error": 0, "failed": 1, "xfailed": 2, "skipped": 3, "passed": 4}
STATUS_ICON = {"passed": "✅", "failed": "❌", "error": "💥", "skipped": "⏭️", "xfailed": "⚠️"}


def _measured_cell(claim: dict) -> str:
    m = claim.get("measured")
    if isinstance(m, dict) and "values" in m:
        flat = _flatten(m["values"])
        return f"{'x'.join(str(len(lab)) for lab in m['labels'])} grid, max {fmt(max(flat))}"
    if isinstance(m, float):
        return fmt(m)
    return _cut(json.dumps(m, ensure_ascii=False) if not isinstance(m, str) else repr(m), 60)


def _flatten(values) -> list[float]:
    if isinstance(values, list):
        return [x for v in values for x in _flatten(v)]
    return [float(values)]


def markdown_report(report: dict) -> str:
    """One table per spec, failures first: fit for a CI job summary or a PR comment."""
    env = report["environment"]
    lines = ["# interp-harness report", "",
             f"harness {report['harness_version']} · " + " · ".join(
                 f"{k} {v}" for k, v in env.items() if isinstance(v, str)), ""]
    for spec in report["specs"]:
        claims = sorted(spec["claims"], key=lambda c: STATUS_ORDER.get(c["status"], 9))
        counts = {}
        for c in claims:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        lines += [f"## {spec['spec']} (`{spec['file']}`)", "",
                  ", ".join(f"{n} {s}" for s, n in counts.items()) or "no claims", ""]
        if spec.get("error"):
            lines += ["**Spec error:**", "", "```", spec["error"], "```", ""]
        rows_md = [[f"{STATUS_ICON.get(c['status'], '')} {c['status']}", f"`{c['id']}`",
                    c["measure"], _measured_cell(c), _cut(expected_text(c["expected"]), 60),
                    fmt(c["margin"]) if c.get("margin") is not None else "",
                    _cut(c.get("message", ""), 120).replace("|", "\\|")] for c in claims]
        if rows_md:
            lines += [tabulate(rows_md, ["status", "claim", "measure", "measured", "expected",
                                         "margin", "details"], tablefmt="github"), ""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    from harness.baselines import write_atomic

    write_atomic(Path(path), text)
