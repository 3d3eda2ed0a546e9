"""Edge circuits and exact edge scores on a planted model whose only path is known by
construction (tests/_induction_model.py): the previous-token head L0H0 writes the previous
token, the induction head L1H0 reads it through its keys and writes the answer to the logits;
MLPs write nothing, the unembedding reads only L1H0's output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from _induction_model import WORDS, build_induction_model
from _tiny_models import load_bridge
from transformers import AutoTokenizer

from harness.measure.edge_circuits import edge_circuit_scores, exact_edge_scores
from harness.measure.edge_forward import EdgeForward

PLANTED = {"embed -> L0H0:q", "embed -> L0H0:k", "embed -> L0H0:v", "L0H0 -> L1H0:k",
           "embed -> L1H0:q", "embed -> L1H0:v", "L1H0 -> logits"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    directory = build_induction_model(tmp_path_factory.mktemp("planted"))
    tok = AutoTokenizer.from_pretrained(str(directory))
    words = [w.strip() for w in WORDS]
    clean, corrupt, answers, foils = [], [], [], []
    for i in range(4):
        w = [words[(i + j) % len(words)] for j in range(6)]
        other = words[(i + 6) % len(words)]
        clean.append(" " + " ".join(w + w[:4]))
        corrupt.append(" " + " ".join(w[:3] + [other] + w[4:] + w[:4]))
        answers.append(tok(" " + w[4])["input_ids"][0])
        foils.append(tok(" " + w[5])["input_ids"][0])
    ids = [tok(t)["input_ids"] for t in clean]
    cids = [tok(t)["input_ids"] for t in corrupt]
    assert {len(x) for x in ids + cids} == {10}
    batch = SimpleNamespace(tokens=torch.tensor(ids), final_pos=torch.full((4,), 9),
                            answer_ids=torch.tensor(answers), foil_ids=torch.tensor(foils),
                            corrupt_tokens=torch.tensor(cids))
    bridge = load_bridge(directory)
    ef = EdgeForward.for_bridge(bridge, batch.tokens)
    clean_out = ef.outputs(ef.trace(batch.tokens))
    corrupt_out = ef.outputs(ef.trace(batch.corrupt_tokens))
    return ef, batch, clean_out, corrupt_out, directory


def test_exact_scores_rank_the_planted_edges_first(planted):
    ef, batch, clean, corrupt, _ = planted
    effects, base = exact_edge_scores(ef, clean, corrupt, batch)
    assert base.mean() > 2, "the planted circuit predicts the answer"
    scores = (-effects.mean(-1)).abs()
    labels = [e.label for e in ef.graph.edges]
    ranked = [labels[i] for i in torch.argsort(scores, descending=True)]
    top = set(ranked[:3])
    assert {"L0H0 -> L1H0:k", "L1H0 -> logits"} <= top <= PLANTED, ranked[:5]
    others = torch.tensor([s for s, label in zip(scores.tolist(), labels)
                           if label not in PLANTED])
    assert others.max() < 0.05 * scores.max()   # MLPs write nothing; LayerNorm couples a bit


def test_removing_a_planted_edge_drops_faithfulness_as_computed_by_hand(planted):
    """The planted circuit is (almost exactly) faithful; without L0H0 -> L1H0:k its
    faithfulness is what the single-edge patch of that edge gives, computed here from the
    edge forward with one weight set to zero by hand."""
    ef, batch, clean, corrupt, _ = planted
    members = [ef.graph.edge(e) for e in sorted(PLANTED)]
    scores = edge_circuit_scores(ef, clean, corrupt, batch, members)
    faithful = scores.faithfulness().mean()
    assert faithful == pytest.approx(1.0, abs=0.02)
    weights = ef.ones()
    g = ef.graph
    k_edge = g.edge("L0H0 -> L1H0:k")
    weights[0, g.sender_index[k_edge.sender], g.receiver_index[k_edge.receiver]] = 0
    with torch.no_grad():
        run = ef.run(clean, corrupt, weights)
        by_hand = ef.logit_diff(run.final, batch.final_pos, batch.answer_ids, batch.foil_ids)[0]
    expected = ((by_hand - scores.ablated) / (scores.model - scores.ablated)).mean()
    i = [m.label for m in members].index("L0H0 -> L1H0:k")
    without = ((scores.without[i] - scores.ablated) / (scores.model - scores.ablated)).mean()
    assert without == pytest.approx(float(expected), abs=0.02)
    assert without < faithful - 0.5, "the keys' edge carries the circuit"
    minimality = scores.minimality()
    assert minimality[i] > 0.5


def test_kl_scores_find_the_same_path(planted):
    ef, batch, clean, corrupt, _ = planted
    effects, base = exact_edge_scores(ef, clean, corrupt, batch, "kl")
    assert float(base.abs().max()) < 1e-5, "KL of the clean run to itself"
    scores = effects.mean(-1)
    labels = [e.label for e in ef.graph.edges]
    ranked = [labels[i] for i in torch.argsort(scores, descending=True)]
    assert {"L0H0 -> L1H0:k", "L1H0 -> logits"} <= set(ranked[:3]) <= PLANTED


SPEC = """\
spec: edges
models:
  m: {path: "MODEL"}
prompts:
  - {text: " red blue green black white pink red blue green black",
     corrupt: " red blue green gray white pink red blue green black",
     answer: " white", foil: " pink"}
  - {text: " blue green black white pink gray blue green black white",
     corrupt: " blue green black brown pink gray blue green black white",
     answer: " pink", foil: " gray"}
