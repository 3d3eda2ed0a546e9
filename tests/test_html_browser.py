"""The HTML report opened in a real headless Chromium: no console errors, figures rendered."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.report_html import html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install Debian's `chromium` (.ci/run does)")


def grid(axes, labels, values):
    return {"axes": axes, "labels": labels, "values": values}


def claim(cid, measure, measured, **extra):
    return {"id": cid, "status": "passed", "measure": measure, "models": ["rlhf", "source"],
            "measured": measured, "expected": {"max": {">": 0}}, "message": "ok",
            "seconds": 0.1, **extra}


def sample_report() -> dict:
    lens_a = grid(["layer"], [["resid_pre0", "resid_pre1", "final"]], [0.1, 0.2, 0.3])
    lens_b = grid(["layer"], [["resid_pre0", "resid_pre1", "final"]], [0.1, 0.2, 2.3])
    return {"harness_version": "0.1.0", "environment": {"torch": "2.13.0", "device": "cpu"},
            "specs": [{"spec": "s", "file": "specs/s.yaml", "claims": [
                claim("resid", "patch_sweep", grid(["layer", "pos"], [[0, 1], ["<bos>", "This"]],
                                                   [[0.0, 0.1], [0.2, 0.97]])),
                claim("heads", "patch_sweep", grid(["layer", "head"], [[0, 1], [0, 1, 2]],
                                                   [[0.0, 0.1, -0.3], [0.8, 0.0, 0.2]]),
                      method="attribution"),
                claim("lens", "logit_lens", grid(["layer"], lens_a["labels"], [0, 0, 2.0]),
                      models_measured={"source": lens_a, "rlhf": lens_b}),
                claim("dla", "dla", grid(["component"], [["embed", "attn0", "mlp0"]],
                                         [0.1, -0.2, 1.1])),
            ]}]}


def test_report_renders_in_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(html_report(sample_report()))
    shot = tmp_path / "report.png"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if re.search(r"error|uncaught", line, re.I)]
    assert not errors, errors
    # four figures drawn by plotly at load time (the page source holds only their data)
    assert dom.stdout.count('class="plot-container plotly"') == 4
    assert dom.stdout.count('class="hm"') == 2           # two heatmaps painted
    assert dom.stdout.count('class="scatterlayer mlayer"') >= 1   # the lens lines
    shot_run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,2400",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot_run.returncode == 0 and shot.stat().st_size > 10_000
    keep = Path(__file__).parent.parent / "reports"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "report-screenshot.png")
