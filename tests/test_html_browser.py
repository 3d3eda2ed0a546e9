"""Reports of the toy spec in every format, and the HTML report opened in a real headless
Chromium: no console errors, figures rendered."""

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

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install Debian's `chromium` (.ci/run does)")
REPO = Path(__file__).parent.parent


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


@pytest.fixture(scope="module")
def toy_reports(tmp_path_factory):
    """`harness run` on the toy spec with all three reports (the toy claims all hold)."""
    from harness.cli import main

    out = tmp_path_factory.mktemp("toy-reports")
    code = main(["run", str(REPO / "specs" / "toy_negative_reviews.yaml"), "-q",
                 "--report-json", str(out / "r.json"), "--report-md", str(out / "r.md"),
                 "--report-html", str(out / "html")])
    assert code == 0
    return out


def test_toy_json_report_matches_the_schema(toy_reports):
    import json

    import jsonschema

    data = json.loads((toy_reports / "r.json").read_text())
    schema = json.loads((REPO / "docs" / "report.schema.json").read_text())
    jsonschema.validate(data, schema)
    claims = {c["id"]: c for c in data["specs"][0]["claims"]}
    sweep = claims["resid-hot-spot"]["measured"]
    assert sweep["axes"] == ["layer", "pos"] and sweep["labels"][1][-1] == " really"
    assert claims["no-single-head-carries-it-approx"]["measured"]["method"] == "attribution"
    assert {m["dtype"] for m in data["environment"]["models"]} == {"float32"}


def test_toy_markdown_report(toy_reports):
    md = (toy_reports / "r.md").read_text()
    assert "## toy-negative-reviews" in md and "| status" in md
    from harness.spec import load_spec

    n_claims = len(load_spec(REPO / "specs" / "toy_negative_reviews.yaml").claims)
    assert n_claims >= 38 and md.count("✅ passed") == n_claims   # every toy claim holds


@needs_chromium
def test_toy_html_report_renders_in_chromium(toy_reports, tmp_path):
    page = toy_reports / "html" / "report.html"
    dom, shot = render(page, tmp_path, "toy-report-screenshot.png", height=9000)
    import json

    claims = json.loads((toy_reports / "r.json").read_text())["specs"][0]["claims"]
    histograms = sum(1 for c in claims if (c.get("trust") or {}).get("bootstrap"))
    assert histograms >= 1
    # 7 sweeps (6 heatmaps, 1 bar chart over layers) + 4 lens / DLA plots, and a histogram of
    # the bootstrap's margins beside each claim whose trust has them
    assert dom.count('class="plot-container plotly"') == 11 + histograms
    assert dom.count('class="hm"') == 6
    assert ">resid-hot-spot: patch_sweep" in dom or "resid-hot-spot: patch_sweep" in dom


def render(page: Path, tmp_path: Path, name: str, height: int = 2400) -> tuple[str, Path]:
    """The page's DOM after its scripts ran (no console errors) and a screenshot of it."""
    shot = tmp_path / name
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if re.search(r"error|uncaught", line, re.I)]
    assert not errors, errors
    shot_run = subprocess.run([*common, f"--screenshot={shot}", f"--window-size=1400,{height}",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot_run.returncode == 0 and shot.stat().st_size > 10_000
    keep = REPO / "reports"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / name)
    return dom.stdout, shot


@needs_chromium
def test_report_renders_in_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(html_report(sample_report()))
    dom_text, _ = render(page, tmp_path, "report-screenshot.png")
    assert dom_text.count('class="plot-container plotly"') == 4
    assert dom_text.count('class="hm"') == 2           # two heatmaps painted
    assert dom_text.count('class="scatterlayer mlayer"') >= 1   # the lens lines



FILTER_PROBE = """
<script>
window.addEventListener('load', function () {
  var root = document.querySelector('.harness-report');
  function visible() {
    return Array.from(root.querySelectorAll('tr.claim')).filter(function (r) {
      return r.offsetParent !== null; }).map(function (r) { return r.id; }); }
  var out = {all: visible()};
  var passed = root.querySelector("input.status-filter[value='passed']");
  passed.checked = false; passed.dispatchEvent(new Event('change'));
  out.no_passed = visible();
  passed.checked = true; passed.dispatchEvent(new Event('change'));
  var measure = root.querySelector('select.measure-filter');
  measure.value = 'dla'; measure.dispatchEvent(new Event('change'));
  out.dla = visible();
  out.shown = root.querySelector('.shown-count').textContent;
  document.body.setAttribute('data-probe', JSON.stringify(out));
});
</script>
"""


def failing_report() -> dict:
    report = sample_report()
    claims = report["specs"][0]["claims"]
    claims[3].update(status="failed", message="argmax at mlp0 = 1.1 (expected attn0)")
    claims[1].update(status="error", message="MeasureError: layer 9 is out of range")
    report["environment"]["models"] = [{"origin": "zoo:toy-reviews-source", "device": "cpu",
                                        "dtype": "float32"}]
    return report


def probe(dom: str) -> dict:
    import html
    import json

    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the filter probe did not run"
    return json.loads(html.unescape(found.group(1)))


@needs_chromium
def test_html_summary_and_filters_in_chromium(tmp_path):
    """The page opens on the summary (counts, failing claims first with their messages);
    the status and measure filters hide rows; models are a table."""
    page = tmp_path / "report.html"
    text = html_report(failing_report())
    page.write_text(text)
    dom, shot = render(page, tmp_path, "report-summary-screenshot.png", height=1200)
    summary = dom[dom.index("class=\"summary\""):dom.index("<h2>Environment")]
    assert "4 claims: 1 error, 1 failed, 2 passed" in summary
    assert summary.index("s::heads") < summary.index("s::dla")     # errors, then failures
    assert "layer 9 is out of range" in summary and "expected attn0" in summary
    assert "<table class=\"models\">" in dom and "zoo:toy-reviews-source</td>" in dom
    assert "1: 'This'" in text                  # heatmap positions labelled by their tokens

    probed = tmp_path / "probe.html"
    probed.write_text(text.replace("</body>", FILTER_PROBE + "</body>"))
    result = probe(render(probed, tmp_path, "probe.png", height=600)[0])
    assert len(result["all"]) == 4
    assert sorted(result["no_passed"]) == ["claim-s-dla", "claim-s-heads"]
    assert result["dla"] == ["claim-s-dla"] and result["shown"] == "1"


@needs_chromium
def test_notebook_html_renders_in_chromium(tmp_path):
    """`_repr_html_` is the report as a fragment: embedded in a page it renders, with its
    figures, and its filters act on its own rows."""
    from harness.report_html import html_fragment

    page = tmp_path / "cell.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    "<p>a notebook cell</p>" + html_fragment(failing_report())
                    + FILTER_PROBE + "</body></html>")
    dom, _ = render(page, tmp_path, "notebook-cell-screenshot.png", height=1200)
    assert dom.count('class="plot-container plotly"') == 4
    assert probe(dom)["shown"] == "1"
