"""Claims against chance (`against: random`, `significant`) and on held-out prompts
(`holdout`): the drawing and the p-value (harness/chance.py), their calibration on
random-weight models, ground truth on planted heads, the batched random selections against
one-at-a-time measurement, spec errors, and reproducibility."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny_models import load_bridge

from harness import chance
from harness.chance import Pool
from harness.errors import MeasureError, SpecError
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec
from harness.testing import build_tiny_gpt2

ROOT = Path(__file__).parents[1]


# ----------------------------------------------------------------------------- drawing

def _heads(layer: int, n: int = 4) -> tuple:
    return tuple(f"L{layer}H{h}" for h in range(n))


def test_draws_keep_size_and_layers_never_the_named_one_and_are_seeded():
    pool = Pool({0: ("L0H1",), 1: ("L1H2", "L1H3")}, {0: _heads(0, 8), 1: _heads(1, 8)})
    draws = chance.draw(pool, 200, seed=3)
    assert len(draws) == 200
    for selection in draws:
        assert sorted(selection) != sorted(("L0H1", "L1H2", "L1H3"))
        assert sum(s.startswith("L0") for s in selection) == 1
        assert sum(s.startswith("L1") for s in selection) == 2 and len(set(selection)) == 3
    assert draws == chance.draw(pool, 200, seed=3)
    assert draws != chance.draw(pool, 200, seed=4)


def test_few_alternatives_are_enumerated_exactly():
    """One head of four: three other selections, each measured once, so the p-value of the
    best head is 1/4, never the 1/(N+1) that N draws with repeats would claim."""
    pool = Pool({1: ("L1H0",)}, {1: _heads(1)})
    draws = chance.draw(pool, 100, seed=0)
    assert sorted(draws) == [("L1H1",), ("L1H2",), ("L1H3",)]
    assert chance.compare(5.0, [1.0, 2.0, 3.0], chance.GREATER)["p_value"] == 0.25


def test_no_other_selection_is_an_error():
    with pytest.raises(MeasureError, match="no"):
        chance.draw(Pool({0: _heads(0)}, {0: _heads(0)}), 10, 0)


def test_the_kinds_that_accept_against_measure_random_selections():
    """`against` is declared by the kinds: each with AGAINST answers `chance_pool` and
    registers its measurement of random selections, and no other kind does."""
    import harness.claims  # noqa: F401  (every kind's measurements registered)
    from harness.kinds import CLAIM_KINDS, ClaimBase
    from harness.kinds.base import CHANCE_MEASUREMENTS

    accepting = {name for name, cls in CLAIM_KINDS.items() if cls.AGAINST}
    assert accepting == set(CHANCE_MEASUREMENTS)
    assert {"ablate", "patch", "circuit", "path_patch", "neuron", "feature"} <= accepting
    assert all(CLAIM_KINDS[n].chance_pool is not ClaimBase.chance_pool for n in accepting)


def test_kinds_pools_use_canonical_labels_and_keep_mlps():
    from harness.kinds.circuit import CircuitClaim
    from harness.kinds.patching import AblateClaim

    sizes = {"n_heads": 4, "n_kv_heads": 2, "d_mlp": 8}
    ablate = AblateClaim(id="a", measure="ablate", model="m", site="z", heads=("L01H0", "L1H2"),
                         expect={">": 0})
    pool = ablate.chance_pool(sizes)
    assert pool.named == {1: ("L1H0", "L1H2")} and pool.candidates == {1: _heads(1)}
    on_values = AblateClaim(id="a", measure="ablate", model="m", site="v", heads=("L0KV1",),
                            expect={">": 0}).chance_pool(sizes)
    assert on_values.candidates == {0: ("L0KV0", "L0KV1")}
    circuit = CircuitClaim(id="c", measure="circuit", model="m", members=("L0H1", "mlp0"),
                           kind="zero", expect={">": 0}).chance_pool(sizes)
    assert circuit.alternatives() == 3
    assert all("mlp0" in s for s in chance.draw(circuit, 10, 0))


def test_edge_pools_keep_each_edges_sender_and_receiver_layers():
    from harness.edge_graph import EdgeGraph
    from harness.kinds.circuit import CircuitClaim

    graph = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2)
    claim = CircuitClaim(id="c", measure="circuit", model="m", kind="corrupt",
                         edges=("L0H1 -> L1H0:k", "embed -> L1H1:q", "L1H0 -> logits"),
                         expect={">": 0})
    pool = claim.chance_pool({"edge_graph": graph})
    assert pool.named == {(0, 1): ("L0H1 -> L1H0:k",), ("embed", 1): ("embed -> L1H1:q",),
                          (1, "logits"): ("L1H0 -> logits",)}
    # layer 0's two heads and MLP each reach layer 1's 2 q, 2 k, 2 v inputs and its MLP
    assert len(pool.candidates[(0, 1)]) == 3 * 7 and len(pool.candidates[("embed", 1)]) == 7
    assert pool.candidates[(1, "logits")] == ("L1H0 -> logits", "L1H1 -> logits",
                                              "mlp1 -> logits")
    assert pool.alternatives() == 21 * 7 * 3 - 1


def test_p_value_percentile_ties_and_direction():
    assert chance.compare(3.0, [1.0, 2.0, 3.0, 4.0], chance.GREATER) == \
        {"p_value": 3 / 5, "percentile": 50.0}          # the tie counts against the claim
    assert chance.compare(0.5, [1.0, 2.0, 3.0, 4.0], chance.LESS) == \
        {"p_value": 1 / 5, "percentile": 100.0}
    assert chance.direction({">=": 0.5}) == chance.direction({"significant": 0.1}) == "greater"
    assert chance.direction({"<": 0.1}) == chance.direction({"sign": "negative"}) == "less"


def test_p_values_are_calibrated_on_exchangeable_values():
    """No structure: the named item is one more draw from the items' distribution, so
    `significant: 0.05` holds for about 5% of claims (pure, 2000 claims)."""
    passed = 0
    for seed in range(2000):
        rng = random.Random(seed)
        values = {i: rng.gauss(0, 1) for i in range(200)}
        named = rng.randrange(200)
        pool = Pool({0: (named,)}, {0: tuple(values)})
        randoms = [values[i] for (i,) in chance.draw(pool, 99, seed)]
        passed += chance.compare(values[named], randoms, chance.GREATER)["p_value"] <= 0.05
    assert 0.04 <= passed / 2000 <= 0.06


def test_draws_are_the_same_in_another_process():
    """xdist workers and later runs draw what this process draws (no hash-order or global
    random state in the drawing)."""
    code = ("from harness.chance import Pool, draw; "
            "print(draw(Pool({1: ('L1H0', 'L1H2'), 0: ('L0H3',)}, "
            "{0: tuple(f'L0H{h}' for h in range(16)), 1: tuple(f'L1H{h}' for h in range(16))}"
            "), 50, 7))")
    here = repr(chance.draw(Pool({1: ("L1H0", "L1H2"), 0: ("L0H3",)},
                                 {0: _heads(0, 16), 1: _heads(1, 16)}), 50, 7))
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == here


# ----------------------------------------------------------------------------- calibration

PROMPTS = """\
- {text: "This movie was really", answer: " good", foil: " bad"}
- {text: "The acting was", answer: " bad", foil: " good"}
- {text: "I thought the plot was", answer: " good", foil: " bad"}
"""


def _spec(path: Path, models: dict[str, Path], claims: str, prompts: str = PROMPTS,
          sets: str = "") -> Path:
    body = "spec: chance\nmodels:\n" + "".join(f'  {n}: {{path: "{d}"}}\n'
                                                for n, d in models.items())
    body += "prompts:\n" + textwrap.indent(prompts, "  ") + sets + "claims:\n" + \
        textwrap.indent(claims, "  ")
    path.write_text(body)
    return path


def test_random_weight_models_pass_significant_at_the_nominal_rate(tmp_path):
    """Random weights have no structure: over 200 claims (8 seeded models, 25 named neurons
    each against 99 random neurons of the same layer) `significant: 0.05` passes at a rate
    within [0.02, 0.08] (measured: 0.05; with 100 claims the rate's spread, about 0.022,
    would put the band's ends within reach of chance). One forward per claim reads every
    neuron of the layer."""
    models = {f"m{s}": build_tiny_gpt2(tmp_path / f"m{s}", seed=s) for s in range(8)}
    claims = "".join(
        f"- {{id: c{s}-{i}, measure: neuron, model: m{s}, layer: {i % 2}, "
        f"neuron: {(37 * i + 11 * s) % 128}, position: all, reduce: mean, "
        f"against: {{random: 99, seed: {i}}}, expect: {{significant: 0.05}}}}\n"
        for s in range(8) for i in range(25))
    verdicts = run_spec_file(_spec(tmp_path / "s.yaml", models, claims),
                             Session(verbose=False)).verdicts
    assert len(verdicts) == 200 and {v.status for v in verdicts} <= {"passed", "failed"}
    rate = sum(v.status == "passed" for v in verdicts) / len(verdicts)
    assert 0.02 <= rate <= 0.08, rate
    p_values = [v.extras["trust"]["p_value"] for v in verdicts]
    assert min(p_values) < 0.05 < max(p_values)


def test_same_spec_and_seed_give_the_same_numbers_in_one_process(tmp_path):
    """Whatever ran before (global torch and random state moved on), a claim measures the
    same random selections and the same p-value again; another seed draws others."""
    model = build_tiny_gpt2(tmp_path / "m", seed=2)
    claims = "".join(f"- {{id: c{seed}, measure: neuron, model: a, layer: 1, neuron: 5, "
                     f"against: {{random: 20, seed: {seed}}}, expect: {{'>': -100}}}}\n"
                     for seed in (0, 0, 1))
    claims = claims.replace("id: c0,", "id: first,", 1)
    path = _spec(tmp_path / "s.yaml", {"a": model}, claims)

    def numbers():
        verdicts = run_spec_file(path, Session(verbose=False)).verdicts
        return [(v.extras["trust"], v.extras["random_values"]) for v in verdicts]

    first = numbers()
    torch.manual_seed(123)
    random.seed(123)
    torch.rand(7)
    again = numbers()
    assert first == again
    assert first[0] == first[1] and first[0][1] != first[2][1]


# ----------------------------------------------------------------------------- ground truth

@pytest.fixture(scope="module")
def planted16(tmp_path_factory):
    """The planted previous-token (L0H0) and induction (L1H0) heads among 16 heads per layer
    (so that a pair of heads has 255 alternatives: a p-value below 0.01 is possible)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from harness.zoo import induction

    cfg = induction.InductionConfig(n_head=16, n_embd=256)
    tokenizer = induction.build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions,
                                       n_embd=cfg.n_embd, n_layer=2, n_head=cfg.n_head))
    induction.plant(model, cfg, torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("planted16")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _repeats(n: int, seed: int) -> str:
    from harness.zoo.induction import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 9)
        text = " ".join(words + words[:5])
        rows.append(f'- {{text: "{text}", answer: " {words[5]}", foil: " {words[7]}"}}\n')
    return "".join(rows)


