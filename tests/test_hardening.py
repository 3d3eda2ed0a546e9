"""Hostile and malformed inputs, each as a new user met it (issue 12): a clear SpecError naming
file, line and field before any weights load; nothing lost; nothing run unasked."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.spec import load_spec

GOOD = b"""\
models:
  source: {zoo: toy-reviews-source}
prompts:
  - text: "This movie was really"
    answer: " bad"
    foil: " good"
claims:
  - id: c
    measure: logit_diff
    model: source
    expect: {">": 0}
"""


def spec_error(tmp_path: Path, raw: bytes, name: str = "bad.yaml") -> SpecError:
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    return info.value


# ----------------------------------------------------------------------------- reading specs

def test_non_utf8_byte_is_a_spec_error(tmp_path):
    err = spec_error(tmp_path, GOOD.replace(b"really", b"r\xe9ally"))
    assert "not UTF-8" in str(err) and "0xe9" in str(err) and err.line == 4


def test_deep_nesting_is_a_spec_error(tmp_path):
    err = spec_error(tmp_path, GOOD + b"description: " + b"[" * 1000 + b"]" * 1000 + b"\n")
    assert "nests deeper than" in str(err)
    err = spec_error(tmp_path, GOOD + b"description:\n" + b"".join(
        b"  " * i + b"- \n" for i in range(200)))
    assert "nests deeper than" in str(err)


def test_alias_bomb_stops_quickly(tmp_path):
    rows = ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
    rows += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    start = time.perf_counter()
    err = spec_error(tmp_path, GOOD + "\n".join(rows).encode() + b"\n")
    assert "expands to more than" in str(err) and time.perf_counter() - start < 10


def test_self_referencing_alias(tmp_path):
    assert "nests deeper" in str(spec_error(tmp_path, GOOD + b"x: &a [*a]\n"))


def test_oversized_spec(tmp_path):
    err = spec_error(tmp_path, GOOD + b"# " + b"x" * 5_000_000 + b"\n")
    assert "larger than" in str(err) and "file:" in str(err)


def test_yaml_12_numbers(tmp_path):
    raw = GOOD.replace(b'{">": 0}', b'{between: [1e-3, 1.0e6]}') + \
        b"defaults: {tolerance: {atol: .5e-2}}\n"
    path = tmp_path / "numbers.yaml"
    path.write_bytes(raw)
    spec = load_spec(path)
    assert spec.claims[0].expect["between"] == [0.001, 1e6]
    assert spec.defaults.tolerance.atol == 0.005


def test_merge_keys_say_what_to_do(tmp_path):
    err = spec_error(tmp_path, GOOD + b"base: &b {x: 1}\nother:\n  <<: *b\n")
    assert "merge keys" in str(err) and err.line == 14


def test_nan_bound_is_rejected(tmp_path):
    err = spec_error(tmp_path, GOOD.replace(b'{">": 0}', b'{">": .nan}'))
    assert "claims[0].expect.>" in str(err) and ".nan" in str(err) and err.line == 11


def test_answer_equal_to_foil_is_rejected(tmp_path):
    err = spec_error(tmp_path, GOOD.replace(b'" good"', b'" bad"'))
    assert "prompts[0].foil" in str(err) and err.line == 6 and "always 0" in str(err)


def test_bad_template_conversion(tmp_path):
    raw = GOOD.replace(b'- text: "This movie was really"',
                       b'- template: "{a!z}"\n    values: {a: [x]}')
    assert "cannot be filled in" in str(spec_error(tmp_path, raw))


def test_top_level_key_named_like_a_measure(tmp_path):
    assert "unknown field 'logit_diff'" in str(spec_error(tmp_path, GOOD + b"logit_diff: 1\n"))


@pytest.mark.skipif(not __import__("yaml").__with_libyaml__, reason="needs libyaml")
def test_large_specs_parse_with_libyaml():
    """Specs are composed by libyaml's C parser where installed (the pure-Python loader took
    ~10 s per MB), and a ~0.3 MB spec parses whole. Speed itself is a benchmark's business:
    a timed assertion here failed under load."""
    import yaml

    from harness import yamlsource
    from harness.yamlsource import parse_yaml

    assert issubclass(yamlsource._Loader, yaml.CSafeLoader)
    row = b'  - {text: "This movie was really", answer: " bad", foil: " good"}\n'
    raw = GOOD.replace(b"claims:", b"".join([row] * 5_000) + b"claims:")
    assert len(parse_yaml(raw).data["prompts"]) == 5_001


# ----------------------------------------------------------------------------- static checks

def tiny_spec(directory: Path, model_dir: Path, claims: str, prompts: str | None = None,
              name: str = "spec", model_extra: str = "") -> Path:
    prompts = prompts or ('- text: "This movie was really"\n  answer: " bad"\n'
                          '  foil: " good"\n')
    path = directory / f"{name}.yaml"
    path.write_text(f'spec: {name}\nmodels:\n  a: {{path: "{model_dir}"{model_extra}}}\n'
                    "prompts:\n" + textwrap.indent(textwrap.dedent(prompts), "  ")
                    + "claims:\n" + textwrap.indent(textwrap.dedent(claims), "  "))
    return path


def validate(capsys, *args) -> tuple[int, str]:
    from harness.cli import main

    code = main(["validate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


PATCH = """\
- id: c
  measure: patch
  from: a
  into: a
  site: {site}
  {sel}
  metric: logit_diff
  expect: {{">": 0}}
