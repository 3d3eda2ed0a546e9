"""Finishing a run, the same way for `harness run`, `pytest checks/` and `harness merge`:
baselines, then the JSON report, from which the Markdown, HTML and JUnit reports derive.

Also the options both front ends declare (`--report-json` here is `--harness-report-json` in
pytest), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from harness.errors import HarnessError, safe_text


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


# (name, argparse/pytest keyword arguments). The CLI adds `--NAME`, pytest `--harness-NAME`.
OPTIONS: list[tuple[str, dict]] = [
    ("report-json", dict(default=None, metavar="FILE", help="write the JSON report")),
    ("report-md", dict(default=None, metavar="FILE",
                       help="write a Markdown report (CI job summary, PR comment)")),
    ("report-html", dict(default=None, metavar="DIR",
                         help="write DIR/report.html, self-contained, with figures")),
    ("update-baselines", dict(action="store_true",
                              help="store every claim's measured values in "
                                   "<spec>.baseline.json")),
    ("device", dict(default=None,
                    help="device for every model: cpu, cuda, cuda:1 ... (default: CUDA when "
                         "available, else CPU)")),
    ("allow-remote-code", dict(action="store_true",
                               help="let models whose spec sets trust_remote_code run the "
                                    "Python code in their folder (a spec alone cannot)")),
    ("memory-budget-mb", dict(type=positive_int, default=2048,
                              help="MB for activations: traces, patched variants, forward "
                                   "passes (default 2048); larger prompt sets run in slices")),
    ("shard", dict(default=None, metavar="K/N",
                   help="run only the K-th of N deterministic, balanced parts of the claims "
                        "(claims sharing models and prompts stay together); join the parts' "
                        "JSON reports with `harness merge`")),
]


def add_options(add, prefix: str = "") -> None:
    """Declare the shared options with `add` (argparse's add_argument or pytest's addoption)."""
    for name, kwargs in OPTIONS:
        add(f"--{prefix}{name}", **kwargs)


@dataclass(frozen=True)
class Outputs:
    """Where a run's results go."""

    report_json: str | Path | None = None
    report_md: str | Path | None = None
    report_html: str | Path | None = None
    junitxml: str | Path | None = None       # merge only: pytest writes its own
    update_baselines: bool = False

    @classmethod
    def from_args(cls, get, junitxml=None) -> Outputs:
        """From parsed options; `get(name)` reads one by its OPTIONS name with `_`s."""
        return cls(get("report_json"), get("report_md"), get("report_html"), junitxml,
                   bool(get("update_baselines")))


def finish(results, outputs: Outputs, device: str | None = None, session=None,
           timing: dict | None = None) -> tuple[dict, list[str]]:
    """Baselines (when asked), the JSON report and every report derived from it. `results` are
    runner.SpecResult objects. Returns the JSON report and what was written, to print."""
    from harness import report

    messages = []
    if outputs.update_baselines:
        from harness.baselines import update_baseline

        env = report.environment(device, session)
        for r in results:
            if r.verdicts:
                path = update_baseline(r.spec.file if r.spec else r.file, r.verdicts, env)
                messages.append(f"updated baseline {path}")
    data = report.json_report(results, device, session)
    if timing:
        data["timing"] = timing
    messages += [f"wrote {p}" for p in write_outputs(data, outputs)]
    return data, messages


def check_outputs(outputs: Outputs, prefix: str = "") -> None:
    """Refuse report paths that cannot be written before anything runs (a usage error, exit
    2): a report file that names a folder, an HTML folder that names a file, a folder that
    cannot be made or written."""
    files = [("report-json", outputs.report_json), ("report-md", outputs.report_md),
             ("junitxml", outputs.junitxml)]
    for name, path in files:
        if path and Path(path).is_dir():
            raise HarnessError(f"--{prefix}{name} {path} is a folder; name the report's file")
    html = outputs.report_html
    if html and Path(html).exists() and not Path(html).is_dir():
        raise HarnessError(f"--{prefix}report-html {html} is a file; it names a folder, where "
                           "report.html is written")
    folders = [(name, Path(p).parent) for name, p in files if p]
    folders += [("report-html", Path(html))] if html else []
    for name, folder in folders:
        existing = next((f for f in (folder, *folder.parents) if f.exists()), None)
        if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
            raise HarnessError(f"--{prefix}{name}: cannot write in {existing} ("
                               + ("not a folder" if not existing.is_dir() else "not writable")
                               + "); choose another path")


def write_outputs(data: dict, outputs: Outputs) -> list[Path]:
    """Write the JSON, Markdown, HTML and JUnit reports that `outputs` asks for; a report that
    cannot be written is a HarnessError naming it (exit 2), not a traceback."""
    from harness import report

    try:
        written = report.write_reports(data, outputs.report_json, outputs.report_md,
                                       outputs.report_html)
        if outputs.junitxml:
            report.write_text(Path(outputs.junitxml), junit_xml(data))
            written.append(Path(outputs.junitxml))
    except OSError as exc:
        raise HarnessError(f"cannot write a report: {exc.filename or ''}: "
                           f"{exc.strerror or exc}; choose a writable path") from None
    return written


def exit_code(data: dict) -> int:
    """The harness contract on a JSON report: 2 a spec error, 1 a failed or erroring claim,
    3 every claim held but the report is limited to the first N prompts (`limit`), else 0."""
    if any(s.get("error") for s in data["specs"]):
        return 2
    bad = {"failed", "error"}
    if any(c["status"] in bad for s in data["specs"] for c in s["claims"]):
        return 1
    from harness.runner import LIMITED

    return LIMITED if data.get("limit") is not None else 0


def xml_attr(value) -> str:
    """A quoted XML attribute holding any text: characters XML cannot hold (escape codes, NUL;
    none of them printable) shown escaped, markup characters as entities."""
    return quoteattr(safe_text(str(value)))


def junit_xml(data: dict) -> str:
    """JUnit XML like pytest's: one testcase per claim, measured/expected as properties."""
    import json

    cases, counts = [], {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for spec in data["specs"]:
        if spec.get("error"):
            counts["tests"] += 1
            counts["errors"] += 1
            cases.append(f'  <testcase classname={xml_attr(spec["file"])} name="spec-error">'
                         f'<error message={xml_attr(spec["error"])}/></testcase>')
        for c in spec["claims"]:
            counts["tests"] += 1
            props = "".join(f"<property name={xml_attr(k)} value="
                            f"{xml_attr(json.dumps(c.get(k), default=str))}/>"
                            for k in ("measure", "measured", "expected"))
            props += f'<property name="status" value={xml_attr(c["status"])}/>'
            body = f"<properties>{props}</properties>"
            message = xml_attr(c.get("message", ""))
            if c["status"] == "failed":
                counts["failures"] += 1
                body += f"<failure message={message}/>"
            elif c["status"] == "error":
                counts["errors"] += 1
                body += f"<error message={message}/>"
            elif c["status"] in ("skipped", "xfailed"):
                counts["skipped"] += 1
                body += f"<skipped message={message}/>"
            name = xml_attr(f"{spec['spec']}::{c['id']}")
            cases.append(f"  <testcase classname={xml_attr(spec['file'])} name={name} "
                         f'time={xml_attr(c.get("seconds", 0))}>{body}</testcase>')
    attrs = " ".join(f'{k}="{v}"' for k, v in counts.items())
    return ('<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n'
            f'<testsuite name="interp-harness" {attrs}>\n' + "\n".join(cases)
            + "\n</testsuite>\n</testsuites>\n")