def test_planted_heads_are_significant_and_other_heads_are_not(tmp_path, planted16):
    """The planted pair against 255 other pairs of one head per layer (every configuration
    of the 257 in one batched pass): p = 1/256; a wrong pair is not significant."""
    claims = """\
- {id: planted, measure: circuit, model: p, members: [L0H0, L1H0, mlp0, mlp1], kind: zero,
   against: {random: 255, seed: 0}, expect: {">": 0.5, significant: 0.01}}
- {id: wrong, measure: circuit, model: p, members: [L0H5, L1H9, mlp0, mlp1], kind: zero,
   against: {random: 255, seed: 0}, expect: {significant: 0.05}}
"""
    verdicts = {v.claim_id: v for v in run_spec_file(
        _spec(tmp_path / "s.yaml", {"p": planted16}, claims, _repeats(4, 0)),
        Session(verbose=False)).verdicts}
    planted, wrong = verdicts["planted"], verdicts["wrong"]
    assert planted.status == "passed", planted.message
    assert planted.extras["trust"]["p_value"] == 1 / 256        # above all 255 others
    assert planted.extras["trust"]["percentile"] == 100.0
    assert wrong.status == "failed" and wrong.extras["trust"]["p_value"] > 0.05


INDUCTION_CLAIMS = """\
  - id: circuit
    measure: circuit
    model: induct
    members: [L0H0, L1H0, mlp0, mlp1]
    kind: resample
    reference: random
    against: {random: 100, seed: 0}
    expect: {">=": 0.8, significant: 0.1}
  - id: wrong-circuit
    measure: circuit
    model: induct
    members: [L0H1, L1H2, mlp0, mlp1]
    kind: resample
    reference: random
    against: {random: 100, seed: 0}
    expect: {significant: 0.1}
  - id: senders
    measure: path_patch
    from: {model: induct}
    into: {model: induct, input: corrupt}
    senders: [L0H0]
    path: k
    receivers: [L1KV0]
    against: {random: 10}
    expect: {">": 0.5}
"""


