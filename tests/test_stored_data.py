"""Nothing stored is lost or poisoned (issue 20, items 8-12): baselines, counterexample stores,
the --lf state, temporary files and frozen specs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest


def tiny_spec(directory: Path, model_dir: Path, claims: str, name: str = "spec",
              suffix: str = ".yaml") -> Path:
    path = directory / f"{name}{suffix}"
    path.write_text(f'spec: {name}\nmodels:\n  a: {{path: "{model_dir}"}}\nprompts:\n'
                    '  - text: "This movie was really"\n    answer: " bad"\n    foil: " good"\n'
                    '  - text: "The film was truly"\n    answer: " bad"\n    foil: " good"\n'
                    "claims:\n" + textwrap.indent(textwrap.dedent(claims), "  "))
    return path


def run_cli(*args) -> int:
    from harness.cli import main

    return main(["run", *map(str, args), "-q"])


LOGIT = "- {id: c, measure: logit_diff, model: a, expect: {'<': 1000}}\n"


# ----------------------------------------------------------------------------- 8: --limit

def test_limited_run_cannot_write_baselines(tmp_path, tiny_checkpoints, capsys):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    code = run_cli(path, "--limit", "1", "--update-baselines")
    err = capsys.readouterr().err
    assert code == 2 and "--limit" in err and "--update-baselines" in err
    assert not (tmp_path / "spec.baseline.json").exists()


# ----------------------------------------------------------------------------- 9: x.yaml, x.yml

def _verdict(spec_file: str, claim_id: str, value: float):
    from harness.claims import Verdict

    return Verdict("s", spec_file, 1, claim_id, "logit_diff", ("a",), "passed", {},
                   measured=value)


def test_yaml_and_yml_of_one_stem_keep_their_own_stores(tmp_path):
    from harness.baselines import read_baseline, update_baseline
    from harness.search import _read_store, _remember

    a, b = str(tmp_path / "x.yaml"), str(tmp_path / "x.yml")
    Path(a).write_text("claims: []\n")
    Path(b).write_text("claims: []\n")
    update_baseline(a, [_verdict(a, "c", 1.0)], {})
    update_baseline(b, [_verdict(b, "c", 2.0)], {})
    assert read_baseline(a)["c"]["measured"] == 1.0
    assert read_baseline(b)["c"]["measured"] == 2.0
    assert (tmp_path / "x.baseline.json").exists()      # the common case keeps its name
    _remember(a, "c", {"entry": 0, "values": {}, "swap": {}})
    _remember(b, "c", {"entry": 1, "values": {}, "swap": {}})
    assert _read_store(a)["c"] == [{"entry": 0, "values": {}, "swap": {}}]
    assert _read_store(b)["c"] == [{"entry": 1, "values": {}, "swap": {}}]


def test_a_yml_specs_old_baseline_is_read_and_moved(tmp_path):
    from harness.baselines import baseline_path, read_baseline, update_baseline

    spec = str(tmp_path / "x.yml")
    old = tmp_path / "x.baseline.json"     # where releases before the split wrote it
    old.write_text(json.dumps({"claims": {"c": {"measured": 3.0}}}))
    assert read_baseline(spec)["c"]["measured"] == 3.0
    update_baseline(spec, [_verdict(spec, "d", 4.0)], {})
    stored = read_baseline(spec)
    assert stored["c"]["measured"] == 3.0 and stored["d"]["measured"] == 4.0
    assert baseline_path(spec).name == "x.yml.baseline.json" and not old.exists()


# ----------------------------------------------------------------------------- 10: --lf state

@pytest.mark.parametrize("state", ["[]", '{"spec.yaml": 5}', '{"spec.yaml": {"failed": 7}}',
                                   '{"spec.yaml": {"failed": [1]}}', "{torn"])
def test_odd_state_file_never_costs_the_report(tmp_path, tiny_checkpoints, state):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    (tmp_path / ".harness-state.json").write_text(state)
    report = tmp_path / "r.json"
    assert run_cli(path, "--lf", "--report-json", report) == 0
    assert json.loads(report.read_text())["specs"][0]["claims"][0]["status"] == "passed"
    assert json.loads((tmp_path / ".harness-state.json").read_text())["spec.yaml"] == \
        {"failed": []}


def _record(folder: str, name: str) -> None:
    from harness.selection import record_run

    for _ in range(20):
        record_run(Path(folder) / name, {"c": "failed"}, ["c"])


def test_concurrent_runs_keep_every_specs_state(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_record, args=(str(tmp_path), f"s{w}.yaml")) for w in range(8)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    state = json.loads((tmp_path / ".harness-state.json").read_text())
    assert state == {f"s{w}.yaml": {"failed": ["c"]} for w in range(8)}


# ----------------------------------------------------------------------------- 11: temp files

@pytest.mark.parametrize("name", ["*", "report.md", "[n]otes"])
def test_cleanup_of_temporary_files_spares_the_users_files(tmp_path, name):
    from harness.jsonfiles import write_atomic

    mine = [tmp_path / ".notes.2024.tmp", tmp_path / ".report.md.draft.tmp",
            tmp_path / ".notes.1.tmp", tmp_path / f".{name}.abcdefgh.tmp"]
    for path in mine:
        path.write_text("the user's")
    write_atomic(tmp_path / name, "x\n")
    assert (tmp_path / name).read_text() == "x\n"
    assert all(p.read_text() == "the user's" for p in mine)
    assert not [p for p in tmp_path.iterdir() if "harness-" in p.name]


# ----------------------------------------------------------------------------- 12: freeze

FREEZABLE = """\
spec: {name}
models:
  a: {{path: ../model}}
