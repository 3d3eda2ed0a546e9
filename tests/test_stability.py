"""Stability: a seeded bootstrap over prompts says how often a claim's expectation holds, from
the per-prompt values its measurement kept (no forward pass per resample), and `confidence:`
fails a claim that holds in fewer resamples than that. Ground truth: planted heads are
stable; two cells whose lead changes with the prompts drawn are not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _induction_model import build_induction_model

from harness import report as R
from harness.claims import MEASURES, ClaimContext
from harness.errors import SpecError
from harness.expect import GRID, SCALAR, Measurement
from harness.freeze import frozen_spec_text
from harness.measure.results import Grid, PromptParts, normalized_from_means
from harness.report_html import html_report
from harness.runner import run_spec_file
from harness.session import Session
from harness.show import claim_text
from harness.spec import load_spec_text
from harness.stability import gate, resample_means, stability

REPO = Path(__file__).parents[1]


def words(text: str) -> str:
    return "".join(" " + w for w in text.split())


# Planted induction model (tests/_induction_model.py): L0H0 attends to the previous token,
# L1H0 to the token after the final token's earlier occurrence. Attention to " red" is L0H0's
# on a prompt whose second-to-last token is red (A), L1H0's on a prompt whose final token
# came before, followed by red (B): which head leads the mean depends on the prompts drawn.
A = ["white pink red gray", "brown tan red gold", "teal navy red blue", "green white red pink"]
B = ["black red blue green black", "pink red gray blue pink", "gray red white pink gray",
     "gold red brown tan gold", "navy red teal white navy", "tan red gold brown tan"]


def _rows(texts) -> str:
    return "\n".join(f'    - {{text: "{words(t)}", answer: " red", foil: " blue"}}'
                     for t in texts)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    model = build_induction_model(root / "model")
    # "a b c d b": the final b came before, followed by c (the answer); the corrupt text has
    # no earlier b, so the induction head falls back to the first word (the foil)
    pairs = "\n".join(
        f'  - {{text: "{words(f"{a} {b} {c} {d} {b}")}", corrupt: "{words(f"{a} {e} {c} {d} {b}")}"'
        f', answer: " {c}", foil: " {a}"}}' for a, b, c, d, e in (
            "red blue green black white".split(), "pink gray tan gold navy".split(),
            "teal brown white black red".split()))
    path = root / "planted.yaml"
    path.write_text(f"""spec: planted
models:
  m: {{path: "{model}"}}
prompts:
{pairs}
prompt_sets:
  tie:
{_rows(A + B)}
  clear:
{_rows(A)}
claims:
  - {{id: tie, measure: attention, model: m, prompts: tie, source: {{token: " red"}},
     expect: {{argmax: L0H0}}}}
  - {{id: tie-confident, measure: attention, model: m, prompts: tie, source: {{token: " red"}},
     confidence: 0.9, expect: {{argmax: L0H0}}}}
  - {{id: clear-confident, measure: attention, model: m, prompts: clear,
     source: {{token: " red"}}, confidence: 0.9, expect: {{argmax: L0H0}}}}
  - {{id: previous-token-head, measure: head_scores, model: m, role: previous_token,
     random_tokens: {{length: 6, count: 8, seed: 0, vocab: prompts}}, confidence: 0.99,
     expect: {{argmax: L0H0}}}}
  - {{id: induction-head, measure: head_scores, model: m, role: induction,
     random_tokens: {{length: 6, count: 8, seed: 0, vocab: prompts}}, confidence: 0.99,
     expect: {{argmax: L1H0}}}}
  - {{id: where-the-copy-lives, measure: path_patch, from: {{model: m}},
     into: {{model: m, input: corrupt}}, path: resid, confidence: 0.99,
     expect: {{argmax: L1H0}}}}
  - {{id: copies, measure: logit_diff, model: m, confidence: 0.95, expect: {{">": 0}}}}
