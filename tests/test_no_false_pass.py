"""No false pass (issue 20, items 1-7): a claim that does not hold never passes, and a run that
did not check everything never looks like one that did, in every front end."""

from __future__ import annotations

import json
import math

import pytest
from _review_prompts import PROMPTS
from _tiny_models import TEST_DEVICE

from harness.errors import SpecError
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec


def write(tmp_path, checkpoints, claims: str, name: str = "nofalse", extra: str = ""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f'models:\n  a: {{path: "{checkpoints["a"]}"}}\n'
                    f'  b: {{path: "{checkpoints["b"]}"}}\n{extra}prompts:\n{PROMPTS}'
                    f"claims:\n{claims}")
    return path


def evaluate(path) -> dict:
    result = run_spec_file(path, Session(verbose=False, device=TEST_DEVICE))
    assert result.error is None, result.error
    return {v.claim_id: v for v in result.verdicts}


# ----------------------------------------------------------------------------- 1. per_prompt

def test_ablate_per_prompt_judges_each_prompts_normalized_effect(tmp_path, tiny_checkpoints):
    """Per prompt, an ablation is judged on its normalized effect, (ablated - clean) over the
    claim's scale (0 - mean clean), whose mean is the claim's value - not on the raw ablated
    logit difference. Zeroing the residual stream makes every raw value 0 and the mean effect
    1: `< 0.5` is false on the mean, and was passed per prompt, judged on the raw 0s."""
    claims = """\
  - {id: clean, measure: logit_diff, model: a, expect: {">": -1000}}
  - {id: wiped-false-all, measure: ablate, model: a, site: resid_pre, layers: [0],
     per_prompt: all, expect: {"<": 0.5}}
  - {id: wiped-false-mean, measure: ablate, model: a, site: resid_pre, layers: [0],
     expect: {"<": 0.5}}
  - {id: mlp, measure: ablate, model: a, site: mlp_out, layers: [1], per_prompt: all,
     expect: {">": -1000}}
"""
    verdicts = evaluate(write(tmp_path, tiny_checkpoints, claims))
    for false in ("wiped-false-all", "wiped-false-mean"):
        assert verdicts[false].status == "failed", (false, verdicts[false].message)
    assert verdicts["wiped-false-all"].extras["per_prompt_raw"] == pytest.approx([0.0] * 3)
    clean, mlp = verdicts["clean"].extras["per_prompt"], verdicts["mlp"]
    scale = 0 - sum(clean) / len(clean)
    normalized = [(r - c) / scale for r, c in zip(mlp.extras["per_prompt_raw"], clean)]
    assert mlp.extras["per_prompt"] == pytest.approx(normalized, abs=1e-4)
    assert sum(normalized) / len(normalized) == pytest.approx(mlp.measured, abs=1e-5)


def test_patch_per_prompt_is_judged_per_prompt(tmp_path, tiny_checkpoints):
    """`patch` with `per_prompt: all` fails when one prompt is below the bound, even though the
    mean is above it (it used to judge the mean only)."""
    probe = """\
  - {id: probe, measure: patch, from: {model: a, input: clean}, into: {model: a,
     input: corrupt}, site: resid_pre, layers: [1], metric: logit_diff, expect: {">": -1000}}
"""
    values = evaluate(write(tmp_path, tiny_checkpoints, probe))["probe"].extras["per_prompt"]
    mean = sum(values) / len(values)
    assert min(values) < mean - 1e-3
    bound = (min(values) + mean) / 2
    verdicts = evaluate(write(tmp_path, tiny_checkpoints, f"""\
  - {{id: every-prompt, measure: patch, from: {{model: a, input: clean}}, into: {{model: a,
     input: corrupt}}, site: resid_pre, layers: [1], metric: logit_diff, per_prompt: all,
     expect: {{">": {bound}}}}}
  - {{id: on-the-mean, measure: patch, from: {{model: a, input: clean}}, into: {{model: a,
     input: corrupt}}, site: resid_pre, layers: [1], metric: logit_diff,
     expect: {{">": {bound}}}}}
"""))
    assert verdicts["on-the-mean"].status == "passed"
    assert verdicts["every-prompt"].status == "failed"
    assert "held for" in verdicts["every-prompt"].message


