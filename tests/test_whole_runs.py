"""Issue 20, items 16-21: where a spec error is promised, a spec error comes (exit 2, file,
line and field, no traceback) and the other specs still run; names and report fields cannot
inject markup; frozen specs cannot inject keys."""

from __future__ import annotations

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