""")
    result = run_spec_file(path, Session(verbose=False, device="cpu"))
    assert result.error is None, result.error
    return path, {v.claim_id: v for v in result.verdicts}, R.json_report([result])


def test_planted_heads_are_stable(planted):
    _, verdicts, _ = planted
    for claim in ("previous-token-head", "induction-head", "where-the-copy-lives",
                  "clear-confident"):
        v = verdicts[claim]
        assert v.status == "passed", (claim, v.message)
        assert v.extras["trust"]["stability"] == 1.0, claim
        assert v.extras["trust"]["confidence"] == pytest.approx(0.99 if claim != "clear-confident"
                                                                else 0.9)


def test_a_near_tie_is_unstable_and_fails_under_confidence(planted):
    _, verdicts, _ = planted
    tie, gated = verdicts["tie"], verdicts["tie-confident"]
    assert tie.status == "passed", tie.message       # the mean's argmax is L0H0 ...
    share = tie.extras["trust"]["stability"]
    assert 0.2 < share < 0.9                          # ... on only some resamples
    assert gated.status == "failed"
    assert gated.extras["trust"]["stability"] == share
    assert f"holds in {share:.0%} of 200 bootstrap resamples" in gated.message
    assert "fewer than confidence 0.9" in gated.message


def test_confidence_on_a_number_gates_its_interval(planted):
    v = planted[1]["copies"]
    assert v.status == "passed", v.message
    assert v.extras["stats"]["ci"] == 0.95 and "95% interval" in v.message
    assert v.extras["trust"]["stability"] == 1.0 and len(v.extras["trust"]["bootstrap"]) == 200


def test_the_parts_rebuild_every_measured_grid(planted):
    """With every prompt once, the parts a measurement kept give back its value: what each
    resample recomputes is the measured quantity, not another one."""
    path, _, _ = planted
    session = Session(verbose=False, device="cpu")
    extra = load_spec_text(path.read_text().split("claims:")[0] + """claims:
  - {id: normalized, measure: patch_sweep, from: {model: m}, into: {model: m, input: corrupt},
     site: resid_pre, over: [layer, pos], expect: {max: {">": 0}}}
  - {id: raw, measure: patch_sweep, from: {model: m}, into: {model: m, input: corrupt},
     site: z, over: [layer, head], metric: logit_diff, expect: {max: {">": 0}}}
  - {id: loss, measure: patch_sweep, from: {model: m}, into: {model: m, input: corrupt},
     site: z, over: [layer, head], metric: loss, expect: {max: {">": 0}}}
  - {id: attention, measure: attention, model: m, source: previous, expect: {max: {">": 0}}}
  - {id: neurons, measure: neuron, model: m, expect: {max: {">": -1}}}
  - {id: dla, measure: dla, model: m, expect: {max: {">": 0}}}
  - {id: lens, measure: logit_lens, model: m, expect: {max: {">": 0}}}
  - {id: paths, measure: path_patch, from: {model: m}, into: {model: m, input: corrupt},
     path: resid, expect: {max: {">": 0}}}
  - {id: minimal, measure: circuit, model: m, members: [L0H0, L1H0], kind: zero,
     metric: minimality, expect: {min: {">": 0}}}
  - {id: complete, measure: circuit, model: m, members: [L0H0, L1H0], kind: zero,
     metric: completeness, expect: {max: {"<": 1}}}
