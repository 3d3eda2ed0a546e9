"""Ground truth for sequence metrics and `metric: loss | accuracy` patching: a planted induction
circuit (L0H0 previous-token head, L1H0 induction head) whose behaviour is known exactly."""

from __future__ import annotations

import pytest
from _induction_model import WORDS, build_induction_model

from harness.runner import run_spec_file
from harness.session import Session

L = 6
CLEAN = "".join(WORDS[:L]) * 2                     # a sequence and its repeat
CORRUPT = "".join(WORDS[L:2 * L]) + "".join(WORDS[:L])   # nothing to repeat from


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("induction")
    model = build_induction_model(root / "model")
    path = root / "induction.yaml"
    path.write_text(f'''models:
  m: {{path: "{model}"}}
prompts:
  - text: "{CLEAN}"
    corrupt: "{CORRUPT}"
claims:
  - {{id: repeat-accuracy, measure: accuracy, model: m, span: second_half, expect: {{approx: 1.0,
     atol: 1.0e-6}}}}
  - {{id: first-half-accuracy, measure: accuracy, model: m, span: {{stop: {L}}},
     expect: {{approx: 0.0, atol: 1.0e-6}}}}
  - {{id: repeat-loss, measure: loss, model: m, span: {{start: {L + 1}}}, expect: {{"<": 0.01}}}}
  - {{id: first-half-loss, measure: loss, model: m, span: {{start: 1, stop: {L}}},
     expect: {{">": 5}}}}
  - {{id: false-repeat-claim, measure: accuracy, model: m, span: second_half,
     expect: {{"<": 0.5}}}}
  - {{id: ablate-induction, measure: ablate, model: m, site: z, heads: [L1H0],
     metric: accuracy, span: second_half, expect: {{">": 0.9}}}}
  - {{id: false-ablate-claim, measure: ablate, model: m, site: mlp_out, layers: [0, 1],
     metric: accuracy, span: second_half, expect: {{">": 0.5}}}}
  - id: patch-induction-head
    measure: patch
    from: {{model: m, input: clean}}
    into: {{model: m, input: corrupt}}
    site: z
    heads: [L1H0]
    metric: accuracy
    span: second_half
    expect: {{">": 0.99}}
  - id: patch-induction-head-loss
    measure: patch
    from: {{model: m, input: clean}}
    into: {{model: m, input: corrupt}}
    site: z
    heads: [L1H0]
    metric: loss
    span: second_half
    expect: {{">": 0.99}}
  - id: false-patch-claim
    measure: patch
    from: {{model: m, input: clean}}
    into: {{model: m, input: corrupt}}
    site: z
    heads: [L0H0]
    metric: accuracy
    span: second_half
    expect: {{">": 0.5}}
  - id: where-the-repeat-lives
    measure: patch_sweep
    from: {{model: m, input: clean}}
    into: {{model: m, input: corrupt}}
    site: z
    over: [layer, head]
    metric: loss
    span: second_half
    expect: {{argmax: L1H0, max: {{">": 0.99}}}}
''')
    result = run_spec_file(path, Session(verbose=False, device="cpu"))
    assert result.error is None, result.error
    return {v.claim_id: v for v in result.verdicts}


@pytest.mark.parametrize("claim", ["repeat-accuracy", "first-half-accuracy", "repeat-loss",
                                   "first-half-loss", "ablate-induction", "patch-induction-head",
                                   "patch-induction-head-loss", "where-the-repeat-lives"])
def test_true_claims_hold(verdicts, claim):
    assert verdicts[claim].status == "passed", verdicts[claim].message


@pytest.mark.parametrize("claim", ["false-repeat-claim", "false-ablate-claim",
                                   "false-patch-claim"])
def test_false_claims_fail(verdicts, claim):
    assert verdicts[claim].status == "failed", verdicts[claim].message


def test_raw_values_are_the_known_ones(verdicts):
    patch = verdicts["patch-induction-head"].extras
    assert patch["from"] == pytest.approx(1.0) and patch["into"] == pytest.approx(0.0)
    assert patch["raw"] == pytest.approx(1.0)
    ablate = verdicts["ablate-induction"].extras
    assert ablate["into"] == pytest.approx(1.0)       # the clean accuracy
    assert ablate["raw"] < 0.2                         # the ablated accuracy
    grid = verdicts["where-the-repeat-lives"].measured
    # L0H0 alone: keys say "earlier occurrence here" over the corrupt words, so the induction
    # head copies them with confidence: the loss gets worse, not better
    assert grid["values"][0][0] < 0
    assert grid["values"][1][0] == pytest.approx(1.0, abs=0.01)
