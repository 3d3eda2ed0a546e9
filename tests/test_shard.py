"""Sharding (`--shard K/N`, `--harness-shard K/N`) and `harness merge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main as harness_main
from harness.errors import HarnessError
from harness.shard import _group_key, claim_cost, parse_shard, plan
from harness.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SPECS = [load_spec(p) for p in sorted((REPO / "specs").glob("*.yaml"))]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 40])
def test_every_claim_is_in_exactly_one_part_and_groups_stay_together(n):
    parts = plan(SPECS, n)
    everything = [(str(s.file), i) for s in SPECS for i in range(len(s.claims))]
    assert sorted(x for part in parts for x in part) == sorted(everything)
    assert sum(len(p) for p in parts) == len(everything)        # no claim twice
    where = {x: k for k, part in enumerate(parts) for x in part}
    by_group: dict[str, set[int]] = {}
    for spec in SPECS:
        for i, claim in enumerate(spec.claims):
            by_group.setdefault(_group_key(spec, claim), set()).add(where[(str(spec.file), i)])
    assert all(len(found) == 1 for found in by_group.values())
    assert plan(SPECS, n) == parts                                # deterministic


def test_parts_are_balanced():
    costs = {}
    for spec in SPECS:
        for claim in spec.claims:
            costs.setdefault(_group_key(spec, claim), 0.0)
            costs[_group_key(spec, claim)] += claim_cost(spec, claim)
    cost_of = {(str(s.file), i): claim_cost(s, c) for s in SPECS for i, c in enumerate(s.claims)}
    loads = [sum(cost_of[x] for x in part) for part in plan(SPECS, 3)]
    assert max(loads) - min(loads) <= max(costs.values())        # greedy bound


@pytest.mark.parametrize("text", ["0/3", "4/3", "2", "a/b", "", "1/0"])
def test_bad_shard_says_how(text):
    with pytest.raises(HarnessError, match="K/N"):
        parse_shard(text)
    assert parse_shard(" 2/8 ") == (2, 8)


TINY_CLAIMS = """\
- id: holds
  measure: logit_diff
  model: a
  expect: {"<": 1000}
- id: breaks
  measure: logit_diff
  model: a
  expect: {">": 1000}
- id: tops
  measure: top_k
  model: a
  k: 2
  expect: {includes: [" bad"]}
- id: family-diff
  measure: logit_diff
  model: a
  prompts: family
  expect: {"<": 1000}
- id: says-this
  measure: generate
  model: a
  max_new_tokens: 3
  expect: {contains: "This movie"}
"""


def _write_spec(directory: Path, model_dir: Path) -> Path:
    from harness.testing import write_spec

    spec = write_spec(directory, model_dir, '''\
        - text: "This movie was really"
          answer: " bad"
          foil: " good"
        ''', TINY_CLAIMS, name="tiny")
    text = spec.read_text().replace("claims:\n", 'prompt_sets:\n  family:\n    - template: '
                                    '"The {x} was"\n      values: {x: [plot, acting]}\n'
                                    '      answer: " bad"\n      foil: " good"\nclaims:\n')
    spec.write_text(text)
    return spec


def _claims(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {(s["spec"], c["id"]): (c["status"], c["measured"])
            for s in data["specs"] for c in s["claims"]}


def test_shards_merge_to_the_unsharded_run(tmp_path, tiny_checkpoints, capsys):
    spec = _write_spec(tmp_path, tiny_checkpoints["a"])
    whole = tmp_path / "whole.json"
    assert harness_main(["run", str(spec), "-q", "--report-json", str(whole)]) == 1
    parts = []
    for k in (1, 2, 3):
        out = tmp_path / f"part{k}.json"
        harness_main(["run", str(spec), "-q", "--shard", f"{k}/3", "--report-json", str(out)])
        parts.append(out)
    sizes = [len(_claims(p)) for p in parts]
    assert sum(sizes) == 5 and max(sizes) < 5
    merged = tmp_path / "merged.json"
    code = harness_main(["merge", *map(str, parts), "--report-json", str(merged),
                         "--report-md", str(tmp_path / "m.md"), "--report-html",
                         str(tmp_path / "html"), "--junitxml", str(tmp_path / "junit.xml")])
    assert code == 1                                   # `breaks` fails in one part
    assert _claims(merged) == _claims(whole)
    ids = [c["id"] for c in json.loads(merged.read_text())["specs"][0]["claims"]]
    assert ids == ["holds", "breaks", "tops", "family-diff", "says-this"]   # spec order
    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testcase") == 5 and 'failures="2"' in junit   # breaks, tops
    assert "breaks" in (tmp_path / "m.md").read_text()
    assert (tmp_path / "html" / "report.html").is_file()
    assert "merged 3 reports" in capsys.readouterr().out


def test_merge_of_passing_parts_exits_0_and_bad_input_exits_2(tmp_path, capsys):
    report = {"harness_version": "x", "environment": {}, "specs": [
        {"spec": "s", "file": "s.yaml", "claims": [
            {"id": "a", "status": "passed", "measure": "logit_diff", "measured": 1.0,
             "expected": {}, "message": "", "seconds": 0.1, "line": 3}]}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert harness_main(["merge", str(tmp_path / "r.json")]) == 0
    (tmp_path / "bad.json").write_text("{")
    assert harness_main(["merge", str(tmp_path / "bad.json")]) == 2
    assert "cannot read JSON report" in capsys.readouterr().err
    report["specs"][0]["error"] = "spec error: x"
    (tmp_path / "e.json").write_text(json.dumps(report))
    assert harness_main(["merge", str(tmp_path / "r.json"), str(tmp_path / "e.json")]) == 2


def test_pytest_shards_cover_every_claim_once(pytester, tiny_checkpoints):
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    pytester.mkdir("checks")
    _write_spec(pytester.mkdir("specs"), tiny_checkpoints["a"])
    seen = []
    for k in (1, 2):
        result = pytester.runpytest("checks", "--collect-only", "-q",
                                    f"--harness-shard={k}/2")
        seen += [line for line in result.stdout.lines if "::tiny::" in line]
    assert sorted(seen) == sorted(f"specs/tiny.yaml::tiny::{c}" for c in
                                  ("holds", "breaks", "tops", "family-diff", "says-this"))
    result = pytester.runpytest("checks", "--collect-only", "--harness-shard=3/2")
    assert result.ret != 0 and "K/N" in result.stderr.str() + result.stdout.str()