""", file=str(path))
    for claim in extra.claims:
        measured = MEASURES[claim.measure](ClaimContext(extra, claim, session))
        assert measured.parts is not None, claim.id
        means = {k: v.double().mean(0, keepdim=True) for k, v in measured.parts.parts.items()}
        rebuilt = measured.parts.combine(means)[0].float()
        assert torch.allclose(rebuilt, measured.value.values.float(), atol=1e-5), claim.id


# ----------------------------------------------------------------------------- pure parts

def _grid_measurement(per_prompt: torch.Tensor) -> Measurement:
    """A 1 x 3 grid from per-prompt values [prompt, 3]."""
    grid = Grid(("component",), (("a", "b", "c"),), per_prompt.mean(0))
    return Measurement(GRID, grid, parts=PromptParts({"value": per_prompt}))


class _Claim:
    per_prompt = "mean"

    def __init__(self, confidence=None, kind=GRID):
        self.confidence, self.kind = confidence, kind

    def value_kind(self):
        return self.kind


def test_resample_means_are_means_of_seeded_draws():
    parts = {"x": torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(1)),
             "y": torch.arange(7.0)}
    means = resample_means(parts, 50, seed=3)
    draws = torch.randint(0, 7, (50, 7), generator=torch.Generator().manual_seed(3))
    for name, part in parts.items():
        assert torch.allclose(means[name], part.double()[draws].mean(1))
    again = resample_means(parts, 50, seed=3)
    assert all(torch.equal(means[k], again[k]) for k in parts)
    assert not torch.equal(resample_means(parts, 50, seed=4)["y"], means["y"])


def test_a_clear_winner_is_stable_and_a_coin_flip_is_not():
    clear = torch.tensor([[1.0, 0.2, 0.1]] * 10) + 0.01 * torch.arange(10.0)[:, None]
    assert stability(_Claim(), _grid_measurement(clear), {}, {"argmax": "a"})["stability"] == 1
    # a and b take turns: a leads the mean by one prompt's worth of 0.1
    flips = torch.tensor([[1.0, 0.0, 0.0] if i % 2 else [0.0, 0.9, 0.0] for i in range(10)])
    measured = _grid_measurement(flips)
    trust = stability(_Claim(0.9), measured, {}, {"argmax": "a"})
    assert 0.3 < trust["stability"] < 0.8
    assert trust["resamples"] == 200 and trust["seed"] == 0 and trust["confidence"] == 0.9
    ok, message, _ = gate(_Claim(0.9), trust, (True, "argmax at a", None))
    assert not ok and "fewer than confidence 0.9" in message
    assert gate(_Claim(None), trust, (True, "m", None)) == (True, "m", None)
    ok, message, _ = gate(_Claim(0.9), None, (True, "m", None))   # one prompt: nothing resampled
    assert not ok and "confidence 0.9 cannot be checked" in message


def test_a_resample_without_a_finite_value_does_not_hold_and_reports_stay_strict_json():
    from harness.jsonfiles import dumps

    # prompt 0 alone has from == into: a resample of only it divides by zero
    parts = PromptParts({"patched": torch.tensor([[1.0], [2.0]]), "from": torch.tensor([1.0, 3.0]),
                         "into": torch.tensor([1.0, 0.0])}, normalized_from_means)
    grid = Grid(("layer",), ((0,),), parts.combine(
        {k: v.mean(0, keepdim=True) for k, v in parts.parts.items()})[0])
    trust = stability(_Claim(), Measurement(GRID, grid, parts=parts), {}, {"max": {">": 0}})
    assert trust["stability"] < 1 and "bootstrap" not in trust
    dumps(trust)


def test_no_stability_without_prompts_to_resample():
    one = torch.tensor([[1.0, 0.0, 0.0]])
    assert stability(_Claim(), _grid_measurement(one), {}, {"argmax": "a"}) is None
    bare = Measurement(GRID, Grid(("component",), (("a",),), torch.ones(1)))
    assert stability(_Claim(), bare, {}, {"argmax": "a"}) is None
    scalar = Measurement(SCALAR, 1.0, (1.0, 2.0, 0.0))
    assert stability(_Claim(), scalar, {}, {"baseline": True}) is None


STABILITY_IN_A_FRESH_PROCESS = """
import json, torch
from harness.expect import GRID, Measurement
from harness.measure.results import Grid, PromptParts, normalized_from_means
from harness.stability import stability
torch.manual_seed({torch_seed})      # the global generator must not matter
values = torch.tensor([[1.0, 0.0, 0.0] if i % 2 else [0.0, 0.9, 0.0] for i in range(10)])
m = Measurement(GRID, Grid(("component",), (("a", "b", "c"),), values.mean(0)),
                parts=PromptParts({{"value": values}}))
claim = type("C", (), {{"per_prompt": "mean", "confidence": None}})()
print(json.dumps(stability(claim, m, {{}}, {{"argmax": "a", "max": {{">": 0}}}})))
"""


def test_same_measurement_same_numbers_in_another_process():
    runs = [json.loads(subprocess.run(
        [sys.executable, "-c", STABILITY_IN_A_FRESH_PROCESS.format(torch_seed=s)],
        capture_output=True, text=True, check=True, cwd=REPO).stdout) for s in (0, 12345)]
    assert runs[0] == runs[1]
    assert 0 < runs[0]["stability"] < 1 and len(runs[0]["bootstrap"]) == 200


# ----------------------------------------------------------------------------- the spec

@pytest.mark.parametrize("body, message", [
    ("measure: top_k, model: m, k: 3, confidence: 0.9, expect: {includes: [' a']}",
     "`confidence` does not apply"),
    ("measure: logit_diff, model: m, ci: 0.9, confidence: 0.9, expect: {'>': 0}",
     "give `ci` or `confidence`, not both"),
    ("measure: logit_diff, model: m, per_prompt: all, confidence: 0.9, expect: {'>': 0}",
     "with `per_prompt` every prompt is judged"),
    ("measure: logit_diff, model: m, confidence: 1.5, expect: {'>': 0}", "confidence"),
])
def test_confidence_spec_errors_name_the_field(body, message):
    text = f"""models:
  m: {{path: /nowhere}}
prompts:
  - {{text: "a b", answer: " c", foil: " d"}}
claims:
  - {{id: c, {body}}}
