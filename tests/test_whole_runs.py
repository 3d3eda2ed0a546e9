"""Issue 20, items 16-21: where a spec error is promised, a spec error comes (exit 2, file,
line and field, no traceback) and the other specs still run; names and report fields cannot
inject markup; frozen specs cannot inject keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_hardening import run_cli, strict_json, tiny_spec, validate

LOGIT = "- {id: c, measure: logit_diff, model: a, expect: {'<': 1000}}\n"


def other_spec(directory: Path, model_dir: Path) -> Path:
    """A good spec beside a broken one: it must still run and be reported."""
    return tiny_spec(directory, model_dir, LOGIT.replace("id: c", "id: good"), name="z_good")


def good_claims(report: Path) -> list[str]:
    data = strict_json(report)
    return [c["status"] for s in data["specs"] for c in s["claims"] if s["spec"] == "z_good"]


# ----------------------------------------------------------------------------- item 16

REFERENCE_SETS = {   # the claim reads the set `ref` besides its own prompts
    "ablate-reference": "- {id: c, measure: ablate, model: a, site: resid_pre, layers: [0], "
                        "kind: mean, reference: {prompts: ref}, expect: {'<': 1000}}\n",
    "circuit-reference": "- {id: c, measure: circuit, model: a, members: [L0H0], kind: mean, "
                         "reference: ref, expect: {'<': 1000}}\n",
}


def with_sets(path: Path, answer: str = " badly awful") -> Path:
    """The spec with a prompt set `ref` (line 10: its prompt) whose answer is `answer`."""
    text = path.read_text().replace("claims:\n", "prompt_sets:\n  ref:\n    - {text: \"This "
                                    f"film was truly\", answer: \"{answer}\", foil: \" good\"}}"
                                    "\nclaims:\n")
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", REFERENCE_SETS)
def test_multi_token_answer_in_a_reference_set(tmp_path, tiny_checkpoints, capsys, case):
    """validate and run both refuse it before weights load; the other spec still runs."""
    path = with_sets(tiny_spec(tmp_path, tiny_checkpoints["a"], REFERENCE_SETS[case]))
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:10: prompt_sets.ref[0].answer: answer ' badly awful' is 4 " \
        "tokens for model 'a'" in out, out
    other_spec(tmp_path, tiny_checkpoints["a"])
    report = tmp_path / "r.json"
    assert run_cli(tmp_path, "--report-json", report) == 2
    err = capsys.readouterr().err
    assert "prompt_sets.ref[0].answer" in err and "Traceback" not in err
    assert good_claims(report) == ["passed"]


def test_spec_error_at_claim_time_stops_only_its_spec(tmp_path, tiny_checkpoints, capsys,
                                                      monkeypatch):
    """Should a token problem slip past the checks, it ends its spec, not the run."""
    import harness.runner

    monkeypatch.setattr(harness.runner, "check_tokens", lambda spec, session=None: [])
    with_sets(tiny_spec(tmp_path, tiny_checkpoints["a"],
                        REFERENCE_SETS["ablate-reference"]))
    other_spec(tmp_path, tiny_checkpoints["a"])
    report = tmp_path / "r.json"
    assert run_cli(tmp_path, "--report-json", report) == 2
    assert "prompt_sets.ref[0].answer" in capsys.readouterr().err
    assert good_claims(report) == ["passed"]
    assert [s.get("error") is not None for s in strict_json(report)["specs"]] == [True, False]


# ----------------------------------------------------------------------------- item 17

def config_copy(tmp_path: Path, src: Path, name: str, old: str, new: str) -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(src, dst)
    config = dst / "config.json"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    return dst


def test_config_field_of_the_wrong_type(tmp_path, tiny_checkpoints, capsys):
    """`n_layer: "two"`: validate and run name the file and the field; the other spec runs."""
    broken = config_copy(tmp_path, tiny_checkpoints["a"], "two", '"n_layer": 2', '"n_layer": "two"')
    path = tiny_spec(tmp_path, broken, LOGIT)
    message = f'models.a: {broken}/config.json: field `n_layer` is "two", not an integer'
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:3: {message}" in out, out
    other_spec(tmp_path, tiny_checkpoints["a"])
    report = tmp_path / "r.json"
    assert run_cli(tmp_path, "--report-json", report) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert good_claims(report) == ["passed"]


@pytest.mark.parametrize(("old", "new"), [
    ('"n_layer": 2', '"n_layer": 2.5'), ('"n_head": 4', '"n_head": [4]'),
    ('"vocab_size": 339', '"vocab_size": true'),
    ('"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": "x"')])
def test_optional_model_with_a_broken_config_skips(tmp_path, tiny_checkpoints, capsys, old,
                                                   new):
    """Its claims skip and say why (a field the checks read, or one transformers refuses)."""
    broken = config_copy(tmp_path, tiny_checkpoints["a"], "broken", old, new)
    path = tiny_spec(tmp_path, broken, LOGIT, model_extra=", optional: true")
    code, out = validate(capsys, path)
    assert code == 0, out
    report = tmp_path / "r.json"
    assert run_cli(path, "--report-json", report) == 0
    assert "Traceback" not in capsys.readouterr().err
    claim = strict_json(report)["specs"][0]["claims"][0]
    assert claim["status"] == "skipped" and old.split('"')[1] in claim["message"], claim


# ----------------------------------------------------------------------------- item 18

def file_spec(tmp_path: Path, model_dir: Path, name: str, content: bytes) -> Path:
    """A spec whose prompts (line 5, `prompts[0].file`) are read from `name`."""
    (tmp_path / name).write_bytes(content)
    return tiny_spec(tmp_path, model_dir, LOGIT,
                     f'- {{file: {name}, answer: " bad", foil: " good"}}\n')


@pytest.mark.parametrize(("name", "content", "words"), [
    ("p.txt", b"This movie was fine\nThis movie was r\xe9ally\n", "p.txt:2: not UTF-8 (byte 0xe9)"),
    ("p.jsonl", b'{"text": "r\xe9ally"}\n', "p.jsonl:1: not UTF-8 (byte 0xe9)"),
    ("p.jsonl", b'{"text": "This movie was"}\n5\n', "p.jsonl:2: a row must be a JSON object"),
    ("p.jsonl", b'{"text": "This movie was"}\n\nnull\n', "p.jsonl:3: a row must be a JSON object"),
])
def test_unreadable_prompt_files_are_spec_errors(tmp_path, tiny_checkpoints, capsys, name,
                                                 content, words):
    path = file_spec(tmp_path, tiny_checkpoints["a"], name, content)
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:5: prompts[0].file: {tmp_path}/{words}" in out, out
    assert "Traceback" not in out


def test_non_utf8_prompt_file_under_pytest(pytester, tiny_checkpoints):
    """A spec error item; the session goes on to the good spec."""
    specs = pytester.mkdir("specs")
    file_spec(specs, tiny_checkpoints["a"], "p.txt", b"r\xe9ally\n")
    other_spec(specs, tiny_checkpoints["a"])
    result = pytester.runpytest(str(specs), "-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    assert result.ret == 2 and "not UTF-8" in result.stdout.str()


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "x"]}}, [0, 4],
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
    {"w": {"dtype": "F32", "shape": [1]}}, {"w": 5}])
def test_malformed_safetensors_header(tmp_path, tiny_checkpoints, capsys, header):
    import shutil
    import struct

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["a"], folder)
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    code, out = validate(capsys, tiny_spec(tmp_path, folder, LOGIT))
    assert code == 2 and f"models.a: {folder}/model.safetensors is corrupt" in out, out
    assert "Traceback" not in out


def harness_main(capsys, *args) -> tuple[int, str]:
    from harness.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_report_paths_that_cannot_be_written(tmp_path, tiny_checkpoints, capsys):
    """Refused before anything runs (usage, exit 2), in both front ends."""
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    a_file = tmp_path / "existing.html"
    a_file.write_text("mine\n")
    code, out = harness_main(capsys, "run", path, "-q", "--report-html", a_file)
    assert code == 2 and "--report-html" in out and "is a file" in out, out
    assert a_file.read_text() == "mine\n" and "passed" not in out
    code, out = harness_main(capsys, "run", path, "-q", "--report-json", a_file / "r.json")
    assert code == 2 and f"cannot write in {a_file} (not a folder)" in out, out
    code, out = harness_main(capsys, "run", path, "-q", "--report-md", tmp_path)
    assert code == 2 and "is a folder" in out, out
    assert "Traceback" not in out


def test_pytest_refuses_an_html_report_path_that_is_a_file(pytester, tiny_checkpoints):
    specs = pytester.mkdir("specs")
    other_spec(specs, tiny_checkpoints["a"])
    (pytester.path / "r.html").write_text("mine\n")
    result = pytester.runpytest(str(specs), "--harness-report-html", "r.html")
    assert result.ret == 4 and "--harness-report-html r.html is a file" in result.stderr.str()


def test_report_write_failure_is_an_error_not_a_traceback(tmp_path, tiny_checkpoints, capsys,
                                                         monkeypatch):
    import harness.baselines

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(harness.baselines, "write_atomic", refuse)
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    code, out = harness_main(capsys, "run", path, "-q", "--report-json", tmp_path / "r.json")
    assert code == 2 and f"cannot write a report: {tmp_path}/r.json: Permission denied" in out
    assert "Traceback" not in out


FOREIGN = ['{"a": 1}', "[1, 2]", '{"specs": [5]}', '{"specs": [{"spec": "x", "claims": [7]}]}',
           '{"specs": [{"spec": "x", "file": "x.yaml", "claims": [{"id": "c", "measure": "m", '
           '"status": "won"}]}]}', "\xff", "[" * 100_000,
           '{"specs": [{"spec": "x", "file": "x.yaml", "claims": [{"id": "c", "measure": "m", '
           '"status": "passed", "seconds": "1\\" injected=\\"yes"}]}]}']


@pytest.mark.parametrize("content", FOREIGN)
@pytest.mark.parametrize("command", ["merge", "diff", "freeze"])
def test_foreign_json_is_refused(tmp_path, capsys, content, command):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(content, encoding="latin-1")
    good = tmp_path / "good.json"
    good.write_text('{"specs": []}')
    args = {"merge": ["merge", foreign], "diff": ["diff", good, foreign],
            "freeze": ["freeze", foreign, "-o", tmp_path / "out.yaml"]}[command]
    code, out = harness_main(capsys, *args)
    assert code == 2 and str(foreign) in out and "--report-json" in out, out
    assert "Traceback" not in out and not (tmp_path / "out.yaml").exists()


@pytest.mark.parametrize("expression", ["(" * 5000 + "a" + ")" * 5000, "not " * 5000 + "a"])
def test_deeply_nested_k_expression(tmp_path, tiny_checkpoints, capsys, expression):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    code, out = harness_main(capsys, "run", path, "-q", "-k", expression)
    assert code == 2 and "nests too deeply" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- item 19

HOSTILE = "x\n# injected\n![img](http://evil.example/x.png) <img src=x> <b>hi</b> \x1b[31mred|`"


@pytest.mark.parametrize("name", [HOSTILE, "a::b", "a[1]", "a b", "\x1b[2J", "<b>x</b>",
                                  "x" * 101])
def test_spec_names_outside_the_character_set_are_spec_errors(tmp_path, tiny_checkpoints,
                                                              capsys, name):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    path.write_text(f"spec: {json.dumps(name)}\n" + path.read_text().split("\n", 1)[1])
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:1: spec: spec name" in out, out
    assert "may use only letters, digits, '_', '-' and '.'" in out and "\x1b" not in out


def test_a_file_stem_outside_the_character_set_says_how_to_fix_it(tmp_path, tiny_checkpoints,
                                                                  capsys):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT, name="a::b[1]")
    path.write_text(path.read_text().split("\n", 1)[1])      # no `spec:`: the stem names it
    code, out = validate(capsys, path)
    assert code == 2 and "spec name 'a::b[1]'" in out and "set `spec: NAME`" in out, out


def hostile_report(tmp_path: Path) -> Path:
    """A JSON report (hand-edited, or from an older harness) whose every text field is hostile:
    merge must write it out without letting any field become markup."""
    claim = {"id": HOSTILE, "measure": HOSTILE, "status": "failed", "models": [HOSTILE],
             "measured": HOSTILE, "expected": {"contains": "a|b\n| c |"}, "message": HOSTILE,
             "seconds": 1.5}
    report = {"harness_version": HOSTILE, "environment": {"python": HOSTILE},
              "specs": [{"spec": HOSTILE, "file": HOSTILE, "error": HOSTILE + "\n```\n# out",
                         "claims": [claim, dict(claim, id="ok", status="passed")]}]}
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(report))
    return path


def unescaped_pipes(line: str) -> int:
    import re

    return len(re.findall(r"(?<!\\)\|", line))


def test_hostile_report_fields_are_escaped_in_every_format(tmp_path, capsys):
    import re
    import xml.etree.ElementTree as ET

    out = tmp_path / "out"
    code, printed = harness_main(capsys, "merge", hostile_report(tmp_path), "--report-md",
                                 out / "r.md", "--report-html", out / "html", "--junitxml",
                                 out / "junit.xml")
    assert code == 2 and "\x1b" not in printed                 # terminal: shown, not obeyed
    md = (out / "r.md").read_text()
    outside_fences, fence = [], None
    for line in md.splitlines():
        if fence is None and line.startswith("```"):
            fence = line
        elif fence is not None and line == fence:
            fence = None
        elif fence is None:
            outside_fences.append(line)
    assert fence is None                                       # the error's block is closed
    headings = [line for line in outside_fences if line.startswith("#")]
    assert headings[0] == "# interp-harness report" and len(headings) == 2
    assert headings[1].startswith(r"## x\\n\# injected")      # shown as written, on one line
    text = re.sub(r"(?<!\\)(`+).+?\1", "", "\n".join(outside_fences))   # code spans are literal
    for markup in ("![", "<img", "<b>", "\x1b"):
        assert markup not in text, markup
    assert not re.search(r"(?<!\\)\]\(", text)                # no link or image target
    table = [line for line in outside_fences if line.startswith("|")]
    assert len(table) == 4 and len({unescaped_pipes(line) for line in table}) == 1, table
    junit = ET.parse(out / "junit.xml").getroot()               # well-formed XML
    names = [case.get("name") for case in junit.iter("testcase")]
    assert names[1].startswith("x\n# injected") and "\\x1b[31mred" in names[1]
    html = (out / "html" / "report.html").read_text()
    for markup in ("<img src=x>", "<b>hi</b>", "\x1b"):
        assert markup not in html, markup


# ----------------------------------------------------------------------------- item 20

INJECTED = ("\nprompt_sets:\n  pw: [{file: /etc/passwd}]\nclaims:\n- {id: evil, measure: "
            "logit_diff, model: a, expect: {'<': 1.0e9}}\n#")


@pytest.mark.parametrize("where", ["environment", "measure", "metric", "seed", "labels"])
def test_freeze_of_a_hostile_report_injects_no_keys(tmp_path, tiny_checkpoints, capsys, where):
    import yaml

    source = tiny_spec(tmp_path, tiny_checkpoints["a"], {
        "metric": "- {id: c, measure: patch, from: a, into: a, site: resid_pre, layers: [0], "
                  "expect: {'>': 0}}\n",
        "seed": "- {id: c, measure: generate, model: a, max_new_tokens: 2, "
                "expect: {contains: This}}\n",
        "labels": "- {id: c, measure: patch_sweep, from: a, into: a, site: resid_pre, "
                  "over: [layer], expect: {argmax: 0}}\n"}.get(where, LOGIT))
    claim = {"id": "c", "measure": "logit_diff", "status": "passed", "measured": 1.0,
             "expected": {}, "params": {}}
    if where == "measure":   # a report of another spec: not frozen, and the note is one line
        claim["measure"] = "x" + INJECTED
    if where in ("metric", "seed"):
        claim.update(measure="patch" if where == "metric" else "generate",
                     measured=1.0 if where == "metric" else "a text",
                     params={"metric" if where == "metric" else "seed": "x" + INJECTED})
    if where == "labels":
        claim.update(measure="patch_sweep", measured={
            "axes": ["layer"], "labels": [["x" + INJECTED, "y"]], "values": [1.0, 0.0]})
    report = {"environment": {"device": "cpu" + INJECTED if where == "environment" else "cpu"},
              "specs": [{"spec": "spec", "file": str(source), "claims": [claim]}]}
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "frozen.yaml"
    code, printed = harness_main(capsys, "freeze", path, "-o", out)
    assert code == 0, printed
    frozen = yaml.safe_load(out.read_text())
    assert set(frozen) == set(yaml.safe_load(source.read_text())), out.read_text()
    assert [c["id"] for c in frozen["claims"]] == ["c"]
    assert "/etc/passwd" not in json.dumps({k: v for k, v in frozen.items() if k != "claims"})
    if where != "labels":    # a label is pinned as written: a value, never a key
        code, printed = validate(capsys, out)
        assert code == 0, printed


# ----------------------------------------------------------------------------- item 21

@pytest.mark.parametrize(("row", "shown"), [("0", "0"), ("false", "false"), ("[]", "[]"),
                                            ("null", "null"), ('{"a": 1}', '{"a": 1}')])
def test_non_string_text_in_a_jsonl_row_is_a_spec_error(tmp_path, tiny_checkpoints, capsys, row,
                                                        shown):
    """Never dropped silently: the error names the file, its line and the field."""
    content = f'{{"text": "This movie was"}}\n{{"text": {row}}}\n'.encode()
    path = file_spec(tmp_path, tiny_checkpoints["a"], "p.jsonl", content)
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:5: prompts[0].file: p.jsonl:2: `text` must be a string, got " \
        f"{shown}" in out, out


def test_a_non_string_answer_in_a_row_is_a_spec_error(tmp_path, tiny_checkpoints, capsys):
    content = b'{"text": "This movie was", "answer": 5}\n'
    path = file_spec(tmp_path, tiny_checkpoints["a"], "p.jsonl", content)
    code, out = validate(capsys, path)
    assert code == 2 and "p.jsonl:1: `answer` must be a string, got 5" in out, out


CORRUPT_CLAIM = ("- {{id: c, measure: patch, {sel}from: {{model: a, input: corrupt}}, into: a, "
                 "site: resid_pre, layers: [0], expect: {{'<': 1000}}}}\n")


@pytest.mark.parametrize("sel", ["prompts: plain, ", "prompt: 'This movie was', "])
def test_corrupt_input_without_corrupt_texts_is_a_spec_error(tmp_path, tiny_checkpoints, capsys,
                                                            sel):
    """Not a claim-time `'NoneType' object has no attribute 'shape'`."""
    prompts = ('- {text: "This movie was really", answer: " bad", foil: " good", '
               'corrupt: "This movie was truly"}\n')
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], CORRUPT_CLAIM.format(sel=sel), prompts)
    path.write_text(path.read_text().replace("claims:\n", "prompt_sets:\n  plain:\n    - {text: "
                                             "\"This movie was\", answer: \" bad\", foil: "
                                             "\" good\"}\nclaims:\n"))
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:10: claims[0]: patching from/into `input: corrupt` needs " \
        "prompts with `corrupt:` texts" in out, out
    other_spec(tmp_path, tiny_checkpoints["a"])
    report = tmp_path / "r.json"
    assert run_cli(tmp_path, "--report-json", report) == 2
    assert "NoneType" not in capsys.readouterr().err and good_claims(report) == ["passed"]


def test_file_paths_are_read_as_written(tmp_path, tiny_checkpoints):
    """The documented choice (docs/spec-format.md, "Trust"): specs are trusted input, and a
    `file:` path is read as written, absolute or through `..` (no confinement to the folder)."""
    from harness.spec import load_spec

    outside = tmp_path / "shared" / "prompts.txt"
    outside.parent.mkdir()
    outside.write_text("This movie was\n")
    specs = tmp_path / "specs"
    specs.mkdir()
    for name, where in (("absolute", outside), ("relative", "../shared/prompts.txt")):
        path = tiny_spec(specs, tiny_checkpoints["a"], LOGIT, name=name,
                         prompts=f'- {{file: "{where}", answer: " bad", foil: " good"}}\n')
        assert [p.text for p in load_spec(path).prompt_set(None)] == ["This movie was"]
    text = (Path(__file__).parent.parent / "docs" / "spec-format.md").read_text()
    assert "Specs are trusted input" in text


def test_hostile_fields_in_harness_diff(tmp_path, capsys):
    old = hostile_report(tmp_path)
    new = tmp_path / "new.json"
    new.write_text(old.read_text().replace('"failed"', '"passed"'))
    code, md = harness_main(capsys, "diff", old, new, "--markdown")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert code == 0 and len({unescaped_pipes(line) for line in table}) == 1, md
    assert len(table) == len(md.strip().splitlines())          # no row broken over lines
    assert "<img" not in md and "\x1b" not in md
    code, text = harness_main(capsys, "diff", old, new)
    assert code == 0 and "\x1b" not in text