saes:
  s: {{path: sae}}
prompts:
  - {{file: rows.txt}}
  - {{dataset: {{name: json, data_files: rows.jsonl}}}}
  - {{dataset: {{name: json, data_files: [rows.jsonl]}}}}
claims:
  - {{id: c, measure: logit_diff, model: a, expect: {{">": 0}}}}
"""


def _freezable(folder: Path, name: str, suffix: str = ".yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"x{suffix}"
    path.write_text(FREEZABLE.format(name=name))
    return path


def _report(tmp_path: Path, specs: list[Path]) -> Path:
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"specs": [
        {"spec": f"s{i}", "file": str(p), "claims": [
            {"id": "c", "measure": "logit_diff", "status": "passed", "measured": float(i),
             "params": {}}]} for i, p in enumerate(specs)]}))
    return report


def freeze(*args) -> int:
    from harness.cli import main

    return main(["freeze", *map(str, args)])


def test_freezing_two_specs_of_one_stem_writes_two_files(tmp_path):
    import yaml

    specs = [_freezable(tmp_path / "a", "one"), _freezable(tmp_path / "b", "two"),
             _freezable(tmp_path / "b", "three", ".yml")]
    out = tmp_path / "frozen"
    assert freeze(_report(tmp_path, specs), "-o", out) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a-x.frozen.yaml", "b-x.frozen.yaml", "b-x.yml.frozen.yaml"]
    names = {yaml.safe_load((out / n).read_text())["spec"] for n in written}
    assert names == {"one-frozen", "two-frozen", "three-frozen"}


def test_frozen_spec_reads_the_same_files(tmp_path):
    import yaml

    spec = _freezable(tmp_path / "specs", "one")
    out = tmp_path / "elsewhere" / "deep" / "frozen.yaml"
    assert freeze(_report(tmp_path, [spec]), "-o", out) == 0
    data = yaml.safe_load(out.read_text())
    here = out.parent

    def same(value: str, original: str) -> bool:
        return (here / value).resolve() == (spec.parent / original).resolve()
    assert same(data["models"]["a"]["path"], "../model")
    assert same(data["saes"]["s"]["path"], "sae")
    assert same(data["prompts"][0]["file"], "rows.txt")
    assert same(data["prompts"][1]["dataset"]["data_files"], "rows.jsonl")
    assert same(data["prompts"][2]["dataset"]["data_files"][0], "rows.jsonl")


def test_freeze_into_a_directory(tmp_path, capsys):
    spec = _freezable(tmp_path / "specs", "one")
    out = tmp_path / "out"
    out.mkdir()
    assert freeze(_report(tmp_path, [spec]), "-o", out) == 0
    assert (out / "x.frozen.yaml").exists()
    two = _report(tmp_path, [spec, _freezable(tmp_path / "more", "two")])
    assert freeze(two, "-o", out / "x.frozen.yaml") == 2
    assert "names a directory" in capsys.readouterr().err