"""
    with pytest.raises(SpecError) as info:
        load_spec_text(text, file="s.yaml")
    assert message in str(info.value) and "confidence" in str(info.value)
    assert "s.yaml:6" in str(info.value)


# ----------------------------------------------------------------------------- reports

def test_every_report_shows_the_trust(planted, tmp_path):
    import jsonschema

    path, verdicts, report = planted
    jsonschema.validate(report, json.loads((REPO / "docs" / "report.schema.json").read_text()))
    tie = next(c for c in report["specs"][0]["claims"] if c["id"] == "tie")
    share = f"{tie['trust']['stability']:.3g}"
    assert f"stab {share}" in R.table(list(verdicts.values()))
    assert f"stab {share}" in R.markdown_report(report)
    page = html_report(report)
    assert f"stability {share}, resamples 200, seed 0" in page
    assert "margin per bootstrap resample" in page
    assert f"stability {share}" in claim_text("planted", tie)
    frame = R.dataframe(report)
    assert frame.set_index("claim").loc["tie", "stability"] == tie["trust"]["stability"]


def test_histogram_of_the_bootstrap_beside_the_figure(planted):
    path, verdicts, report = planted
    page = html_report(report)
    assert page.count("figure histogram") >= 1


def test_freeze_writes_confidence_where_it_was_measured(planted):
    import yaml

    path, verdicts, report = planted
    data = yaml.safe_load(path.read_text())
    text = frozen_spec_text(data, report["specs"][0]["claims"], 0.05, "report.json")
    frozen = {c["id"]: c for c in yaml.safe_load(text)["claims"]}
    assert frozen["clear-confident"]["confidence"] == 0.9          # a grid keeps it
    assert "confidence" not in frozen["tie"]                       # none measured
    assert "confidence" not in frozen["copies"]                    # a number: approx ± tol
    assert "dropped confidence 0.95" in text
    assert "(confidence 0.9, held in 100% of 200 resamples)" in text


def test_freeze_keeps_the_significance_gate():
    """A frozen claim measured against chance keeps the spec's `significant` level: replacing
    `expect` by the pinned value alone would let a claim that no longer beats chance pass."""
    import yaml

    spec = {"spec": "s", "models": {}, "claims": [
        {"id": "beats-chance", "measure": "circuit", "model": "m", "members": ["L0H0"],
         "against": {"random": 50, "seed": 0}, "confidence": 0.95,
         "expect": {">=": 0.9, "significant": 0.01}}]}
    entry = {"id": "beats-chance", "status": "passed", "measure": "circuit", "models": ["m"],
             "measured": 0.97, "expected": spec["claims"][0]["expect"],
             "trust": {"confidence": 0.95, "p": 0.0196}}
    text = frozen_spec_text(spec, [entry], 0.05, "report.json")
    claim = yaml.safe_load(text)["claims"][0]
    assert claim["expect"] == {"approx": 0.97, "atol": 0.05, "significant": 0.01}
    assert claim["against"] == {"random": 50, "seed": 0}
    assert "kept significant: 0.01 from the spec" in text


def test_the_docs_name_the_kinds_without_stability():
    from harness.kinds import CLAIM_KINDS

    without = [m for m, cls in CLAIM_KINDS.items() if not cls.RESAMPLES_PROMPTS]
    text = (REPO / "docs" / "spec-format.md").read_text()
    named = " and ".join(f"`{m}`" for m in without)
    assert f"every kind except {named}" in text, without


def test_a_ranking_is_resampled_as_the_kind_ranks_it():
    from functools import partial

    from harness.expect import FEATURES
    from harness.kinds.features import _minus, _top_indices

    # feature 3 fires on every prompt; 1 and 2 take turns, 1 ahead by one prompt
    acts = torch.zeros(9, 5)
    acts[:, 3] = 5.0
    acts[0::2, 1], acts[1::2, 2] = 1.0, 1.0
    control = torch.tensor([0.0, 0.0, 0.0, 4.6, 0.0])   # control prompts: 3 fires there too
    ranked = PromptParts({"value": acts}, partial(_minus, None), partial(_top_indices, 1, "up"))
    measured = Measurement(FEATURES, [3], parts=ranked)
    assert stability(_Claim(kind=FEATURES), measured, {}, {"equals": [3]})["stability"] == 1
    against = PromptParts({"value": acts}, partial(_minus, control),
                          partial(_top_indices, 1, "up"))
    share = stability(_Claim(kind=FEATURES), Measurement(FEATURES, [3], parts=against), {},
                      {"equals": [3]})["stability"]
    assert share < 0.5     # 5 - 4.6 = 0.4 trails 1 and 2 (means 5/9 and 4/9) on most draws
    two = PromptParts({"value": acts}, read=partial(_top_indices, 2, "up"))
    share = stability(_Claim(kind=FEATURES), Measurement(FEATURES, [3, 1], parts=two), {},
                      {"equals": [3, 1]})["stability"]
    assert 0.3 < share < 0.9   # which of 1 and 2 is second depends on the prompts drawn


def test_toy_induction_heads_are_stable(tmp_path):
    """The shipped toy-induction model: its previous-token and induction heads lead on every
    resample of the sequences and prompts."""
    spec = (REPO / "specs" / "induction.yaml").read_text().split("claims:")[0]
    path = tmp_path / "heads.yaml"
    path.write_text(spec + """claims:
  - {id: previous, measure: head_scores, model: induct, role: previous_token, confidence: 0.99,
     expect: {argmax: L0H0}}
  - {id: induction, measure: head_scores, model: induct, role: induction, confidence: 0.99,
     expect: {argmax: L1H0}}
  - {id: attends-previous, measure: attention, model: induct, source: previous,
     confidence: 0.99, expect: {argmax: L0H0}}