claims:
  - {id: faithful, measure: circuit, model: m, kind: corrupt, expect: {">": 0.9},
     edges: ["embed -> L0H0:q", "embed -> L0H0:k", "embed -> L0H0:v", "L0H0 -> L1H0:k",
             "embed -> L1H0:q", "embed -> L1H0:v", "L1H0 -> logits"]}
  - {id: wrong-head, measure: circuit, model: m, kind: corrupt, expect: {">": 0.9},
     edges: ["embed -> L0H0:v", "L0H0 -> L1H0:q", "embed -> L1H0:q", "embed -> L1H0:v",
             "L1H0 -> logits"]}
  - {id: each-edge-matters, measure: circuit, model: m, kind: corrupt, metric: minimality,
     edges: ["embed -> L0H0:v", "L0H0 -> L1H0:k", "L1H0 -> logits"], expect: {min: {">": 0.5}}}
  - {id: scores, measure: edge_scores, model: m,
     expect: {top: {k: 3, includes: ["L0H0 -> L1H0:k", "L1H0 -> logits"]}}}
  - {id: scores-wrong-head, measure: edge_scores, model: m,
     expect: {top: {k: 3, includes: ["L0H0 -> L1H0:q"]}}}
"""


def test_edge_claims_run_from_a_spec_and_wrong_ones_fail(planted, tmp_path):
    """The whole path: spec -> claims -> the engine's verified fast path -> verdicts."""
    from harness.notebook import check

    spec = tmp_path / "edges.yml"
    spec.write_text(SPEC.replace("MODEL", str(planted[4])))
    result = check(str(spec))
    status = {v.claim_id: v.status for v in result.verdicts}
    assert status == {"faithful": "passed", "wrong-head": "failed",
                      "each-edge-matters": "passed", "scores": "passed",
                      "scores-wrong-head": "failed"}, [(v.claim_id, v.message)
                                                       for v in result.verdicts]


PLANTED_LIST = ('["embed -> L0H0:q", "embed -> L0H0:k", "embed -> L0H0:v", "L0H0 -> L1H0:k", '
                '"embed -> L1H0:q", "embed -> L1H0:v", "L1H0 -> logits"]')
SIGNAL = '["embed -> L0H0:v", "L0H0 -> L1H0:k", "L1H0 -> logits"]'
AGAINST_CLAIMS = f"""\
  - {{id: planted, measure: circuit, model: m, kind: zero, edges: {PLANTED_LIST},
     against: {{random: 1000, seed: 0}}, expect: {{">": 0.9, significant: 0.01}}, confidence: 0.9}}
  - {{id: signal, measure: circuit, model: m, kind: corrupt, edges: {SIGNAL},
     against: {{random: 1000, seed: 0}}, expect: {{">": 0.9, significant: 0.02}}}}
  - {{id: wrong-head, measure: circuit, model: m, kind: zero,
     edges: ["embed -> L0H0:v", "L0H0 -> L1H0:q", "embed -> L1H0:q", "embed -> L1H0:v",
             "L1H0 -> logits"], against: {{random: 1000, seed: 0}}, expect: {{significant: 0.05}}}}
"""


def test_planted_edges_beat_every_other_circuit_of_their_layers(planted, tmp_path):
    """`against: random` on edges: random circuits take as many edges between each pair of
    layers as the named one. The layers offer 383 other circuits of the planted one's shape
    and the runner measures each once (the exact test): under zero ablation the planted
    circuit beats them all (p = 1/384) on every resample. Under corrupt ablation the three
    edges that carry the changed token beat the 63 others (p = 1/64, the least possible); a
    wrong head is not significant. The random circuits' values are what `edge_circuit_scores`
    gives each of them alone."""
    from harness import chance
    from harness.kinds.measuring import edge_pool
    from harness.notebook import check

    spec = tmp_path / "against.yml"
    spec.write_text(SPEC.split("claims:")[0].replace("MODEL", str(planted[4]))
                    + "claims:\n" + AGAINST_CLAIMS)
    verdicts = {v.claim_id: v for v in check(str(spec)).verdicts}
    status = {k: (v.status, v.message) for k, v in verdicts.items()}
    assert {k: s for k, (s, _) in status.items()} == {
        "planted": "passed", "signal": "passed", "wrong-head": "failed"}, status
    planted_trust = verdicts["planted"].extras["trust"]
    assert planted_trust["random"] == 383 and planted_trust["p_value"] == 1 / 384
    assert planted_trust["stability"] == 1.0
    signal = verdicts["signal"].extras
    assert signal["trust"]["random"] == 63 and signal["trust"]["p_value"] == 1 / 64
    assert verdicts["wrong-head"].extras["trust"]["p_value"] > 0.5

    names = yaml.safe_load(SIGNAL)
    drawn = chance.draw(edge_pool(names, planted[0].graph), 1000, 0)
    assert len(drawn) == 63 and len(set(drawn)) == 63 and tuple(sorted(names)) not in drawn
    # each drawn circuit measured alone, as a claim of its own (edge_circuit_scores)
    alone = "".join(f"  - {{id: r{i}, measure: circuit, model: m, kind: corrupt, "
                    f"edges: {list(drawn[i])}, expect: {{'>': -100}}}}\n" for i in (0, 17, 62))
    spec.write_text(SPEC.split("claims:")[0].replace("MODEL", str(planted[4]))
                    + "claims:\n" + alone)
    for v in check(str(spec)).verdicts:
        i = int(v.claim_id[1:])
        assert v.measured == pytest.approx(signal["random_values"][i], abs=1e-4)
