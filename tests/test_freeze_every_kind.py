"""Every claim kind freezes: `result.to_spec` / `harness freeze` pin each kind's measured value
through the rule its claim class names (`FREEZE`), or the kind says why it cannot.

The round trip: one spec with a claim of every measure (and of every shape a kind's fields
give its value) on small planted models — the induction model of `_induction_model.py`, the
planted SAE world of `test_features.py` and the shipped toy reviews pair for sampling — is run,
frozen and run again: every frozen claim passes on the same models, and fails on changed
ones: the induction model with noise added to its blocks, `pos` and `neg` exchanged (the
planted feature direction reversed), the RLHF-tuned reviews model in place of its source.
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _induction_model import build_induction_model
from _tiny_models import TEST_DEVICE
from test_features import _planted_model, _planted_sae
from transformers import GPT2LMHeadModel

import harness
from harness import freeze
from harness.session import Session
from harness.spec import CLAIM_KINDS, MEASURES

TOLERANCE = 0.05
WORDS = "red blue green black white pink gray brown tan gold teal navy".split()


def _sequence(i: int) -> dict:
    """Six words, then the first four again: induction predicts the fifth. The corrupt text
    changes the fourth word's first occurrence, so the final word has nothing to continue."""
    w = [WORDS[(i + j) % len(WORDS)] for j in range(6)]
    return {"text": " ".join(w + w[:4]),
            "corrupt": " ".join(w[:3] + [WORDS[(i + 6) % len(WORDS)]] + w[4:] + w[:4]),
            "answer": f" {w[4]}", "foil": f" {w[5]}"}


CLAIMS = """
- {id: copies, measure: logit_diff, model: induct, expect: {">": 2}}
- {id: next-word, measure: top_k, model: induct, prompt: "red blue green black white pink red blue",
   k: 1, expect: {equals: [" green"]}}
- {id: continues, measure: generate, model: induct, prompt: "red blue green black white pink red
   blue", max_new_tokens: 3, expect: {contains: "blue green black"}}
- {id: samples, measure: generate, model: source, prompts: review, temperature: 1.0, samples: 4,
   max_new_tokens: 8, score_with: reward, expect: {mean_score: {between: [0, 1]}}}
- {id: repeat-loss, measure: loss, model: induct, span: second_half, expect: {">": 0}}
- {id: repeat-accuracy, measure: accuracy, model: induct, span: second_half, expect: {">": 0.3}}
- {id: previous-token-grid, measure: attention, model: induct, source: previous,
   expect: {argmax: L0H0}}
- {id: previous-token-head, measure: attention, model: induct, source: previous, heads: [L0H0],
   expect: {">": 0.9}}
- {id: previous-token-score, measure: head_scores, model: induct, role: previous_token,
   random_tokens: {length: 8, count: 4, vocab: prompts}, expect: {argmax: L0H0}}
- {id: senders-to-keys, measure: path_patch, from: {model: induct, input: clean},
   into: {model: induct, input: corrupt}, path: k, receivers: [L1KV0], expect: {argmax: L0H0}}
- {id: L0H0-to-keys, measure: path_patch, from: {model: induct, input: clean},
   into: {model: induct, input: corrupt}, senders: [L0H0], path: k, receivers: [L1KV0],
   expect: {">": 0.5}}
- {id: faithful, measure: circuit, model: induct, members: [L0H0, L1H0], kind: zero,
   expect: {">": 0.8}}
- {id: minimal, measure: circuit, model: induct, members: [L0H0, L1H0], kind: zero,
   metric: minimality, expect: {min: {">": 0.5}}}
- {id: complete, measure: circuit, model: induct, members: [L0H0, L1H0], kind: zero,
   metric: completeness, expect: {max: {"<": 0.2}}}
- {id: found-circuit, measure: circuit, model: induct, kind: corrupt,
   edges: {top: 6, method: eap}, expect: {">": 0.5}}
- {id: edge-scores, measure: edge_scores, model: induct,
   expect: {top: {k: 3, includes: ["L1H0 -> logits"]}}}
- {id: ablate-induction-head, measure: ablate, model: induct, site: z, heads: [L1H0],
   expect: {">": 0.5}}
- {id: sweep, measure: patch_sweep, from: {model: induct, input: clean},
   into: {model: induct, input: corrupt}, site: z, over: [layer, head], metric: logit_diff,
   expect: {max: {">": 2}}}
- {id: neuron-grid, measure: neuron, model: induct, layers: [0, 1], position: all,
   expect: {max: {between: [-100, 100]}}}
- {id: one-neuron, measure: neuron, model: induct, layer: 1, neuron: 0,
   expect: {between: [-100, 100]}}
- {id: dla, measure: dla, model: induct, expect: {argmax: attn1}}
- {id: lens, measure: logit_lens, model: induct, expect: {argmax: final}}
- {id: patch-flips, measure: patch, from: pos, into: neg, prompts: reviews, site: resid_pre,
   layers: [1], metric: logit_diff, expect: {flips_sign: true}}
- {id: dla-pair, measure: dla, models: [pos, neg], prompts: reviews, expect: {min: {"<": 0}}}
- {id: reads-d, measure: feature, model: pos, prompts: reviews, sae: planted, feature: 0,
   expect: {">": 1}}
- {id: top-feature, measure: top_features, model: pos, prompts: reviews, sae: planted, k: 1,
   expect: {equals: [0]}}
- {id: features-up, measure: feature_diff, models: [pos, neg], prompts: reviews, sae: planted,
   direction: up, k: 3, expect: {includes: [1]}}
- {id: feature-0-falls, measure: feature_diff, models: [pos, neg], prompts: reviews,
   sae: planted, feature: 0, expect: {"<": -1}}
- {id: ablate-feature, measure: feature_intervention, model: pos, prompts: reviews,
   sae: planted, ablate: [0], expect: {between: [-0.01, 0.01]}}
"""