@pytest.fixture(scope="module")
def toy_induction(tmp_path_factory):
    head = (ROOT / "specs" / "induction.yaml").read_text().split("\nclaims:")[0]
    path = tmp_path_factory.mktemp("toy") / "induction.yaml"
    path.write_text(head + "\nclaims:\n" + INDUCTION_CLAIMS)
    return {v.claim_id: v for v in run_spec_file(path, Session(verbose=False)).verdicts}


def test_toy_induction_circuit_beats_every_other_circuit_of_its_layers(toy_induction):
    """Four heads a layer: the 15 other circuits of one head per layer (and both MLPs) are
    each measured once, and the trained circuit beats them all: p = 1/16, the least possible;
    a wrong circuit is not significant."""
    right, wrong = toy_induction["circuit"], toy_induction["wrong-circuit"]
    assert right.status == "passed", right.message
    assert right.extras["trust"] == {**right.extras["trust"], "p_value": 1 / 16,
                                     "percentile": 100.0, "random": 15}
    assert len(right.extras["random_values"]) == 15
    assert max(right.extras["random_values"]) < right.measured
    assert wrong.status == "failed" and "p = " in wrong.message


def test_path_patching_senders_against_other_senders(toy_induction):
    senders = toy_induction["senders"]
    assert senders.status == "passed", senders.message
    assert senders.extras["trust"]["p_value"] == 0.25      # L0H0 above the other three heads


