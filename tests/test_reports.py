"""Reports (JSON + schema, Markdown, HTML), baselines with drift, `harness diff`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest

from harness.baselines import baseline_path, write_atomic
from harness.cli import main as harness_main
from harness.testing import write_spec

REPO = Path(__file__).parent.parent
SCHEMA = json.loads((REPO / "docs" / "report.schema.json").read_text())


TWO_PROMPTS = """\
- text: "This movie was really"
  answer: " bad"
  foil: " good"
- text: "The acting was"
  answer: " bad"
  foil: " good"
"""


def make_spec(tmp_path: Path, model_dir: Path, claims: str, name="reports") -> Path:
    return write_spec(tmp_path, model_dir, TWO_PROMPTS, claims, name)


CLAIMS = """\
- id: ld
  measure: logit_diff
  model: a
  expect: {"<": 1000}
- id: ld-fails
  measure: logit_diff
  model: a
  expect: {">": 1000}
- id: words
  measure: generate
  model: a
  max_new_tokens: 2
  expect: {contains: "This"}
  prompt: "This movie was really"
"""


def run(*args) -> int:
    return harness_main([*map(str, args), "-q"])


def test_json_markdown_and_html_reports(tmp_path, tiny_checkpoints, capsys):
    spec = make_spec(tmp_path, tiny_checkpoints["a"], CLAIMS)
    out = tmp_path / "out"
    assert run("run", spec, "--report-json", out / "r.json", "--report-md", out / "r.md",
               "--report-html", out / "html") == 1
    data = json.loads((out / "r.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["environment"]["models"][0]["dtype"] == "float32"
    claims = {c["id"]: c for c in data["specs"][0]["claims"]}
    assert claims["words"]["params"]["seed"] == 0   # seeds are recorded

    md = (out / "r.md").read_text()
    assert md.count("## reports") == 1
    table = md.split("## reports")[1]
    assert table.index("ld-fails") < table.index("`ld`")   # failures first
    assert "| status" in table and "margin" in table

    html = (out / "html" / "report.html").read_text()
    assert "<script src=" not in html          # no CDN: plotly is embedded
    assert "Plotly" in html and "ld-fails" in html and "torch" in html


def test_baselines_update_compare_and_drift(tmp_path, tiny_checkpoints, capsys):
    spec = make_spec(tmp_path, tiny_checkpoints["a"], """\
        - id: ld
          measure: logit_diff
          model: a
          expect: {baseline: true, atol: 1.0e-5}
        """)
    assert run("run", spec) == 1
    assert "create it with `harness run" in capsys.readouterr().out
    assert not baseline_path(spec).exists()

    assert run("run", spec, "--update-baselines") == 0
    stored = json.loads(baseline_path(spec).read_text())
    assert set(stored["claims"]) == {"ld"}
    assert run("run", spec, "--report-json", tmp_path / "r.json") == 0
    claim = json.loads((tmp_path / "r.json").read_text())["specs"][0]["claims"][0]
    assert claim["baseline"]["drift"] == 0.0

    # a retrained model: the same spec pointed at other weights drifts and fails
    other = make_spec(tmp_path, tiny_checkpoints["b"], """\
        - id: ld
          measure: logit_diff
          model: a
          expect: {baseline: true, atol: 1.0e-5}
        """, name="retrained")
    baseline_path(other).write_text(baseline_path(spec).read_text())
    assert run("run", other, "--report-json", tmp_path / "r2.json") == 1
    claim = json.loads((tmp_path / "r2.json").read_text())["specs"][0]["claims"][0]
    assert claim["status"] == "failed" and claim["baseline"]["drift"] > 1e-5
    assert "drift from baseline" in claim["message"]


def test_spec_wide_baseline_default(tmp_path, tiny_checkpoints, capsys):
    spec = make_spec(tmp_path, tiny_checkpoints["a"], CLAIMS.split("- id: ld-fails")[0])
    spec.write_text(spec.read_text().replace("claims:", "defaults: {baseline: true}\nclaims:"))
    assert run("run", spec) == 1   # no baseline yet: an error saying how to create it
    assert run("run", spec, "--update-baselines") == 0
    assert run("run", spec) == 0


def test_baseline_write_survives_being_killed(tmp_path):
    target = tmp_path / "x.baseline.json"
    write_atomic(target, json.dumps({"version": -1, "pad": ""}))
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from harness.baselines import write_atomic
        i = 0
        while True:
            write_atomic(__import__("pathlib").Path({str(target)!r}),
                         json.dumps({{"version": i, "pad": "x" * 3_000_000}}))
            i += 1
        """)
    for delay in (0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text())   # never torn
        assert isinstance(data["version"], int)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 4  # a killed writer may leave its temp file, never the target


def test_diff_shows_status_changes_and_movement(tmp_path, capsys):
    def report(values: dict) -> dict:
        return {"harness_version": "0", "environment": {}, "specs": [{"spec": "s", "file": "f",
                "claims": [{"id": k, "status": st, "measure": "logit_diff", "measured": v,
                            "expected": {}, "message": "", "seconds": 0}
                           for k, (st, v) in values.items()]}]}
    old = tmp_path / "old.json"
    new = tmp_path / "new.json"
    old.write_text(json.dumps(report({"a": ("passed", 2.0), "b": ("passed", 1.0),
                                      "g": ("passed", {"axes": ["layer"], "labels": [[0, 1]],
                                                       "values": [0.1, 0.9]})})))
    new.write_text(json.dumps(report({"a": ("failed", 0.5), "b": ("passed", 1.0),
                                      "g": ("passed", {"axes": ["layer"], "labels": [[0, 1]],
                                                       "values": [0.1, 0.4]})})))
    assert harness_main(["diff", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("s ")]
    assert lines[0].split()[:4] == ["s", "a", "passed", "failed"]   # status changes first
    assert "1.5" in lines[0]
    assert "0.5" in lines[1] and lines[1].split()[1] == "g"
    assert harness_main(["diff", str(old), str(new), "--markdown", "--changed"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| spec") and "| b " not in md


@pytest.mark.parametrize("bad", ["not json", '{"x": 1}'])
def test_diff_rejects_non_reports(tmp_path, capsys, bad):
    path = tmp_path / "bad.json"
    path.write_text(bad)
    assert harness_main(["diff", str(path), str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_html_and_show_label_post_norm_dla():
    """Per-head DLA through post-attention norms says so where the claim is listed."""
    from harness.measure.attribution import POST_NORM_FROZEN
    from harness.report_html import _row

    claim = {"status": "passed", "id": "heads", "measure": "dla", "models": ["a"],
             "measured": 1.0, "expected": {}, "margin": None, "message": "", "seconds": 0.1,
             "approximation": f"{POST_NORM_FROZEN}: each head passes through its layer's norm"}
    from harness.show import claim_text

    assert "dla (post-norm scale frozen)" in _row({"spec": "s"}, claim)
    assert "post-norm" not in _row({"spec": "s"}, {**claim, "approximation": "linear"})
    assert "note:     post-norm scale frozen: each head" in claim_text("s", claim)
    assert "note" not in claim_text("s", {**claim, "approximation": True})   # a flag, no text