def _with_noise(src, dst, scale: float = 0.3, seed: int = 0):
    """A copy of a GPT-2 with seeded noise added to every block's weights (norms kept)."""
    shutil.copytree(src, dst)
    model = GPT2LMHeadModel.from_pretrained(str(src))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.transformer.h.named_parameters():
            if "ln_" not in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """The spec's report, its frozen copy's verdicts on the same and on the changed models."""
    root = tmp_path_factory.mktemp("freeze-every-kind")
    induct = build_induction_model(root / "induct")
    pos, direction = _planted_model(root / "pos", 3.0)
    neg, _ = _planted_model(root / "neg", -3.0)
    models = {"induct": {"path": str(induct)}, "pos": {"path": str(pos)},
              "neg": {"path": str(neg)}, "source": {"zoo": "toy-reviews-source"},
              "reward": {"zoo": "toy-reviews-reward"}}
    changed = {**models, "induct": {"path": str(_with_noise(induct, root / "induct-noisy"))},
               "pos": models["neg"], "neg": models["pos"], "source": {"zoo": "toy-reviews-rlhf"}}
    reviews = [{"text": t, "answer": " bad", "foil": " good"}
               for t in ("This movie was really", "The acting was")]
    spec = {"spec": "every-kind", "models": models,
            "saes": {"planted": {"path": str(_planted_sae(root / "sae", direction))}},
            "prompts": [_sequence(i) for i in range(3)],
            "prompt_sets": {"reviews": reviews, "review": reviews[:1]},
            "defaults": {"prepend_bos": True},
            "claims": yaml.safe_load(textwrap.dedent(CLAIMS))}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    session = Session(verbose=False, device=TEST_DEVICE)   # HARNESS_TEST_DEVICE=cuda: a GPU
    found = harness.check(path, session=session)
    assert found.ok, found.raise_for_failures()
    frozen_path = found.to_spec(root / "frozen" / "spec.yaml", tolerance=TOLERANCE)
    frozen = yaml.safe_load(frozen_path.read_text())
    again = harness.check(frozen_path, session=session)
    changed_path = frozen_path.with_name("changed.yaml")   # beside it: its paths still hold
    changed_path.write_text(yaml.safe_dump({**frozen, "models": changed}, sort_keys=False))
    moved = harness.check(changed_path, session=session)
    return {"found": {c["id"]: c for c in found.claims}, "text": frozen_path.read_text(),
            "frozen": {c["id"]: c for c in frozen["claims"]},
            "again": {v.claim_id: v for v in again.verdicts},
            "moved": {v.claim_id: v for v in moved.verdicts}}


@pytest.mark.parametrize("measure", MEASURES)
def test_every_kind_declares_how_it_freezes(measure):
    """On the class itself (a subclass inheriting its parent's rule would freeze its value as
    the parent's shape): rules that exist, or None and the reason the frozen spec gives."""
    kind = CLAIM_KINDS[measure]
    assert "FREEZE" in vars(kind), f"{kind.__name__} declares no FREEZE"
    if kind.FREEZE is None:
        assert kind.FREEZE_WHY.strip(), f"{kind.__name__} cannot freeze but says not why"
    else:
        assert set(kind.FREEZE.split("|")) <= set(freeze.RULES), kind.FREEZE


def test_the_round_trip_covers_every_kind_and_every_rule(round_trip):
    found = round_trip["found"].values()
    assert {c["measure"] for c in found} == set(MEASURES)
    assert {freeze.rule_for(c)[0].name for c in found} == set(freeze.RULES)