""")
    verdicts = run_spec_file(path, Session(verbose=False, device="cpu")).verdicts
    assert [(v.status, v.extras["trust"]["stability"]) for v in verdicts] == \
        [("passed", 1.0)] * 3, [v.message for v in verdicts]


def test_toy_induction_edges_are_stable(tmp_path):
    """Edges found by EAP-IG on toy-induction: the previous-token head's edge into the induction
    head's keys and the induction head's edge to the logits rank in the top edges on every
    resample of the prompts, and the circuit of the top 10 edges stays faithful; a claim naming
    the wrong head's edge is not stable (it fails on every resample)."""
    spec = (REPO / "specs" / "induction_edges.yaml").read_text().split("claims:")[0]
    spec = spec.replace("file: data/", f"file: {REPO / 'specs' / 'data'}/")
    path = tmp_path / "edges.yaml"
    path.write_text(spec + """claims:
  - {id: planted-edges, measure: edge_scores, model: induct, method: eap-ig, steps: 5,
     confidence: 0.99, expect: {top: {k: 8, includes: ["L0H0 -> L1H0:k", "L1H0 -> logits"]}}}
  - {id: wrong-edge, measure: edge_scores, model: induct, method: eap-ig, steps: 5,
     expect: {top: {k: 8, includes: ["L0H1 -> L1H1:k"]}}}
""")
    verdicts = run_spec_file(path, Session(verbose=False, device="cpu")).verdicts
    right, wrong = verdicts
    assert (right.status, right.extras["trust"]["stability"]) == ("passed", 1.0), right.message
    assert wrong.status == "failed" and wrong.extras["trust"]["stability"] < 0.5


def test_same_trust_numbers_under_xdist(planted, pytester, tmp_path):
    """Bootstraps and random selections are seeded per claim, not by the process: the planted
    spec (with an edge circuit against chance) gives the same verdicts, values, stabilities,
    p-values and bootstrap values in one process and under `pytest -n 2`."""
    path = planted[0]
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    pytester.mkdir("specs")
    pytester.mkdir("checks")
    edges = ('["embed -> L0H0:q", "embed -> L0H0:k", "embed -> L0H0:v", "L0H0 -> L1H0:k", '
             '"embed -> L1H0:q", "embed -> L1H0:v", "L1H0 -> logits"]')
    (pytester.path / "specs" / "planted.yaml").write_text(
        path.read_text() + f"  - {{id: edges-vs-chance, measure: circuit, model: m, kind: zero, "
        f"edges: {edges}, against: {{random: 40, seed: 3}}, confidence: 0.9, "
        f"expect: {{'>': 0.5, significant: 0.05}}}}\n")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    first = pytester.runpytest("checks", "-p", "no:randomly", f"--harness-report-json={one}")
    second = pytester.runpytest("checks", "-p", "no:randomly", "-n", "2",
                                f"--harness-report-json={two}")
    assert first.parseoutcomes() == second.parseoutcomes()

    def numbers(report: Path) -> dict:
        data = json.loads(report.read_text())
        return {c["id"]: (c["status"], c["measured"], c.get("trust"))
                for s in data["specs"] for c in s["claims"]}

    in_one, in_two = numbers(one), numbers(two)
    assert in_one == in_two
    edge = in_one["edges-vs-chance"]
    assert edge[0] == "passed" and edge[2]["random"] == 40 and edge[2]["stability"] == 1.0
    assert in_one["tie-confident"][0] == "failed"