# ----------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from harness.measure.patching import Run

    bridge = load_bridge(build_tiny_gpt2(tmp_path_factory.mktemp("t"), n_layer=3, seed=5))
    texts = ["This movie was really good. This movie was", "The acting was bad. The acting was"]
    rows = [bridge.to_tokens(t, prepend_bos=True)[0].cpu() for t in texts]
    width = min(len(r) for r in rows)
    tokens = torch.stack([r[:width] for r in rows])
    final = torch.full((2,), width - 1)
    ids = [bridge.to_tokens(w, prepend_bos=False)[0, -1].cpu().repeat(2)
           for w in (" good", " bad")]
    corrupt = tokens.flip(0)
    return (Run("m", bridge, tokens, final), Run("m", bridge, corrupt, final), *ids)


SELECTIONS = [{"heads": [(1, 2)]}, {"heads": [(0, 1), (0, 3)]}, {"heads": [(0, 0), (2, 1)]},
              {"layers": [1], "neurons": [3, 7]}, {"heads": [(2, 3)], "positions": [-1]}]


@pytest.mark.parametrize("path", ["auto", "general"])
def test_batched_selections_equal_one_patch_each(tiny_run, path):
    """What `against` measures in one batched run is what `patch` / `ablate` measure for each
    selection alone (single-layer selections as variants, others one forward each)."""
    from harness.measure.patching import PatchingEngine

    clean, corrupt, answer, foil = tiny_run
    engine = PatchingEngine(path=path)
    for site, chosen in (("z", [s for s in SELECTIONS if "heads" in s]),
                         ("mlp_post", [s for s in SELECTIONS if "neurons" in s])):
        ablated = engine.ablate_each(clean, answer, foil, site=site, selections=chosen,
                                     kind="mean")
        patched = engine.patch_each(clean, corrupt, answer, foil, site=site, selections=chosen)
        for i, selection in enumerate(chosen):
            alone = engine.ablate(clean, answer, foil, site=site, kind="mean", **selection)
            assert torch.allclose(ablated[i], alone.patched, atol=1e-4)
            alone = engine.patch(clean, corrupt, answer, foil, site=site, **selection)
            assert torch.allclose(patched[i], alone.patched, atol=1e-4)