@pytest.mark.parametrize("measure", MEASURES)
def test_frozen_claims_pass_on_the_same_models_and_fail_on_changed_ones(round_trip, measure):
    ids = [cid for cid, c in round_trip["found"].items() if c["measure"] == measure]
    assert ids, f"the round trip has no '{measure}' claim: add one to CLAIMS"
    for cid in ids:
        found, frozen = round_trip["found"][cid], round_trip["frozen"][cid]
        expect, note = freeze.frozen_expectation(found, TOLERANCE)
        assert expect is not None, note
        assert frozen["expect"] == expect and f"# {note}" in round_trip["text"]
        again, moved = round_trip["again"][cid], round_trip["moved"][cid]
        assert again.status == "passed", (cid, expect, again.message)
        assert moved.status == "failed", (cid, expect, moved.measured, moved.message)


def test_the_docs_say_how_each_kind_freezes():
    """docs/notebooks.md's table has a row per rule, naming every kind that uses it."""
    text = (Path(__file__).parent.parent / "docs" / "notebooks.md").read_text()
    rows = {}
    for line in text.split("| rule | value | frozen expectation | kinds |")[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[-1]
    assert set(rows) == set(freeze.RULES)
    for measure, kind in CLAIM_KINDS.items():
        for rule in freeze.rules_of(kind.FREEZE) if kind.FREEZE else ():
            assert f"`{measure}`" in rows[rule.name], (measure, rule.name)


# ----------------------------------------------------------------------------- the rules alone

def entry(measure: str, measured, **more) -> dict:
    """A JSON report entry of a passed claim."""
    return {"id": "c", "measure": measure, "status": "passed", "measured": measured,
            "params": {}, "models": ["m"], **more}


def test_a_kind_that_cannot_freeze_keeps_its_expectation_and_says_why(monkeypatch):
    kind = CLAIM_KINDS["loss"]
    monkeypatch.setattr(kind, "FREEZE", None)
    monkeypatch.setattr(kind, "FREEZE_WHY", "a loss depends on the tokenizer's padding")
    claim = {"id": "c", "measure": "loss", "model": "m", "expect": {"<": 3}}
    text = freeze.frozen_spec_text({"models": {"m": {"path": "m"}}, "claims": [claim]},
                                   [entry("loss", 2.5)], TOLERANCE, "r.json")
    assert "# not frozen: a loss depends on the tokenizer's padding" in text
    assert yaml.safe_load(text)["claims"] == [claim]


def test_a_measure_this_harness_does_not_know_is_not_frozen():
    expect, note = freeze.frozen_expectation(entry("neuron_v9", 1.0), TOLERANCE)
    assert expect is None and note == "not frozen: this harness has no measure 'neuron_v9'"


def test_a_value_of_no_declared_shape_is_not_frozen():
    expect, note = freeze.frozen_expectation(entry("attention", "a text"), TOLERANCE)
    assert expect is None and "'grid|scalar'" in note


@pytest.mark.parametrize(("scores", "expected"), [
    ([[4, 2.0], [9, 1.0], [2, 0.5]], {"equals": [4, 9, 2]}),
    ([[4, 2.0], [9, 1.0], [2, 0.999]], {"includes": [4]}),       # 9 and 2: order unknown
    ([[4, 2.0], [9, 0.001]], {"includes": [4]}),                 # 9 barely fires
    ([[4, -2.0], [9, -1.0]], {"equals": [4, 9]}),                # feature_diff, direction down
    ([[4, 1.0], [9, 0.999]], None),                              # no feature stands clear
    ([[4, "x"], [9, None]], {"equals": [4, 9]}),                 # no usable scores: as ranked
])
def test_ranked_features_pin_only_what_stands_clear(scores, expected):
    measured = [f for f, _ in scores]
    expect, note = freeze.frozen_expectation(entry("top_features", measured, scores=scores),
                                             TOLERANCE)
    assert expect == expected, note


def test_a_patch_whose_patched_value_is_zero_pins_no_sign():
    """An accuracy of 0 has no sign; `sign: negative` would fail on the same models."""
    patched = entry("patch", 0.0, raw=0.0, **{"from": 1.0, "into": 0.0})
    patched["params"] = {"metric": "accuracy"}
    assert freeze.frozen_expectation(patched, TOLERANCE)[0] == {"approx": 0.0, "atol": TOLERANCE}


def test_freeze_names_no_measure():
    """The rules read value shapes; which kind freezes by which rule is its claim class's
    business (a rule may share a measure's name, as `patch` does, and nothing else may)."""
    tree = ast.parse(Path(freeze.__file__).read_text())
    rule_names = {id(call.args[0]) for call in ast.walk(tree) if isinstance(call, ast.Call)
                  and getattr(call.func, "id", None) == "rule" and call.args}
    named = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
             and node.value in MEASURES and id(node) not in rule_names]
    assert not named, f"freeze.py branches on measure names: {named}"