"""
LONG = '- text: "' + "This movie was really bad. " * 20 + '"\n  answer: " bad"\n  foil: " good"\n'

STATIC_CASES = {   # id: (claims, prompts, message, line)
    "layer": (PATCH.format(site="resid_pre", sel="layers: [0, 5]"), None,
              "claims[0].layers[1]: layer 5 is out of range: model 'a' has 2 layers (0..1)", 14),
    "head": (PATCH.format(site="z", sel="heads: [L1H4]"), None,
             "claims[0].heads[0]: head 4 is out of range: model 'a' has 4 heads (0..3)", 14),
    "head-layer": (PATCH.format(site="z", sel="heads: [L2H0]"), None,
                   "claims[0].heads[0]: layer 2 is out of range", 14),
    "kv-head": (PATCH.format(site="v", sel="heads: [L0KV4]"), None,
                "claims[0].heads[0]: key/value head 4 is out of range: model 'a' has 4 key/value "
                "heads (0..3)", 14),
    "neuron": (PATCH.format(site="mlp_post", sel="layers: [0]\n  neurons: [3, 128]"), None,
               "claims[0].neurons[1]: neuron 128 is out of range: model 'a' has 128 neurons",
               15),
    "position": (PATCH.format(site="resid_pre", sel="layers: [0]\n  positions: [-9]"), None,
                 "claims[0].positions[0]: position -9 is outside the shortest prompt", 15),
    "top-k": ("- {id: c, measure: top_k, model: a, k: 100000, expect: {includes: [' bad']}}\n",
              None, "claims[0].k: k = 100000 is more than model 'a' has tokens", 9),
    "too-long": ("- {id: c, measure: logit_diff, model: a, expect: {'>': 0}}\n", LONG,
                 "claims[0]: the longest prompt is 122 tokens, more than model 'a' reads (64",
                 9),
    "generate-too-long": ("- {id: c, measure: generate, model: a, max_new_tokens: 60, "
                          "expect: {contains: x}}\n", None,
                          "claims[0].max_new_tokens: the longest prompt is 5 tokens + "
                          "max_new_tokens 60", 9),
    # cells of a grid or ranking expectation: a head the model lacks can never be the argmax
    "expect-argmax": ("- {id: c, measure: patch_sweep, from: a, into: a, site: z, "
                      "over: [layer, head], expect: {argmax: L0H4}}\n", None,
                      "claims[0].expect.argmax: head 4 is out of range: model 'a' has 4 heads",
                      9),
    "expect-top": ("- {id: c, measure: patch_sweep, from: a, into: a, site: z, "
                   "over: [layer, head], expect: {top: {k: 2, includes: [L1H0, L2H0]}}}\n",
                   None, "claims[0].expect.top.includes[1]: layer 2 is out of range", 9),
    "expect-edge": ("- {id: c, measure: edge_scores, model: a, method: eap, "
                    "expect: {top: {k: 1, equals: ['L0H0 -> L1H7:q']}}}\n",
                    '- {text: "This movie was really", corrupt: "This movie was very", '
                    'answer: " bad", foil: " good"}\n',
                    "claims[0].expect.top.equals[0]: head 7 is out of range", 7),
    "empty-prompt": ("- {id: c, measure: logit_diff, model: a, prepend_bos: false, "
                     "expect: {'>': 0}}\n",
                     '- {text: "", answer: " bad", foil: " good"}\n',
                     "claims[0]: prompt '' (prompts[0]) has no tokens", 7),
}


@pytest.mark.parametrize("case", STATIC_CASES)
def test_static_checks_before_weights(tmp_path, tiny_checkpoints, capsys, monkeypatch, case):
    """Found by `validate` from config.json and tokenizer.json, without loading weights."""
    import harness.models

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(harness.models, "load_hf_causal_lm", no_weights)
    claims, prompts, message, line = STATIC_CASES[case]
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], claims, prompts)
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:{line}: {message}" in out, out
    assert "Traceback" not in out


def broken_copy(tmp_path: Path, src: Path, name: str) -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_model_dirs(tmp_path, tiny_checkpoints, capsys):
    claim = "- {id: c, measure: logit_diff, model: a, expect: {'>': 0}}\n"
    path = tiny_spec(tmp_path, tmp_path / "nowhere", claim)
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:3: models.a.path: checkpoint directory" in out
    bad_config = broken_copy(tmp_path, tiny_checkpoints["a"], "bad_config")
    (bad_config / "config.json").write_text("{not json")
    code, out = validate(capsys, tiny_spec(tmp_path, bad_config, claim))
    assert code == 2 and "models.a: cannot read" in out and "config.json" in out
    torn = broken_copy(tmp_path, tiny_checkpoints["a"], "torn")
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, out = validate(capsys, tiny_spec(tmp_path, torn, claim))
    assert code == 2 and f"models.a: {weights} is truncated" in out


def test_truncated_weights_of_an_optional_model_skip(tmp_path, tiny_checkpoints, capsys):
    from harness.cli import main

    torn = broken_copy(tmp_path, tiny_checkpoints["a"], "torn")
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    path = tiny_spec(tmp_path, torn, "- {id: c, measure: logit_diff, model: a, "
                                     "expect: {'>': 0}}\n", model_extra=", optional: true")
    report = tmp_path / "r.json"
    assert main(["run", str(path), "-q", "--report-json", str(report)]) == 0
    claim = json.loads(report.read_text())["specs"][0]["claims"][0]
    assert claim["status"] == "skipped" and "model.safetensors" in claim["message"]


def test_torn_weights_at_load_time_name_the_file(tmp_path, tiny_checkpoints):
    """Past the static check (file torn after it), loading names the path, not a raw
    SafetensorError."""
    from harness.errors import ModelUnavailable
    from harness.models import load_hf_causal_lm
    from harness.spec import ModelSource

    torn = broken_copy(tmp_path, tiny_checkpoints["a"], "torn")
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelUnavailable, match="torn"):
        load_hf_causal_lm(str(torn), ModelSource(path=str(torn)))


def test_unknown_zoo_name(tmp_path, capsys):
    path = tmp_path / "zoo.yaml"
    path.write_bytes(GOOD.replace(b"toy-reviews-source", b"toy-review-source"))
    code, out = validate(capsys, path)
    assert code == 2 and f"{path}:2: models.source.zoo: unknown zoo model 'toy-review-source'" \
        in out and "did you mean 'toy-reviews-source'" in out


# ----------------------------------------------------------------------------- remote code

def test_remote_code_needs_the_users_flag(tmp_path, tiny_checkpoints, capsys, monkeypatch):
    import harness.models
    from harness.cli import main

    seen = []
    real = harness.models.AutoTokenizer

    class Spy:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return real.from_pretrained(*args, **kwargs)
    monkeypatch.setattr(harness.models, "AutoTokenizer", Spy)
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], "- {id: c, measure: logit_diff, "
                     "model: a, expect: {'<': 1000}}\n", model_extra=", trust_remote_code: true")
    code, out = validate(capsys, path)
    assert code == 2 and "models.a.trust_remote_code" in out and "--allow-remote-code" in out
    assert main(["run", str(path), "-q"]) == 2
    assert seen == []                                   # refused before any loading
    code, out = validate(capsys, path, "--allow-remote-code")
    assert code == 0 and seen == []     # validate loads no HF tokenizer: no torch, no model code
    assert main(["run", str(path), "-q", "--allow-remote-code"]) == 0
    assert seen[-1] is True


# ----------------------------------------------------------------------------- usage

def test_memory_budget_must_be_positive(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as info:
        main(["run", "specs", "--memory-budget-mb", "0"])
    assert info.value.code == 2 and "must be above 0" in capsys.readouterr().err


def test_escape_codes_are_shown_not_obeyed():
    from harness.claims import Verdict
    from harness.report import failure_details, table

    v = Verdict("s", "s.yaml", 3, "c", "generate", ("a",), "failed", {"contains": "x"},
                measured="\x1b[2J\x1b[31mred", message="worst prompt '\x1b[31m'")
    text = table([v]) + failure_details([v])
    assert "\x1b" not in text and "\\x1b[31mred" in text


# ----------------------------------------------------------------------------- nothing lost

def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def run_cli(*args) -> int:
    from harness.cli import main

    return main(["run", *map(str, args), "-q"])


LOGIT = "- {id: c, measure: logit_diff, model: a, expect: {'<': 1000}}\n"


@pytest.mark.parametrize("content", ['{"claims": null}', "{torn", "[1, 2]",
                                     '{"claims": {"c": 3}}', "\xff"])
def test_corrupt_baseline_is_named_and_repaired(tmp_path, tiny_checkpoints, capsys, content):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"],
                     LOGIT.replace("expect: {", "expect: {baseline: true, "))
    baseline = tmp_path / "spec.baseline.json"
    baseline.write_text(content, encoding="latin-1")
    report = tmp_path / "r.json"
    assert run_cli(path, "--report-json", report) == 1
    claim = strict_json(report)["specs"][0]["claims"][0]
    assert claim["status"] == "error" and str(baseline) in claim["message"]
    assert "--update-baselines" in claim["message"] and "Traceback" not in claim["message"]
    assert run_cli(path, "--update-baselines") == 0
    assert "kept it as" in capsys.readouterr().err
    assert (tmp_path / "spec.baseline.json.bak").read_bytes() == content.encode("latin-1")
    assert "c" in strict_json(baseline)["claims"]
    assert run_cli(path) == 0


def _update(spec_file: str, ids: list[str]) -> None:
    from harness.baselines import update_baseline
    from harness.claims import Verdict

    for claim_id in ids:
        update_baseline(spec_file, [Verdict("s", spec_file, 1, claim_id, "logit_diff", ("a",),
                                            "passed", {}, measured=1.0)], {})


def test_concurrent_baseline_updates_keep_every_entry(tmp_path):
    import multiprocessing

    spec_file = str(tmp_path / "spec.yaml")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_update, args=(spec_file, [f"w{w}-{i}" for i in range(15)]))
               for w in range(6)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    claims = strict_json(tmp_path / "spec.baseline.json")["claims"]
    assert len(claims) == 6 * 15
    assert not list(tmp_path.glob(".*.tmp"))


def test_killed_write_leaves_no_temp_file_behind(tmp_path):
    from harness.jsonfiles import write_atomic

    target = tmp_path / "report.json"
    stale = tmp_path / ".report.json.harness-abc12345.tmp"   # what a SIGKILL mid-write leaves
    stale.write_text("{half")
    write_atomic(target, "{}\n")
    assert target.read_text() == "{}\n" and not stale.exists()


@pytest.mark.parametrize("content", ["{torn", '{"c": 5}', '{"c": [{"values": 3}]}', "[]"])
def test_corrupt_counterexample_store_is_named_not_overwritten(tmp_path, content):
    from harness.jsonfiles import CorruptFile
    from harness.search import _read_store, _remember

    spec_file = str(tmp_path / "spec.yaml")
    store = tmp_path / "spec.counterexamples.json"
    store.write_text(content)
    with pytest.raises(CorruptFile, match=str(store)):
        _read_store(spec_file)
    with pytest.raises(CorruptFile):
        _remember(spec_file, "other", {"entry": 0, "values": {}, "swap": {}})
    assert store.read_text() == content


def test_counterexamples_of_other_claims_are_kept(tmp_path):
    from harness.search import _read_store, _remember

    spec_file = str(tmp_path / "spec.yaml")
    _remember(spec_file, "a", {"entry": 0, "values": {}, "swap": {}})
    _remember(spec_file, "b", {"entry": 1, "values": {}, "swap": {}})
    assert set(_read_store(spec_file)) == {"a", "b"}


# ----------------------------------------------------------------------------- no NaN

def test_nan_measurement_is_an_error_and_reports_stay_json(tmp_path, tiny_checkpoints):
    """Patching a run into itself: the normalized effect is 0/0."""
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], PATCH.format(
        site="resid_pre", sel="layers: [0]").replace("metric: logit_diff", "metric: normalized")
        + LOGIT.replace("id: c", "id: d"))
    report, md = tmp_path / "r.json", tmp_path / "r.md"
    assert run_cli(path, "--report-json", report, "--report-md", md, "--report-html",
                   tmp_path / "html", "--update-baselines") == 1
    claims = {c["id"]: c for c in strict_json(report)["specs"][0]["claims"]}
    assert claims["c"]["status"] == "error" and "not a finite number" in claims["c"]["message"]
    assert claims["d"]["status"] == "passed"
    baseline = strict_json(tmp_path / "spec.baseline.json")["claims"]
    assert set(baseline) == {"d"}
    assert (tmp_path / "html" / "report.html").stat().st_size > 0


# ----------------------------------------------------------------------------- a directory

GOOD_CLAIMS = """\
- {id: g1, measure: logit_diff, model: a, expect: {'<': 1000}}
- {id: g2, measure: logit_diff, model: a, per_prompt: all, expect: {'>': -1000}}
- {id: g3, measure: generate, model: a, max_new_tokens: 2, expect: {contains: This}}
"""


def broken_specs(directory: Path, model_dir: Path) -> dict[str, str]:
    """One broken spec of each kind beside nothing else; name -> words its error must hold."""
    def spec(name, claims=LOGIT, prompts=None, model=model_dir, extra=""):
        return tiny_spec(directory, model, claims, prompts, name=name, model_extra=extra)

    rows = ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
    rows += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    torn = broken_copy(directory.parent, model_dir, "torn")
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:999])
    expected = {
        "not_utf8": "not UTF-8", "deep": "nests deeper", "bomb": "expands to more than",
        "same_tokens": "answer and foil are both", "layer": "layer 9 is out of range",
        "zoo": "did you mean 'toy-reviews-source'", "no_dir": "does not exist",
        "torn": "is truncated", "remote": "--allow-remote-code", "long": "longest prompt",
        "empty": "has no tokens", "top_k": "more than model 'a' has tokens",
        "nan": "`.nan`", "merge": "merge keys", "yaml": "invalid YAML",
        "multi_token": "tokens for model 'a'",
    }
    spec("not_utf8").write_bytes(spec("x").read_bytes().replace(b"really", b"r\xe9ally"))
    spec("deep").write_text(spec("x").read_text() + "description: " + "[" * 1000 + "]" * 1000)
    spec("bomb").write_text(spec("x").read_text() + "\n".join(rows) + "\n")
    spec("same_tokens", prompts='- {text: "This movie was", answer: " bad", foil: " bad"}\n')
    spec("layer", PATCH.format(site="resid_pre", sel="layers: [9]"))
    (directory / "zoo.yaml").write_bytes(GOOD.replace(b"toy-reviews-source",
                                                      b"toy-review-source"))
    spec("no_dir", model=directory / "nowhere")
    spec("torn", model=torn)
    spec("remote", extra=", trust_remote_code: true")
    spec("long", prompts=LONG)
    spec("empty", LOGIT.replace("model: a,", "model: a, prepend_bos: false,"),
         prompts='- {text: "", answer: " bad", foil: " good"}\n')
    spec("top_k", "- {id: c, measure: top_k, model: a, k: 99999, expect: {includes: [' bad']}}\n")
    spec("nan", LOGIT.replace("'<': 1000", "'<': .nan"))
    spec("merge").write_text(spec("x").read_text() + "b: &b {x: 1}\no:\n  <<: *b\n")
    spec("yaml").write_text("models: {a: 1\nclaims: [")
    spec("multi_token", prompts='- {text: "x", answer: " badly awful", foil: " good"}\n')
    (directory / "x.yaml").unlink()
    return expected


def test_directory_of_broken_specs_beside_a_good_one(tmp_path, tiny_checkpoints, capsys):
    specs = tmp_path / "specs"
    specs.mkdir()
    expected = broken_specs(specs, tiny_checkpoints["a"])
    tiny_spec(specs, tiny_checkpoints["a"], GOOD_CLAIMS, name="a_good")
    report = tmp_path / "report.json"
    assert run_cli(specs, "--report-json", report) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, words in expected.items():
        line = next((x for x in err.splitlines() if f"/{name}.yaml" in x), "")
        assert words in line, (name, line)
    data = strict_json(report)
    good = [c for s in data["specs"] for c in s["claims"] if s["spec"] == "a_good"]
    assert [c["status"] for c in good] == ["passed"] * 3


def test_directory_under_pytest(pytester, tiny_checkpoints):
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    specs = pytester.mkdir("specs")
    pytester.mkdir("checks")
    expected = broken_specs(specs, tiny_checkpoints["a"])
    tiny_spec(specs, tiny_checkpoints["a"], GOOD_CLAIMS, name="a_good")
    result = pytester.runpytest("checks", "-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=len(expected))
    assert result.ret == 2
    out = result.stdout.str()
    for name, words in expected.items():
        assert any(f"/{name}.yaml" in x and words in x for x in out.splitlines()), name


# ----------------------------------------------------------------------------- interrupts

def test_ctrl_c_exits_130_and_keeps_the_previous_report(tmp_path, tiny_checkpoints):
    import os
    import signal
    import subprocess
    import sys

    claims = "".join(f"- {{id: g{i}, measure: generate, model: a, max_new_tokens: 40, "
                     f"seed: {i}, temperature: 1.0, expect: {{contains: This}}}}\n"
                     for i in range(400))
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], claims)
    report = tmp_path / "report.json"
    report.write_text('{"previous": true}\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path),
                             "--report-json", str(report), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:   # wait until claims are being measured
        if "loading model" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: " in err and "claims finished" in err and "Traceback" not in err
    assert report.read_text() == '{"previous": true}\n'
    assert not list(tmp_path.glob(".*.tmp"))


def test_empty_rows_never_read_padding():
    """The measuring side refuses too (static checks cannot see uncached hub tokenizers)."""
    from harness.errors import MeasureError
    from harness.prompts import right_pad

    with pytest.raises(MeasureError, match="no tokens"):
        right_pad([[5, 6, 7], []], 0)


def test_interrupted_pytest_session_writes_no_report(pytester, tiny_checkpoints):
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    specs = pytester.mkdir("specs")
    pytester.mkdir("checks")
    tiny_spec(specs, tiny_checkpoints["a"], GOOD_CLAIMS, name="a_good")
    pytester.makepyfile(interrupter="def pytest_runtest_teardown(item):\n"
                                    "    if item.name == 'g2':\n"
                                    "        raise KeyboardInterrupt\n")
    pytester.syspathinsert()
    report = pytester.path / "report.json"
    report.write_text('{"previous": true}\n')
    with pytest.raises(KeyboardInterrupt):   # pytester passes the interrupt on
        pytester.runpytest("checks", "-p", "no:randomly", "-p", "interrupter",
                           f"--harness-report-json={report}")
    assert report.read_text() == '{"previous": true}\n'


def test_interrupt_caught_inside_exec_still_exits_130(tmp_path):
    """CPython marks a KeyboardInterrupt that crosses `exec` (dataclasses build methods so,
    during imports of transformers or torch) as unhandled even when caught, and then kills
    itself with SIGINT at exit; the command must exit 130 all the same."""
    import subprocess
    import sys

    (tmp_path / "interrupting.py").write_text(
        "import sys\n"
        "from harness import cli, runner\n"
        "def interrupted(*args, **kwargs):\n"
        "    exec('raise KeyboardInterrupt')\n"
        "runner.run_spec_file = interrupted\n"
        f"sys.exit(cli.main(['run', {str(tmp_path / 'spec.yaml')!r}, '--device', 'cpu']))\n")
    (tmp_path / "spec.yaml").write_text("models: {}\nclaims: []\n")
    # as `python -m harness.cli` runs: only a main module run by -m dies of the mark
    proc = subprocess.run([sys.executable, "-m", "interrupting"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ,
                                             "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted: " in proc.stderr and "Traceback" not in proc.stderr