# ----------------------------------------------------------------------------- holdout, reports

def test_holdout_reports_both_values_and_must_hold_there_too(tmp_path):
    model = build_tiny_gpt2(tmp_path / "m", seed=1)
    sets = 'prompt_sets:\n  other:\n    - {text: "The acting was", answer: " good", ' \
           'foil: " bad"}\n'
    claims = """\
- {id: held, measure: logit_diff, model: a, holdout: other, expect: {between: [-100, 100]}}
- {id: only-here, measure: logit_diff, model: a, prompt: "The acting was", holdout: other,
   expect: {sign: negative}}
"""
    prompts = '- {text: "The acting was", answer: " bad", foil: " good"}\n'
    path = _spec(tmp_path / "s.yaml", {"a": model}, claims, prompts, sets)
    verdicts = {v.claim_id: v for v in run_spec_file(path, Session(verbose=False)).verdicts}
    held, only = verdicts["held"], verdicts["only-here"]
    assert held.status == "passed" and held.extras["trust"]["holdout_passed"] is True
    # answer and foil swapped on the held-out prompt: the same logit difference, negated
    assert held.extras["trust"]["holdout"] == pytest.approx(-held.measured, abs=1e-4)
    # its own prompt and the held-out one disagree in sign: one of the two fails
    assert only.status == "failed"
    assert only.extras["trust"]["holdout_passed"] is (only.measured > 0)
    assert "holdout 'other'" in only.message


def test_holdout_with_confidence_gates_the_held_out_interval(tmp_path):
    """`confidence:` on a number gates its bootstrap interval, on the held-out set too. The
    claim's prompts are one prompt twice (logit difference x, interval [x, x]); the held-out
    set has it with answer and foil swapped too (x and -x: mean 0, interval [-x, x]). A bound
    around 0 and x but not -x holds on the claim's prompts and on the held-out mean, and fails
    on the held-out interval."""
    model = build_tiny_gpt2(tmp_path / "m", seed=1)
    good = '    - {text: "The acting was", answer: " good", foil: " bad"}\n'
    sets = 'prompt_sets:\n  other:\n' + good + good.replace("good", "X").replace(
        "bad", "good").replace("X", "bad")
    probe = _spec(tmp_path / "probe.yaml", {"a": model},
                  "- {id: x, measure: logit_diff, model: a, expect: {'>': -100}}\n", good[4:])
    x = run_spec_file(probe, Session(verbose=False)).verdicts[0].measured
    assert abs(x) > 1e-3
    low, high = sorted((-x / 2, 2 * x))
    claims = f"""\
- {{id: wide, measure: logit_diff, model: a, holdout: other, confidence: 0.9,
   expect: {{between: [-100, 100]}}}}
- {{id: narrow, measure: logit_diff, model: a, holdout: other, confidence: 0.9,
   expect: {{between: [{low}, {high}]}}}}
"""
    path = _spec(tmp_path / "s.yaml", {"a": model}, claims, good[4:] * 2, sets)
    verdicts = {v.claim_id: v for v in run_spec_file(path, Session(verbose=False)).verdicts}
    wide, narrow = verdicts["wide"], verdicts["narrow"]
    assert wide.status == "passed", wide.message
    assert wide.extras["trust"]["holdout"] == pytest.approx(0.0, abs=1e-5)
    assert narrow.measured == pytest.approx(x, abs=1e-5)
    assert narrow.status == "failed" and "on holdout 'other'" in narrow.message
    assert "interval" in narrow.message, narrow.message


