"""The notebook API (`harness.check`) with models in memory, its views (pandas, HTML,
failures), and freezing a result into a spec that passes on the same models and fails on the
other toy model where the measurements differ."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import yaml

import harness
from harness.cli import main as harness_main
from harness.notebook import ClaimsFailed
from harness.session import Session
from harness.spec import load_spec

REPO = Path(__file__).parent.parent
TOY = REPO / "specs" / "toy_negative_reviews.yaml"


@pytest.fixture
def load_counter(monkeypatch):
    """Counts every model and tokenizer load of any session."""
    import harness.session as session_module

    counts = {"models": 0, "tokenizers": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(session_module, "load_model", counted("models", session_module.load_model))
    monkeypatch.setattr(session_module, "load_tokenizer",
                        counted("tokenizers", session_module.load_tokenizer))
    return counts


@pytest.fixture(scope="module")
def toy_bridges():
    session = Session(verbose=False)
    spec = load_spec(TOY)
    return {name: session.model(spec, name).bridge for name in ("source", "rlhf")}


NOTEBOOK_CLAIMS = [
    harness.claim("undecided", "logit_diff", {"between": [-1, 1]}, model="source"),
    harness.claim("prefers-bad", "logit_diff", {">": 10}, model="rlhf", prompts="family",
                  per_prompt="all"),
    harness.claim("two-heads-flip", "patch", {"flips_sign": True}, from_="rlhf", into="source",
                  site="z", heads=["L2H1", "L3H3"], prompts="source-leans-good"),
]


def test_in_memory_bridges_are_not_loaded_again(toy_bridges, load_counter):
    result = harness.check(TOY, models=toy_bridges, claims=NOTEBOOK_CLAIMS)
    assert load_counter == {"models": 0, "tokenizers": 0}
    assert [v.status for v in result.verdicts] == ["passed", "failed", "passed"]
    assert [v.claim_id for v in result.failed] == ["prefers-bad"]
    assert not result.ok
    with pytest.raises(ClaimsFailed, match="prefers-bad"):
        result.raise_for_failures()
    # the same claims without in-memory models load each model once
    harness.check(TOY, claims=NOTEBOOK_CLAIMS)
    assert load_counter["models"] == 2


def test_hf_model_and_tokenizer_pair(tiny_checkpoints, load_counter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = tiny_checkpoints["a"]
    pair = (AutoModelForCausalLM.from_pretrained(location), AutoTokenizer.from_pretrained(location))
    spec = {"models": {"tiny": {"path": str(location)}},
            "prompts": [{"text": "This movie was really", "answer": " bad", "foil": " good"}],
            "claims": [harness.claim("any", "logit_diff", {"<": 1000}, model="tiny")]}
    result = harness.check(spec, models={"tiny": pair})
    assert load_counter == {"models": 0, "tokenizers": 0}
    assert result.verdicts[0].status == "passed"
    # the same number as a model the harness loads itself
    loaded = harness.check(spec)
    assert math.isclose(result.claims[0]["measured"], loaded.claims[0]["measured"],
                        abs_tol=1e-4)


def test_unknown_model_name_is_a_clear_error(toy_bridges):
    with pytest.raises(harness.errors.HarnessError, match="no model 'rlfh'.*did you mean 'rlhf'"):
        harness.check(TOY, models={"rlfh": toy_bridges["rlhf"]}, claims=NOTEBOOK_CLAIMS)


def test_claims_built_in_python_are_validated():
    with pytest.raises(harness.errors.SpecError, match="site"):
        harness.claim("x", "patch", {"flips_sign": True}, from_="a", into="b", site="resid")


def test_yaml_string_spec(toy_bridges):
    text = TOY.read_text().split("claims:")[0] + "claims:\n" + yaml.safe_dump(
        NOTEBOOK_CLAIMS[:1])
    result = harness.check(text, models=toy_bridges)
    assert result.spec.file == "<string>" and result.ok


def test_to_pandas_matches_the_json_report(toy_bridges):
    result = harness.check(TOY, models=toy_bridges, claims=NOTEBOOK_CLAIMS)
    report = result.report["specs"][0]["claims"]
    frame = result.to_pandas()
    assert list(frame["claim"]) == [c["id"] for c in report]
    assert list(frame["status"]) == [c["status"] for c in report]
    for row, claim in zip(frame.itertuples(), report):
        assert row.value == pytest.approx(claim["measured"])
    per_prompt = result.to_pandas(per_prompt=True)
    family = per_prompt[per_prompt["claim"] == "prefers-bad"]
    assert len(family) == 9 and list(family["prompt"]) == report[1]["prompts"]
    assert list(family["value"]) == pytest.approx(report[1]["per_prompt"])
    assert family["value"].mean() == pytest.approx(report[1]["measured"])


def test_repr_html_has_the_summary_and_the_rows(toy_bridges):
    result = harness.check(TOY, models=toy_bridges, claims=NOTEBOOK_CLAIMS)
    page = result._repr_html_()
    assert "3 claims: 1 failed, 2 passed" in page
    assert "toy-negative-reviews::prefers-bad" in page       # failing claims listed first
    assert page.count("<tr class='claim'") == 3 and "status-filter" in page


def test_plotly_js_travels_once_per_kernel(toy_bridges, monkeypatch):
    """The first result shown carries plotly.js (offline, ~4.6 MB); later ones carry only
    their rows and figures, which draw with that copy. `init_notebook()` carries it instead."""
    from plotly.offline import get_plotlyjs

    import harness.notebook

    library = get_plotlyjs()
    figures = [*NOTEBOOK_CLAIMS, harness.claim("dla", "dla", {"sum": {">": -1e9}},
                                               model="source", by="layer")]
    result = harness.check(TOY, models=toy_bridges, claims=figures)
    monkeypatch.setattr(harness.notebook, "_plotly_shown", False)
    first, second = result._repr_html_(), result._repr_html_()
    assert first.count(library) == 1 and library not in second
    assert second.count("plotly-graph-div") == first.count("plotly-graph-div") == 1
    assert len(second) < 100_000 < len(library) < len(first)
    assert len(first) - len(second) < len(library) + 1000     # the library, and nothing else

    monkeypatch.setattr(harness.notebook, "_plotly_shown", False)
    init = harness.init_notebook()._repr_html_()
    assert init.count(library) == 1 and library not in result._repr_html_()

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert library in result._repr_html_()     # Colab: each output in its own frame


# ----------------------------------------------------------------------------- freeze

def swapped(spec_data: dict) -> dict:
    """The same spec with the source and RLHF models exchanged."""
    data = json.loads(json.dumps(spec_data))
    models = data["models"]
    models["source"], models["rlhf"] = models["rlhf"], models["source"]
    return data


def changed(a: dict, b: dict, tolerance: float) -> bool:
    """Whether two report entries of a claim differ: a number (the value; a patch's logit
    diffs) by more than the tolerance, a text or token list at all, a grid's values or the
    order of its three largest cells."""
    def flat(values):
        return [x for v in values for x in flat(v)] if isinstance(values, list) else [values]

    numbers = [k for k in ("raw", "from", "into") if k in a]
    if any(abs(a[k] - b[k]) > tolerance for k in numbers):
        return True
    ma, mb = a["measured"], b["measured"]
    if isinstance(ma, dict) and "values" in ma:
        va, vb = flat(ma["values"]), flat(mb["values"])
        order = [sorted(range(len(v)), key=lambda i, v=v: -v[i])[:3] for v in (va, vb)]
        return order[0] != order[1] or max(abs(x - y) for x, y in zip(va, vb)) > tolerance
    if isinstance(ma, float):
        return abs(ma - mb) > tolerance
    return ma != mb


QUICK = ["source-is-undecided", "rlhf-prefers-bad", "rlhf-prefers-bad-everywhere",
         "source-top-tokens-balanced", "source-greedy-is-a-review", "frozen-blocks-identical",
         "change-is-in-the-unfrozen-blocks", "resid-hot-spot", "no-single-head-carries-it",
         "two-heads-flip-the-sign", "ablating-the-heads-barely-matters"]


def test_freeze_round_trip_on_toy_claims(tmp_path):
    """A claim of every measure but sampling (the whole spec: the slow test below)."""
    claims = [c for c in yaml.safe_load(TOY.read_text())["claims"] if c["id"] in QUICK]
    round_trip(tmp_path, claims)


@pytest.mark.slow
def test_freeze_round_trip_on_the_whole_toy_spec(tmp_path):
    round_trip(tmp_path, None)


def round_trip(tmp_path, claims):
    """Freeze the toy claims; the frozen spec passes on the same models and fails on the
    exchanged models exactly where a frozen number moved."""
    tolerance = 0.05
    session = Session(verbose=False)
    found = harness.check(TOY, claims=claims, session=session)
    assert found.ok
    frozen_path = found.to_spec(tmp_path / "frozen.yaml", tolerance=tolerance)
    text = frozen_path.read_text()
    assert text.startswith("# Frozen from harness.check of") and "# measured" in text
    assert "flips_sign: true" in text and "argmax:" in text and "approx:" in text

    again = harness.check(frozen_path, session=session)
    assert [v.status for v in again.verdicts] == ["passed"] * len(found.verdicts), \
        again.raise_for_failures()

    frozen = yaml.safe_load(text)
    other = harness.check(swapped(frozen), session=session)
    statuses = {v.claim_id: v.status for v in other.verdicts}
    moved = {c["id"] for c, d in zip(found.claims, other.claims) if changed(c, d, tolerance)}
    failing = {cid for cid, status in statuses.items() if status != "passed"}
    assert failing <= moved            # nothing that stayed put fails
    from harness.freeze import frozen_expectation

    numbers_moved = {c["id"] for c, d in zip(found.claims, other.claims)
                     if isinstance(c["measured"], float)
                     and abs(c["measured"] - d["measured"]) > tolerance
                     and frozen_expectation(c, tolerance)[0] is not None}  # SAE claims: kept
    assert numbers_moved <= failing    # every frozen number that moved fails
    print(f"frozen {len(found.claims)} claims; on the exchanged models {len(failing)} fail: "
          f"{sorted(failing)}; {sorted(moved - failing)} moved but still hold")
    assert {"source-is-undecided", "rlhf-prefers-bad", "two-heads-flip-the-sign",
            "resid-hot-spot"} <= failing
    assert statuses["source-greedy-is-a-review"] == "passed"   # both models write it


def test_harness_freeze_cli(tmp_path, capsys):
    report = tmp_path / "r.json"
    spec = tmp_path / "spec.yaml"
    spec.write_text(TOY.read_text().split("claims:")[0] + "claims:\n" + yaml.safe_dump(
        NOTEBOOK_CLAIMS))
    assert harness_main(["run", str(spec), "-q", "--report-json", str(report)]) == 1
    out = tmp_path / "frozen" / "spec.yaml"
    assert harness_main(["freeze", str(report), "-o", str(out), "--tolerance", "0.01"]) == 0
    assert "atol: 0.01" in out.read_text()
    assert harness_main(["run", str(out), "-q"]) == 0
    assert "3 claims: 3 passed" in capsys.readouterr().out


def test_harness_freeze_of_a_missing_report_is_exit_2(tmp_path, capsys):
    assert harness_main(["freeze", str(tmp_path / "nope.json"), "-o",
                         str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read JSON report" in err and "nope.json" in err