@pytest.mark.parametrize("claim, kind", [
    ("{id: c, measure: dla, model: a, per_prompt: all, expect: {max: {'>': 0}}}", "grid"),
    ("{id: c, measure: patch_sweep, from: b, into: a, site: resid_pre, over: [layer],"
     " per_prompt: any, expect: {max: {'>': 0}}}", "grid"),
    ("{id: c, measure: generate, model: a, temperature: 1, samples: 2, per_prompt: any,"
     " expect: {rate: {contains: x, '>=': 0.5}}}", "samples"),
])
def test_per_prompt_is_a_spec_error_where_a_claim_has_one_value(tmp_path, tiny_checkpoints,
                                                                 claim, kind):
    path = write(tmp_path, tiny_checkpoints, f"  - {claim}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert "claims[0].per_prompt" in text and kind in text and str(path) in text


def test_text_measures_judge_every_prompt_even_with_per_prompt_mean(tmp_path,
                                                                    tiny_checkpoints):
    """`per_prompt: mean` on top tokens used to judge the first prompt only."""
    probe = "  - {id: probe, measure: top_k, model: a, k: 1, expect: {includes: [x]}}\n"
    tops = evaluate(write(tmp_path, tiny_checkpoints, probe))["probe"].measured
    assert tops[0] != tops[1] or tops[0] != tops[2]   # the prompts' top tokens differ
    first = json.dumps(tops[0])
    verdicts = evaluate(write(tmp_path, tiny_checkpoints, f"""\
  - {{id: first-only, measure: top_k, model: a, k: 1, per_prompt: mean,
     expect: {{equals: {first}}}}}
"""))
    assert verdicts["first-only"].status == "failed"


# ----------------------------------------------------------------------------- 4. NaN

@pytest.mark.parametrize("operator, arg", [
    ("approx", [0.0, 0.0]), (">", -1.0), ("<", 1.0), ("between", [-1, 1])])
def test_no_operator_passes_on_a_non_finite_number(operator, arg):
    import torch

    from harness.expect import GRID, SCALAR, Measurement
    from harness.expect import evaluate as apply
    from harness.measure.results import Grid

    for bad in (math.nan, math.inf, -math.inf):
        if operator == "approx":
            for values in (torch.tensor([bad, 0.0]), torch.tensor([0.0, bad])):
                grid = Grid(("component",), (("a", "b"),), values)
                outcome, = apply({"approx": arg, "atol": 1.0}, Measurement(GRID, grid), {})
                assert not outcome.ok
        else:
            outcome, = apply({operator: arg}, Measurement(SCALAR, bad), {})
            assert not outcome.ok, (operator, bad)


def test_baseline_with_a_nan_never_within_tolerance():
    from harness.expect import OPERATORS

    check = OPERATORS["baseline"].check
    assert not check([math.nan, 0.0], True, {"stored": [0.0, 0.0], "atol": 1}).ok
    assert not check([0.0, math.nan], True, {"stored": [0.0, 0.0], "atol": 1}).ok


# ----------------------------------------------------------------------------- 6. tolerance only

def test_a_tolerance_without_an_operator_is_a_spec_error(tmp_path, tiny_checkpoints):
    path = write(tmp_path, tiny_checkpoints,
                 "  - {id: c, measure: logit_diff, model: a, expect: {atol: 0.1}}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "claims[0].expect" in str(err.value) and "only a tolerance" in str(err.value)


def test_a_tolerance_for_the_baseline_is_fine(tmp_path, tiny_checkpoints):
    path = write(tmp_path, tiny_checkpoints,
                 "  - {id: c, measure: logit_diff, model: a, expect: {atol: 0.1}}\n",
                 extra="defaults: {baseline: true}\n")
    assert load_spec(path).claims[0].expect == {"atol": 0.1}
    path = write(tmp_path, tiny_checkpoints, "  - {id: c, measure: logit_diff, model: a, "
                                             "expect: {baseline: true, atol: 0.1}}\n")
    assert load_spec(path).claims[0].expect == {"baseline": True, "atol": 0.1}


# ----------------------------------------------------------------------------- 2. merge

def _report(claims: list[dict], **top) -> dict:
    return {"harness_version": "x", "environment": {}, **top,
            "specs": [{"spec": "s", "file": "s.yaml", "claims": claims}]}


def _claim(claim_id: str, status: str = "passed", measured=1.0, line: int = 3) -> dict:
    return {"id": claim_id, "status": status, "measure": "logit_diff", "measured": measured,
            "expected": {">": 0}, "message": "", "seconds": 0.1, "line": line}


def test_merge_of_limited_parts_stays_limited(tmp_path, capsys):
    from harness.cli import main as harness_main

    parts = [_report([_claim("a")], limit=2), _report([_claim("b", line=4)])]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    merged = tmp_path / "merged.json"
    assert harness_main(["merge", *map(str, paths), "--report-json", str(merged)]) == 3
    assert "LIMITED to the first 2 prompts" in capsys.readouterr().out
    assert json.loads(merged.read_text())["limit"] == 2


def test_merge_of_a_claim_judged_twice_differently_is_an_error(tmp_path, capsys):
    from harness.cli import main as harness_main

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(_report([_claim("a")])))
    second.write_text(json.dumps(_report([_claim("a", "failed", -1.0)])))
    for order in ((first, second), (second, first)):
        assert harness_main(["merge", *map(str, order)]) == 2
        err = capsys.readouterr().err
        assert "s.yaml::a" in err and "different verdicts" in err
    assert harness_main(["merge", str(first), str(first)]) == 0   # the same verdict twice


def test_cli_limited_shards_merge_to_exit_3(tmp_path, tiny_checkpoints, capsys):
    from harness.cli import main as harness_main

    path = write(tmp_path, tiny_checkpoints, """\
  - {id: on-a, measure: logit_diff, model: a, expect: {">": -1000}}
  - {id: on-b, measure: logit_diff, model: b, expect: {">": -1000}}
""")
    parts = []
    for k in (1, 2):
        parts.append(tmp_path / f"part{k}.json")
        assert harness_main(["run", str(path), "-q", "--limit", "1", "--shard", f"{k}/2",
                             "--report-json", str(parts[-1])]) == 3
    assert harness_main(["merge", *map(str, parts)]) == 3
    assert "LIMITED" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 3. pytest reports

def test_pytest_reports_hold_spec_errors_and_merge_fails(pytester, tiny_checkpoints):
    from harness.cli import main as harness_main

    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    pytester.mkdir("checks")
    specs = pytester.mkdir("specs")
    write(specs, tiny_checkpoints, "  - {id: ok, measure: logit_diff, model: a, "
                                   "expect: {'>': -1000}}\n", name="good")
    write(specs, tiny_checkpoints, "  - {id: typo, measure: logit_diff, model: a, "
                                   "expect: {'>': 0}, per_promt: all}\n", name="broken")
    out = pytester.path / "part.json"
    md = pytester.path / "part.md"
    result = pytester.runpytest("checks", f"--harness-report-json={out}",
                                f"--harness-report-md={md}")
    assert result.ret == 2
    data = json.loads(out.read_text())
    errors = [s for s in data["specs"] if s.get("error")]
    assert len(errors) == 1 and errors[0]["file"].endswith("broken.yaml")
    assert "per_promt" in errors[0]["error"]
    assert "1 spec error" in md.read_text()
    assert harness_main(["merge", str(out)]) == 2
    # only the broken spec: the report is still written
    (specs / "good.yaml").unlink()
    out.unlink()
    result = pytester.runpytest("checks", f"--harness-report-json={out}")
    assert result.ret == 2 and harness_main(["merge", str(out)]) == 2


# ----------------------------------------------------------------------------- 4. NaN SAE

def test_an_sae_with_a_nan_decoder_fails_its_gate(tmp_path, tiny_checkpoints):
    """Every comparison with NaN is false, so `variance < minimum` let a NaN SAE through and
    its top_features claim (NaN scores: no feature 'fires') passed."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "nan-sae"
    folder.mkdir()
    n, m = 32, 8
    torch.manual_seed(0)
    save_file({"W_enc": torch.randn(n, m), "b_enc": torch.zeros(m),
               "W_dec": torch.full((m, n), math.nan), "b_dec": torch.zeros(n)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": n, "d_sae": m, "hook_name": "blocks.1.hook_resid_pre"}))
    saes = (f'saes:\n  nan: {{path: "{folder}", gate: {{min_variance_explained: -100.0, '
            "max_loss_increase: 100.0}}\n")
    verdicts = evaluate(write(tmp_path, tiny_checkpoints, """\
  - {id: top, measure: top_features, model: a, sae: nan, k: 3, expect: {excludes: [0]}}
  - {id: one, measure: feature, model: a, sae: nan, feature: 0, expect: {">": -1000}}
""", extra=saes))
    for claim_id in ("top", "one"):
        assert verdicts[claim_id].status == "error", verdicts[claim_id].message
        assert "reconstruction gate" in verdicts[claim_id].message


def test_nan_feature_scores_are_an_error_not_silence():
    import torch

    from harness.claims import _ranked
    from harness.errors import MeasureError

    with pytest.raises(MeasureError, match="not finite"):
        _ranked(torch.tensor([math.nan, 1.0, 0.5]), 2, {})


# ----------------------------------------------------------------------------- 5. config vs weights

@pytest.fixture
def reconfigured(tmp_path, tiny_checkpoints):
    """Copies of the 2-layer model `a` whose config.json says 3 layers, or 1."""
    import shutil

    out = {}
    for name, n_layer in (("more", 3), ("fewer", 1)):
        folder = tmp_path / name
        shutil.copytree(tiny_checkpoints["a"], folder)
        config = json.loads((folder / "config.json").read_text())
        config["n_layer"] = n_layer
        (folder / "config.json").write_text(json.dumps(config))
        out[name] = folder
    return out


@pytest.mark.parametrize("name, says", [("more", "no weights for layer 2 (e.g. no tensor "
                                                  "transformer.h.2."),
                                        ("fewer", "weights of layer 1 that the config does "
                                                  "not have (e.g. transformer.h.1.")])
def test_static_checks_compare_the_config_with_the_weights(tmp_path, reconfigured, name, says):
    from harness.cli import main as harness_main
    from harness.validate import validate_spec

    path = tmp_path / f"{name}.yaml"
    path.write_text(f'models:\n  a: {{path: "{reconfigured[name]}"}}\nprompts:\n{PROMPTS}'
                    "claims:\n  - {id: c, measure: logit_diff, model: a, expect: {'>': -1000}}\n")
    with pytest.raises(SpecError) as err:
        validate_spec(path)
    assert says in str(err.value) and "config.json says" in str(err.value)
    assert f"{path}:2: models.a" in str(err.value)
    assert harness_main(["run", str(path), "-q"]) == 2


@pytest.mark.parametrize("name, says", [("more", "missing tensors (transformer.h.2."),
                                        ("fewer", "unexpected tensors (transformer.h.1.")])
def test_loading_a_model_whose_config_disagrees_with_its_weights_is_an_error(reconfigured,
                                                                            name, says):
    from harness.errors import ModelUnavailable
    from harness.models import load_hf_causal_lm
    from harness.spec import ModelSource

    folder = reconfigured[name]
    with pytest.raises(ModelUnavailable) as err:
        load_hf_causal_lm(str(folder), ModelSource(path=str(folder)))
    assert says in str(err.value) and "config.json" in str(err.value)


# ----------------------------------------------------------------------------- 7. stale stores

def test_a_stored_counterexample_outside_the_family_is_not_used(tmp_path, tiny_checkpoints):
    """A counterexample stored for a template value that the spec no longer lists is not a
    prompt of the claim's family: it must not fail the claim."""
    from harness.testing import write_spec

    nouns = ["acting", "plot", "movie", "story", "film", "ending", "music", "cast"]
    prompts = """\
        - template: "The {noun} was"
          values: {noun: [%s]}
          answer: " bad"
          foil: " good"
        """
    probe = write_spec(tmp_path, tiny_checkpoints["a"], prompts % ", ".join(nouns),
                       "- {id: probe, measure: logit_diff, model: a, per_prompt: all, "
                       "expect: {'>': -100}}\n", name="probe")
    values = dict(zip(nouns, evaluate(probe)["probe"].extras["per_prompt"]))
    worst = max(values, key=values.get)
    ranked = sorted(values.values())
    claim = f"""\
        - id: below
          measure: logit_diff
          model: a
          expect: {{"<": {(ranked[-1] + ranked[-2]) / 2}}}
          search: {{max_examples: 20}}
        """
    spec = write_spec(tmp_path, tiny_checkpoints["a"], prompts % ", ".join(nouns), claim,
                      name="searched")
    verdict = evaluate(spec)["below"]
    assert verdict.status == "failed" and verdict.extras["search"]["found"] == f"The {worst} was"
    kept = [n for n in nouns if n != worst]
    write_spec(tmp_path, tiny_checkpoints["a"], prompts % ", ".join(kept), claim,
               name="searched")
    verdict = evaluate(spec)["below"]
    assert verdict.status == "passed", verdict.message
    assert verdict.extras["search"]["ignored_stored"] == 1
    assert "1 stored counterexample ignored" in verdict.message
    assert json.loads((tmp_path / "searched.counterexamples.json").read_text())["below"]


def test_a_stored_substitution_no_longer_listed_is_not_used():
    from harness.search import _still_fits
    from harness.spec import PromptEntry

    entries = (PromptEntry(template="The {noun} was", values={"noun": ["plot"]}),)
    stored = {"entry": 0, "values": {"noun": "plot"}, "swap": {"was": "is"}}
    assert _still_fits(entries, {"was": ["is"]}, stored)
    assert not _still_fits(entries, {"was": ["seems"]}, stored)
    assert not _still_fits(entries, {}, stored)
    assert not _still_fits(entries, {"was": ["is"]}, dict(stored, values={"noun": "cast"}))
    assert not _still_fits(entries, {"was": ["is"]}, dict(stored, entry=1))