def test_json_report_and_table_carry_the_trust_numbers(tmp_path, planted16):
    from harness.report import json_report, table
    from harness.runner import SpecResult

    claims = """\
- {id: planted, measure: ablate, model: p, site: z, heads: [L1H0], holdout: again,
   against: {random: 15, seed: 2}, expect: {">": 0.2, significant: 0.1}}
"""
    sets = "prompt_sets:\n  again:\n" + textwrap.indent(_repeats(3, 1), "    ")
    path = _spec(tmp_path / "s.yaml", {"p": planted16}, claims, _repeats(3, 0), sets)
    result = run_spec_file(path, Session(verbose=False))
    assert isinstance(result, SpecResult)
    claim = json.loads(json.dumps(json_report([result])))["specs"][0]["claims"][0]
    assert set(claim["trust"]) >= {"p_value", "percentile", "random", "random_seed", "holdout",
                                   "holdout_passed"}
    assert claim["trust"]["random"] == 15 and claim["trust"]["random_seed"] == 2
    assert len(claim["random_values"]) == 15
    assert "p=0.0625" in table(result.verdicts)


# ----------------------------------------------------------------------------- spec errors

BAD = """\
spec: s
models:
  m: {path: /nowhere}
prompts:
  - {text: "a b", answer: " c", foil: " d"}
prompt_sets:
  ref:
    - {text: "e f", answer: " c", foil: " d"}
claims:
"""


@pytest.mark.parametrize("claim, field, words", [
    ("{id: x, measure: logit_diff, model: m, against: {random: 10}, expect: {'>': 0}}",
     "claims[0].against", "names none"),
    ("{id: x, measure: ablate, model: m, site: z, layers: [0], against: {random: 10}, "
     "expect: {'>': 0}}", "claims[0].against", "`ablate` (heads or neurons)"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: {top: 3, method: eap}, "
     "against: {random: 10}, expect: {'>': 0}}", "claims[0].against", "listed edges"),
    ("{id: x, measure: ablate, model: m, site: z, heads: [L0H0], expect: {significant: 0.01}}",
     "claims[0].expect.significant", "add `against`"),
    ("{id: x, measure: ablate, model: m, site: z, heads: [L0H0], against: {random: 5}, "
     "expect: {significant: 2}}", "claims[0].expect.significant", "between 0 and 1"),
    ("{id: x, measure: ablate, model: m, site: z, heads: [L0H0], against: {random: 50}, "
     "expect: {significant: 0.01}}", "claims[0].expect.significant",
     "smallest p-value is 1/51 = 0.0196, above 0.01: the claim could never pass; draw at "
     "least 99"),
    ("{id: x, measure: logit_diff, model: m, holdout: rfe, expect: {'>': 0}}",
     "claims[0].holdout", "did you mean 'ref'"),
    ("{id: x, measure: patch, from: {model: m}, into: {model: m, input: corrupt}, site: z, "
     "heads: [L0H0], holdout: ref, expect: {'>': 0}}", "claims[0].holdout", "`corrupt:`"),
    ("{id: x, measure: head_scores, model: m, role: induction, holdout: ref, "
     "expect: {argmax: L1H0}}", "claims[0].holdout", "makes its own inputs"),
])
def test_spec_errors_name_the_field(tmp_path, claim, field, words):
    text = BAD.replace('"a b", answer', '"a b", corrupt: "a c", answer') if "corrupt" in claim \
        else BAD
    path = tmp_path / "s.yaml"
    path.write_text(text + f"  - {claim}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert field in message and words in message and f"{path}:10" in message
