"""Quick iteration through the real CLI and pytest: -k, --last-failed, --limit, `harness show`,
and pytest's own --lf / --ff with the cache provider enabled."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from harness.cli import main as harness_main
from harness.selection import STATE_FILE, keyword_matcher
from harness.testing import write_spec

PROMPTS = """\
- text: "This movie was really"
  answer: " bad"
  foil: " good"
- template: "The {thing} was"
  values: {thing: [acting, plot]}
  answer: " bad"
  foil: " good"
"""

CLAIMS = """\
- id: holds
  measure: logit_diff
  model: a
  expect: {"<": 1000}
- id: breaks
  measure: logit_diff
  model: a
  expect: {">": 1000}
- id: greedy-words
  measure: generate
  model: a
  max_new_tokens: 2
  expect: {contains: " was"}
"""


@pytest.fixture
def spec(tmp_path, tiny_checkpoints):
    return write_spec(tmp_path, tiny_checkpoints["a"], PROMPTS, CLAIMS, "iter")


def run(*args) -> tuple[int, dict]:
    """`harness run ... -q` with a JSON report; returns the exit code and the claims run."""
    report = args[0].parent / "r.json"
    code = harness_main(["run", *map(str, args), "-q", "--report-json", str(report)])
    data = json.loads(report.read_text())
    return code, data


def claim_ids(data: dict) -> list[str]:
    return [c["id"] for s in data["specs"] for c in s["claims"]]


def test_keyword_expressions_follow_pytest():
    names = ["iter::holds", "iter", "logit_diff"]
    assert keyword_matcher("holds")(names) and keyword_matcher("HOLD")(names)
    assert not keyword_matcher("holds and not logit")(names)
    assert keyword_matcher("breaks or logit_diff")(names)


def test_k_selects_claims(spec, capsys):
    code, data = run(spec, "-k", "breaks")
    assert code == 1 and claim_ids(data) == ["breaks"]
    code, data = run(spec, "-k", "not breaks and not generate")
    assert code == 0 and claim_ids(data) == ["holds"]
    code, data = run(spec, "-k", "nothing-like-this")
    assert code == 0 and claim_ids(data) == []
    assert "no claim matches -k 'nothing-like-this'" in capsys.readouterr().err


def test_bad_k_expression_is_a_usage_error(spec, capsys):
    assert harness_main(["run", str(spec), "-q", "-k", "holds and ("]) == 2
    assert "-k: invalid expression" in capsys.readouterr().err


def test_last_failed_reruns_what_failed(spec):
    code, data = run(spec, "--last-failed")          # no state yet: everything runs
    assert code == 1 and claim_ids(data) == ["holds", "breaks", "greedy-words"]
    state = json.loads((spec.parent / STATE_FILE).read_text())
    assert state == {"iter.yaml": {"failed": ["breaks"]}}

    code, data = run(spec, "--lf")
    assert code == 1 and claim_ids(data) == ["breaks"]

    spec.write_text(spec.read_text().replace('{">": 1000}', '{">": -1000}'))   # fix it
    code, data = run(spec, "--lf")
    assert code == 0 and claim_ids(data) == ["breaks"]
    code, data = run(spec, "--lf")                    # nothing failed: everything runs again
    assert code == 0 and len(claim_ids(data)) == 3


def test_limit_measures_the_first_prompts_and_says_so(spec, capsys, tmp_path):
    md = tmp_path / "r.md"
    code, data = run(spec, "--limit", "1", "-k", "holds", "--report-md", md)
    assert code == 3                                  # passed, but only a quick look
    assert data["limit"] == 1
    (holds,) = data["specs"][0]["claims"]
    assert len(holds["per_prompt"]) == 1 and holds["prompts"] == ["This movie was really"]
    out = capsys.readouterr().out
    assert "1 claim: 1 passed (LIMITED to the first 1 prompt of each claim)" in out
    assert "LIMITED" in md.read_text()
    code, data = run(spec, "--limit", "2")
    assert code == 1                                  # a failure is still a failure
    full_code, full = run(spec)
    assert "limit" not in full and len(full["specs"][0]["claims"][0]["per_prompt"]) == 3


def test_show_prints_the_whole_measurement(tmp_path, tiny_checkpoints, capsys):
    claims = CLAIMS + textwrap.dedent("""\
        - id: sweep
          measure: patch_sweep
          from: b
          into: a
          site: resid_pre
          over: [layer, pos]
          prompt: "This movie was really"
          expect: {max: {">": -100}}
        - id: sampled
          measure: generate
          model: a
          temperature: 1.0
          samples: 2
          seed: 7
          max_new_tokens: 2
          expect: {rate: {not_contains: "@@@", ">=": 1.0}}
        """)
    spec = write_spec(tmp_path, tiny_checkpoints["a"], PROMPTS, claims, "show")
    spec.write_text(spec.read_text().replace(
        "models:\n", f'models:\n  b: {{path: "{tiny_checkpoints["b"]}"}}\n'))
    assert harness_main(["show", f"{spec}::holds"]) == 0
    out = capsys.readouterr().out
    assert "show::holds  PASSED" in out and "per prompt:" in out
    assert "The acting was" in out and "The plot was" in out

    assert harness_main(["show", f"{spec}::sweep"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("layer \\ pos"))
    assert "0 '<|endoftext|>'" in header and "' really'" in header   # positions as tokens
    assert re.search(r"^1\s+-?\d", out, re.M)                        # a row per layer

    assert harness_main(["show", f"{spec}::sampled"]) == 0
    out = capsys.readouterr().out
    seeds = [int(m) for m in re.findall(r"^\s*\d+\s+.+?\s{2,}(\d+)\s", out, re.M)]
    assert seeds[:6] == [7, 8, 9, 10, 11, 12]


def test_show_names_unknown_claims(spec, capsys):
    assert harness_main(["show", f"{spec}::hold"]) == 2
    assert "no claim 'hold'; did you mean 'holds'" in capsys.readouterr().err
    assert harness_main(["show", str(spec)]) == 2
    assert "expected SPEC::CLAIM" in capsys.readouterr().err


def test_pytest_lf_and_ff_rerun_failed_claims(pytester, tiny_checkpoints):
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    pytester.mkdir("specs")
    pytester.mkdir("checks")
    write_spec(pytester.path / "specs", tiny_checkpoints["a"], PROMPTS, CLAIMS, "tiny")
    pytester.runpytest("checks").assert_outcomes(passed=2, failed=1)
    assert (pytester.path / ".pytest_cache").is_dir()
    again = pytester.runpytest("checks", "--lf")
    again.assert_outcomes(failed=1, deselected=2)
    first = pytester.runpytest("checks", "--ff", "-v")
    first.assert_outcomes(passed=2, failed=1)
    ran = [line for line in first.outlines if "::" in line and ("PASSED" in line
                                                                or "FAILED" in line)]
    assert "tiny::breaks" in ran[0]
