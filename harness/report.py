"""Verdicts -> rows -> table / JSON. Builds text and data; never prints."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from tabulate import tabulate

from harness.errors import safe_text
from harness.expect import fmt
from harness.jsonfiles import dumps, finite
from harness.kinds import kind_class
from harness.report_text import (
    STATUS_ORDER,
    cut,
    expected_text,
    md_block,
    md_code,
    md_text,
    measured_cell,
    report_summary_line,
    short_measured,
    summary_line,
    trust_cell,
    trust_items,
)
from harness.verdicts import Verdict
from harness.version import __version__

HEADERS = ["spec", "claim", "measure", "model(s)", "measured", "expected", "status", "trust",
           "seconds"]


def rows(verdicts: list[Verdict]) -> list[list]:
    return [[v.spec, v.claim_id, v.measure, ("->" if kind_class(v.measure).MODEL_ARROW else ", ")
             .join(v.models), _measured_with_p(v),
             cut(expected_text(v.expected), 40),
             v.status.upper() if v.status != "passed" else v.status,
             trust_cell(v.extras.get("trust")), f"{v.seconds:.2f}"]
            for v in verdicts]


def _measured_with_p(v: Verdict) -> str:
    """The measured value, and the p-value against chance where `against` measured one."""
    text = short_measured(v.measured, 40)
    p = (v.extras.get("trust") or {}).get("p_value")
    return text if p is None else f"{text} p={fmt(p)}"


def table(verdicts: list[Verdict], spec_errors: list[str] = (), limit: int | None = None) -> str:
    """The summary table both front ends print."""
    out = tabulate(rows(verdicts), HEADERS, tablefmt="simple") if verdicts else "(no claims)"
    line = summary_line([v.status for v in verdicts], len(spec_errors), limit)
    return safe_text(f"{out}\n{line}")


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
    """The JSON report of spec-format.md; `results` are runner.SpecResult objects. A run
    limited to the first N prompts (`--limit`) says so in `limit`."""
    specs = []
    for r in results:
        name = r.spec.spec if r.spec else r.verdicts[0].spec if r.verdicts else Path(r.file).stem
        entry = {"spec": name, "file": r.file,
                 "claims": [verdict_json(v) for v in r.verdicts]}
        if r.error:
            entry["error"] = str(r.error)
        specs.append(entry)
    out = {"harness_version": __version__, "environment": environment(device, session),
           "specs": specs}
    if session is not None and getattr(session, "limit", None) is not None:
        out["limit"] = session.limit
    return out


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


__all__ = ["table", "json_report", "write_json", "write_reports", "failure_details",
           "summary_line", "dataframe"]


# ----------------------------------------------------------------------------- pandas

def dataframe(report: dict, per_prompt: bool = False):
    """The JSON report as a DataFrame: one row per claim (`value` holds scalar measurements),
    or with `per_prompt`, one row per claim and prompt for claims measured per prompt."""
    import pandas as pd

    records = []
    for spec in report["specs"]:
        for c in spec["claims"]:
            base = {"spec": spec["spec"], "claim": c["id"], "measure": c["measure"],
                    "models": ", ".join(c.get("models", [])), "status": c["status"]}
            if per_prompt:
                records += [{**base, "prompt_index": i, "prompt": prompt, "value": value}
                            for i, (prompt, value) in enumerate(_per_prompt_values(c))]
                continue
            measured = c.get("measured")
            records.append({**base, "value": measured if isinstance(measured, float) else None,
                            "measured": measured_cell(c) if measured is not None else "",
                            "expected": expected_text(c["expected"]),
                            "margin": c.get("margin"), "message": c.get("message", ""),
                            "seconds": c.get("seconds"), **dict(trust_items(c.get("trust")))})
    trust = [] if per_prompt else list(dict.fromkeys(   # a column per trust key, e.g. stability
        k for s in report["specs"] for c in s["claims"] for k, _ in trust_items(c.get("trust"))))
    columns = ["spec", "claim", "measure", "models", "status"] + (
        ["prompt_index", "prompt", "value"] if per_prompt else
        ["value", "measured", "expected", "margin", *trust, "message", "seconds"])
    return pd.DataFrame.from_records(records, columns=columns)


def _per_prompt_values(c: dict) -> list[tuple[str, object]]:
    """(prompt, value) pairs of a claim measured per prompt: logit diffs and patch effects,
    top tokens, greedy texts."""
    prompts = c.get("prompts") or []
    values = c.get("per_prompt")
    listing = kind_class(c["measure"]).PER_PROMPT_LISTING   # top tokens, greedy texts
    if values is None and listing and not isinstance(c.get("measured"), dict):
        measured = c.get("measured")
        nested = isinstance(measured, list) and measured and isinstance(measured[0], list)
        values = measured if (listing == "texts" and isinstance(measured, list)) \
            or nested else [measured]
    if not values:
        return []
    names = prompts if len(prompts) == len(values) else [""] * len(values)
    return list(zip(names, values))


# ----------------------------------------------------------------------------- Markdown

STATUS_ICON = {"passed": "✅", "failed": "❌", "error": "💥", "skipped": "⏭️", "xfailed": "⚠️"}


def markdown_report(report: dict) -> str:
    """One table per spec, failures first: fit for a CI job summary or a PR comment."""
    env = report["environment"]
    lines = ["# interp-harness report", "", f"**{md_text(report_summary_line(report))}**", "",
             md_text(f"harness {report.get('harness_version')} · " + " · ".join(
                 f"{k} {v}" for k, v in env.items() if isinstance(v, str))), ""]
    for spec in report["specs"]:
        claims = sorted(spec["claims"], key=lambda c: STATUS_ORDER.get(c["status"], 9))
        lines += [f"## {md_text(spec['spec'])} ({md_code(spec['file'], in_table=False)})",
                  "", summary_line([c["status"] for c in claims]), ""]
        if spec.get("error"):
            lines += ["**Spec error:**", "", *md_block(spec["error"]), ""]
        rows_md = [[f"{STATUS_ICON.get(c['status'], '')} {md_text(c['status'])}",
                    md_code(c["id"]), md_text(c["measure"]), md_text(measured_cell(c)),
                    md_text(cut(expected_text(c["expected"]), 60)),
                    fmt(c["margin"]) if c.get("margin") is not None else "",
                    md_text(trust_cell(c.get("trust"))),
                    md_text(cut(c.get("message", ""), 120))] for c in claims]
        if rows_md:
            lines += [tabulate(rows_md, ["status", "claim", "measure", "measured", "expected",
                                         "margin", "trust", "details"], tablefmt="github"), ""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    from harness.baselines import write_atomic

    write_atomic(Path(path), text)
