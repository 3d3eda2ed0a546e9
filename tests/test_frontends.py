"""The pytest plugin (through pytester) and the `harness` CLI, end to end on tiny checkpoints."""

from __future__ import annotations

import json
import textwrap

import pytest

from harness.cli import main as harness_main


def spec_text(model_dir, claims: str, name: str = "tiny") -> str:
    return textwrap.dedent(f"""\
        spec: {name}
        models:
          a: {{path: "{model_dir}"}}
          ghost: {{hf: nobody/no-such-model, optional: true}}
        prompts:
          - text: "This movie was really"
            answer: " bad"
            foil: " good"
          - template: "The {{thing}} was"
            values: {{thing: [acting, plot]}}
            answer: " bad"
            foil: " good"
        claims:
        """) + textwrap.indent(textwrap.dedent(claims), "  ")


CLAIMS = """\
- id: holds
  measure: logit_diff
  model: a
  expect: {"<": 1000}
- id: breaks
  measure: logit_diff
  model: a
  expect: {">": 1000}
- id: says-this
  measure: generate
  model: a
  prompt: "This movie was really"
  max_new_tokens: 3
  expect: {contains: "This movie"}
- id: ghostly
  measure: logit_diff
  model: ghost
  expect: {">": 0}
- id: known-broken
  measure: logit_diff
  model: a
  xfail: "not trained yet"
  expect: {">": 1000}
"""


@pytest.fixture
def project(pytester, tiny_checkpoints):
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    pytester.mkdir("specs")
    pytester.mkdir("checks")
    (pytester.path / "specs" / "tiny.yaml").write_text(spec_text(tiny_checkpoints["a"], CLAIMS))
    return pytester


def test_checks_collects_every_spec_with_claim_ids(project):
    result = project.runpytest("checks", "--collect-only", "-q")
    out = result.stdout.str()
    for claim in ("holds", "breaks", "says-this", "ghostly", "known-broken"):
        assert f"specs/tiny.yaml::tiny::{claim}" in out


def test_outcomes_failure_text_and_summary_table(project):
    result = project.runpytest("checks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1)
    out = result.stdout.str()
    # the failure shows measured, expected and margin, not a traceback into the harness
    assert "claim tiny::breaks does not hold" in out
    assert "expected: >: 1000" in out and "measured: " in out and "margin:" in out
    assert "harness/claims.py" not in out and "Traceback" not in out
    # skipped with the reason
    assert "optional model 'ghost' is unavailable" in result.stdout.str() or \
        "ghost" in project.runpytest("checks", "-rs").stdout.str()
    # the summary table
    assert "interp-harness claims" in out
    for header in ("spec", "claim", "measure", "model(s)", "measured", "expected", "status",
                   "seconds"):
        assert header in out
    assert "FAILED" in out and "xfailed" in out


def test_k_selects_claims(project):
    result = project.runpytest("checks", "-k", "holds or says")
    result.assert_outcomes(passed=2)


def test_one_spec_file_directly(project):
    result = project.runpytest("specs/tiny.yaml", "-k", "holds")
    result.assert_outcomes(passed=1)


def test_unexpected_pass_of_xfail_fails(project, tiny_checkpoints):
    (project.path / "specs" / "tiny.yaml").write_text(spec_text(tiny_checkpoints["a"], """\
        - id: fixed-now
          measure: logit_diff
          model: a
          xfail: "was broken"
          expect: {"<": 1000}
        """))
    result = project.runpytest("checks")
    result.assert_outcomes(failed=1)
    assert "unexpectedly passed" in result.stdout.str()


def test_spec_error_is_reported_and_other_specs_still_run(project, tiny_checkpoints):
    (project.path / "specs" / "broken.yaml").write_text(spec_text(tiny_checkpoints["a"], """\
        - id: typo
          measure: logit_diff
          model: a
          expect: {">": 0}
          per_promt: all
        """, name="broken"))
    result = project.runpytest("checks", "-k", "holds or spec-error")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "broken.yaml:18: claims[0].per_promt: unknown field 'per_promt'" in out
    assert "did you mean 'per_prompt'" in out
    assert result.ret == 2


def test_measure_error_is_an_error_not_a_failure(project, tiny_checkpoints):
    (project.path / "specs" / "tiny.yaml").write_text(spec_text(tiny_checkpoints["a"], """\
        - id: nowhere
          measure: patch
          from: a
          into: a
          site: resid_pre
          expect: {">": 0}
        """))   # no layers: found only when measuring (out-of-range layers are spec errors)
    result = project.runpytest("checks")
    result.assert_outcomes(errors=1)
    assert "could not be measured" in result.stdout.str()


def test_junit_properties(project, tmp_path):
    xml = tmp_path / "junit.xml"
    project.runpytest("checks", f"--junitxml={xml}", "-k", "holds")
    text = xml.read_text()
    assert 'name="measured"' in text and 'name="expected"' in text
    assert 'name="trust"' in text and "stability" in text   # 3 prompts: resampled


# ----------------------------------------------------------------------------- CLI

def test_cli_run_exit_codes_and_json(tmp_path, tiny_checkpoints, capsys):
    specs = tmp_path / "specs"
    specs.mkdir()
    good = specs / "good.yaml"
    good.write_text(spec_text(tiny_checkpoints["a"], CLAIMS.split("- id: breaks")[0], "good"))
    assert harness_main(["run", str(good), "-q"]) == 0

    bad = specs / "bad.yaml"
    bad.write_text(spec_text(tiny_checkpoints["a"], CLAIMS, "bad"))
    report = tmp_path / "out" / "report.json"
    assert harness_main(["run", str(specs), "-q", "--report-json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "FAILED bad::breaks" in out and "good" in out

    data = json.loads(report.read_text())
    assert data["harness_version"] and data["environment"]["torch"]
    by_id = {c["id"]: c for s in data["specs"] for c in s["claims"] if s["spec"] == "bad"}
    assert by_id["holds"]["status"] == "passed" and isinstance(by_id["holds"]["measured"], float)
    assert len(by_id["holds"]["per_prompt"]) == 3
    assert by_id["breaks"]["status"] == "failed" and by_id["breaks"]["margin"] < 0
    assert by_id["ghostly"]["status"] == "skipped"
    assert by_id["known-broken"]["status"] == "xfailed"


def test_cli_spec_error_exits_2_and_others_run(tmp_path, tiny_checkpoints, capsys):
    good = tmp_path / "a_good.yaml"
    good.write_text(spec_text(tiny_checkpoints["a"], CLAIMS.split("- id: breaks")[0], "good"))
    bad = tmp_path / "b_bad.yaml"
    bad.write_text(spec_text(tiny_checkpoints["a"], """\
        - id: multi
          measure: logit_diff
          model: a
          expect: {">": 0}
        """, "bad").replace('answer: " bad"', 'answer: " badly awful"', 1))
    assert harness_main(["run", str(good), str(bad), "-q"]) == 2
    captured = capsys.readouterr()
    assert "b_bad.yaml:7: prompts[0].answer" in captured.err
    assert "tokens for model 'a'" in captured.err
    assert "holds" in captured.out          # the good spec still ran
    assert "Traceback" not in captured.err


def test_cli_validate(tmp_path, tiny_checkpoints, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(spec_text(tiny_checkpoints["a"], CLAIMS))
    assert harness_main(["validate", str(good)]) == 0
    assert "ok:" in capsys.readouterr().out
    typo = tmp_path / "typo.yaml"
    typo.write_text(spec_text(tiny_checkpoints["a"], """\
        - id: x
          measure: patch_sweep
          from: a
          into: a
          site: resid_pr
          over: [layer, pos]
          expect: {argmax: {layer: 0, pos: -1}}
        """))
    assert harness_main(["validate", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "typo.yaml:18: claims[0].site: unknown site 'resid_pr'; did you mean 'resid_pre'?" \
        in err


def test_cli_missing_path(tmp_path, capsys):
    assert harness_main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_xdist_gives_the_same_verdicts_as_one_process(project, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    project.runpytest("checks", f"--harness-report-json={one}")
    result = project.runpytest("checks", "-n", "2", f"--harness-report-json={two}")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1)
    assert "interp-harness claims" in result.stdout.str()   # the controller prints the table

    def verdicts(path):
        data = json.loads(path.read_text())
        return {c["id"]: (c["status"], c["measured"]) for s in data["specs"]
                for c in s["claims"]}

    assert verdicts(one) == verdicts(two)
    assert len(verdicts(two)) == 5


def test_devices_are_assigned_round_robin(pytester):
    from harness.plugin import _worker_device

    config = pytester.parseconfig("--harness-devices", "cuda:0, cuda:1")
    for worker, device in (("gw0", "cuda:0"), ("gw1", "cuda:1"), ("gw2", "cuda:0")):
        config.workerinput = {"workerid": worker}
        assert _worker_device(config) == device


@pytest.mark.slow
def test_xdist_on_the_toy_suite_gives_the_same_report(pytester, tmp_path):
    from pathlib import Path

    repo = Path(__file__).parent.parent
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    pytester.mkdir("specs")
    pytester.mkdir("checks")
    text = (repo / "specs" / "toy_negative_reviews.yaml").read_text()
    (pytester.path / "specs" / "toy_negative_reviews.yaml").write_text(text)
    from harness.spec import load_spec

    n_claims = len(load_spec(repo / "specs" / "toy_negative_reviews.yaml").claims)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    pytester.runpytest("checks", f"--harness-report-json={one}").assert_outcomes(
        passed=n_claims)
    pytester.runpytest("checks", "-n", "2", f"--harness-report-json={two}").assert_outcomes(
        passed=n_claims)

    def verdicts(path):
        data = json.loads(path.read_text())
        return {c["id"]: (c["status"], c["measured"]) for s in data["specs"]
                for c in s["claims"]}

    assert verdicts(one) == verdicts(two)
