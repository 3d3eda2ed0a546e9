"""EAP and EAP-IG against ground truth: first-order Taylor terms by autograd, exact edge
patching, toy-induction's known circuit and a planted model whose only path is known."""

from __future__ import annotations

import random

import pytest
import torch
from _induction_model import WORDS as PLANTED_WORDS
from _induction_model import build_induction_model
from _tiny_models import build_model_dir, load_bridge

from harness.measure import edge_attribution as EA
from harness.measure import edge_discovery as ED
from harness.measure.edge_forward import EdgeForward
from harness.zoo.induction import WORDS as ZOO_WORDS
from harness.zoo.store import zoo_checkpoint


def repeat_prompts(tokenizer, words, n: int, seed: int, *, length: int = 7, repeat: int = 4,
                   sep: str = " ") -> EA.Prompts:
    """Random words, then the first `repeat` of them again: the answer is the next word of
    the first occurrence. The corrupt prompt changes the word before the answer's first
    occurrence, so nothing points the induction head at it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.sample(list(words), length + 1)
        seq = w[:length] + w[:repeat]
        corrupt = list(seq)
        corrupt[repeat - 1] = w[length]
        rows.append((seq, corrupt, w[repeat], w[repeat + 1]))

    def ids(text):
        return tokenizer(text)["input_ids"]

    def last(word):
        return ids(" " + word.strip())[-1]

    clean = torch.tensor([ids(sep.join(r[0])) for r in rows])
    corrupt = torch.tensor([ids(sep.join(r[1])) for r in rows])
    assert clean.shape == corrupt.shape
    return EA.Prompts(clean, corrupt, torch.full((n,), clean.shape[1] - 1),
                      torch.tensor([last(r[2]) for r in rows]),
                      torch.tensor([last(r[3]) for r in rows]))


def exact_scores(ef, prompts: EA.Prompts) -> list[float]:
    """Exact edge patching, independently of the attribution code: the clean run with one
    edge at a time carrying its sender's corrupt-run output, minus the clean run."""
    clean = ef.outputs(ef.trace(prompts.clean))
    corrupt = ef.outputs(ef.trace(prompts.corrupt))
    pairs = ED.edge_pairs(ef.graph)
    weights = ef.ones(len(pairs) + 1)
    for v, (s, r) in enumerate(pairs):
        weights[v, s, r] = 0.0
    with torch.no_grad():
        run = ef.run(clean, corrupt, weights)
        ld = ef.logit_diff(run.final, prompts.final_pos, prompts.answer_ids,
                           prompts.foil_ids).mean(1)
    return (ld[:-1] - ld[-1]).tolist()


def spearman(a, b) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# ----------------------------------------------------------------------------- tiny GPT-2

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    bridge = load_bridge(build_model_dir(tmp_path_factory.mktemp("eap") / "m", n_layer=2))
    gen = torch.Generator().manual_seed(0)
    vocab = bridge.cfg.d_vocab
    clean = torch.randint(1, vocab, (6, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, vocab, (6, 3), generator=gen)
    prompts = EA.Prompts(clean, corrupt, torch.full((6,), 6),
                         torch.randint(1, vocab, (6,), generator=gen),
                         torch.randint(1, vocab, (6,), generator=gen))
    return EdgeForward.for_bridge(bridge, clean), prompts


def test_eap_scores_are_first_order_taylor_terms(tiny):
    """EAP of edge u -> v is the derivative of the metric along that edge's patch, -dm/dw at
    w = 1 with the corrupt run as the ablation: here autograd takes it through the edge
    weights themselves, and central differences check a few edges."""
    ef, prompts = tiny
    scores = EA.attribution_scores(ef, prompts, "eap")
    clean = ef.outputs(ef.trace(prompts.clean))
    corrupt = ef.outputs(ef.trace(prompts.corrupt))

    def metric(weights):
        run = ef.run(clean, corrupt, weights)
        return ef.logit_diff(run.final, prompts.final_pos, prompts.answer_ids,
                             prompts.foil_ids).mean(1)

    weights = ef.ones().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(metric(weights).sum(), weights)
    mask = EA.upstream_mask(ef.graph)
    torch.testing.assert_close(scores, -grad[0] * mask, atol=1e-5, rtol=1e-4)
    assert scores.abs().max() > 1e-3                     # not all zero

    eps = 1e-2
    per_edge = ED.scores_by_edge(ef.graph, scores)
    pairs = ED.edge_pairs(ef.graph)
    for i in ED.ranking(per_edge)[:5]:
        s, r = pairs[i]
        plus, minus = ef.ones(), ef.ones()
        plus[0, s, r], minus[0, s, r] = 1 - eps, 1 + eps      # eps of the way to corrupt
        with torch.no_grad():
            fd = float((metric(plus) - metric(minus))[0] / (2 * eps))
        assert fd == pytest.approx(per_edge[i], rel=1e-2, abs=1e-4)


def test_one_ig_step_is_eap_and_scores_only_existing_edges(tiny):
    ef, prompts = tiny
    eap = EA.attribution_scores(ef, prompts, "eap")
    torch.testing.assert_close(EA.attribution_scores(ef, prompts, "eap-ig", steps=1), eap)
    assert not (eap * (1 - EA.upstream_mask(ef.graph))).any()


def test_slices_add_up_to_the_whole_batch(tiny):
    ef, prompts = tiny
    whole = EA.attribution_scores(ef, prompts, "eap-ig", steps=3)
    sliced = EA.attribution_scores(ef, prompts, "eap-ig", steps=3, memory_budget_mb=1e-3)
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-4)


def test_kl_has_no_gradient_at_the_clean_run_but_ig_scores_it(tiny):
    ef, prompts = tiny
    at_clean = EA.attribution_scores(ef, prompts, "eap", metric="kl").abs().max()
    along_the_path = EA.attribution_scores(ef, prompts, "eap-ig", steps=5, metric="kl")
    assert along_the_path.abs().max() > 100 * at_clean


def test_eap_ig_with_many_steps_ranks_edges_like_exact_patching(tiny):
    """On a small random model (no sharp circuit) EAP-IG's ranking of all edges follows exact
    edge patching's. (On toy-induction, whose circuit saturates, 30-step EAP-IG reaches a
    Spearman of about 0.8 over its 110 edges and plain EAP about 0.93: IG integrates along
    the whole clean -> corrupt path, single-edge patching stays near the clean run; the
    circuit tests below check what matters there, the top edges and their faithfulness.)"""
    ef, prompts = tiny
    exact = exact_scores(ef, prompts)
    ig = ED.scores_by_edge(ef.graph, EA.attribution_scores(ef, prompts, "eap-ig", steps=30))
    assert spearman([abs(x) for x in ig], [abs(x) for x in exact]) >= 0.9


# ----------------------------------------------------------------------------- toy-induction

@pytest.fixture(scope="module")
def induction():
    bridge = load_bridge(zoo_checkpoint("toy-induction"))
    prompts = repeat_prompts(bridge.tokenizer, ZOO_WORDS, 16, seed=0)
    return EdgeForward.for_bridge(bridge, prompts.clean), prompts


def circuit_faithfulness(ef, prompts, circuits):
    clean = ef.outputs(ef.trace(prompts.clean))
    corrupt = ef.outputs(ef.trace(prompts.corrupt))
    weights = torch.cat([ef.ones().cpu(), torch.zeros(1, *ef.ones().shape[1:]),
                         ED.circuit_weights(ef.graph, circuits)])
    ld = ED.circuit_logit_diffs(ef, clean, corrupt, weights, prompts.final_pos,
                                prompts.answer_ids, prompts.foil_ids)
    return [float((x - ld[1]) / (ld[0] - ld[1])) for x in ld[2:]]


def test_eap_ig_finds_toy_inductions_circuit(induction):
    ef, prompts = induction
    per_edge = ED.scores_by_edge(ef.graph, EA.attribution_scores(ef, prompts, "eap-ig"))
    order = ED.ranking(per_edge)
    top = [ef.graph.edges[i].label for i in order[:10]]
    assert {"L0H0 -> L1H0:k", "L1H0 -> logits"} <= set(top)
    assert "L0H1 -> L1H0:k" not in top and "L1H2 -> logits" not in top    # wrong heads
    found, wrong = circuit_faithfulness(ef, prompts, [order[:10], order[10:20]])
    assert found >= 0.9
    assert wrong < 0.5                      # the next ten edges explain little on their own


# ----------------------------------------------------------------------------- planted model

PLANTED = {"embed -> L0H0:v", "L0H0 -> L1H0:k", "L1H0 -> logits"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    bridge = load_bridge(build_induction_model(tmp_path_factory.mktemp("planted") / "m"))
    prompts = repeat_prompts(bridge.tokenizer, PLANTED_WORDS, 8, seed=1, length=6, repeat=3,
                             sep="")
    return EdgeForward.for_bridge(bridge, prompts.clean), prompts


@pytest.mark.parametrize("method", ["eap-ig", "exact"])
def test_discovery_recovers_exactly_the_planted_path(planted, method):
    """The corrupt prompt changes the token before the answer's first occurrence: only L0H0's
    copy of it (its v input) reaching the induction head's keys, and the induction head's
    write to the logits, carry the change."""
    ef, prompts = planted
    if method == "exact":
        per_edge = exact_scores(ef, prompts)
    else:
        per_edge = ED.scores_by_edge(ef.graph, EA.attribution_scores(ef, prompts, method))
    order = ED.ranking(per_edge)
    assert {ef.graph.edges[i].label for i in order[:3]} == PLANTED

    def faith(circuit):
        return circuit_faithfulness(ef, prompts, [circuit])[0]

    n, tried = ED.smallest_faithful_prefix(order, faith, 0.9)
    assert n == 3 and tried[3] >= 0.9


# ----------------------------------------------------------------------------- specs

def repeat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.sample(list(ZOO_WORDS), 9)
        seq = w[:7] + w[:4]
        corrupt = list(seq)
        corrupt[3] = w[7]
        rows.append({"text": " ".join(seq), "corrupt": " ".join(corrupt),
                     "answer": " " + w[4], "foil": " " + w[5]})
    return rows


def induction_spec(claims: str) -> str:
    import json

    def rows(items):
        return "\n".join(f"    - {json.dumps(r)}" for r in items)

    return f"""spec: found-circuits
models:
  induct: {{zoo: toy-induction}}
prompts:
{rows(repeat_rows(12, 0)).replace('    - ', '  - ')}
prompt_sets:
  held_out:
{rows(repeat_rows(12, 1))}
claims:
{claims}"""


DISCOVERY_CLAIMS = """\
  - {id: top-edges, measure: edge_scores, model: induct, method: eap-ig, steps: 5,
     expect: {top: {k: 8, includes: ["L0H0 -> L1H0:k", "L1H0 -> logits"]}}}
  - {id: wrong-top-edges, measure: edge_scores, model: induct, method: eap-ig,
     expect: {top: {k: 8, includes: ["L0H1 -> L1H0:k", "L1H2 -> logits"]}}}
  - {id: found-circuit, measure: circuit, model: induct, kind: corrupt,
     edges: {top: 10, method: eap-ig}, eval_prompts: held_out, expect: {">=": 0.9}}
  - {id: smallest-faithful, measure: circuit, model: induct, kind: corrupt,
     edges: {faithfulness: 0.9, method: eap}, expect: {">=": 0.9}}
  - {id: wrong-circuit, measure: circuit, model: induct, kind: corrupt,
     edges: ["embed -> L0H1:v", "L0H1 -> L1H0:k", "L1H2 -> logits"], expect: {">=": 0.9}}
  - {id: cpr, measure: circuit, model: induct, kind: corrupt, edges: {method: eap-ig},
     metric: cpr, sizes: [0.05, 0.1, 0.2, 0.5, 1.0], expect: {">": 0.6}}
  - {id: cmd, measure: circuit, model: induct, kind: corrupt, edges: {method: eap-ig},
     metric: cmd, sizes: [0.05, 0.1, 0.2, 0.5, 1.0], expect: {"<": 0.3}}
"""


@pytest.fixture(scope="module")
def discovery_verdicts(tmp_path_factory):
    from harness.runner import run_spec_file
    from harness.session import Session

    path = tmp_path_factory.mktemp("found") / "found.yaml"
    path.write_text(induction_spec(DISCOVERY_CLAIMS))
    return {v.claim_id: v for v in run_spec_file(path, Session(verbose=False)).verdicts}


def test_found_circuits_pass_and_wrong_heads_fail(discovery_verdicts):
    status = {k: (v.status, v.message) for k, v in discovery_verdicts.items()}
    assert {k: s for k, (s, _) in status.items()} == {
        "top-edges": "passed", "wrong-top-edges": "failed", "found-circuit": "passed",
        "smallest-faithful": "passed", "wrong-circuit": "failed", "cpr": "passed",
        "cmd": "passed"}, status
    found = discovery_verdicts["found-circuit"].extras
    assert len(found["found_edges"]) == 10
    assert {"L0H0 -> L1H0:k", "L1H0 -> logits"} <= set(found["found_edges"])
    assert len(discovery_verdicts["smallest-faithful"].extras["found_edges"]) <= 10
    curve = discovery_verdicts["cpr"].extras["curve"]
    assert curve["sizes"] == [0.05, 0.1, 0.2, 0.5, 1.0]
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)   # every edge: the model


def test_freeze_pins_a_found_circuit_as_its_edge_list():
    import yaml

    from harness import freeze

    source = {"spec": "s", "models": {"m": {"path": "x"}}, "claims": [
        {"id": "found", "measure": "circuit", "model": "m", "kind": "corrupt",
         "edges": {"top": 2, "method": "eap-ig"}, "eval_prompts": "held_out",
         "expect": {">=": 0.9}}]}
    entry = {"id": "found", "measure": "circuit", "status": "passed", "measured": 0.93,
             "params": {"eval_prompts": "held_out"}, "models": ["m"],
             "found_edges": ["L0H0 -> L1H0:k", "L1H0 -> logits"],
             "discovery": {"method": "eap-ig"}}
    text = freeze.frozen_spec_text(source, [entry], 0.05, "r.json")
    claim = yaml.safe_load(text)["claims"][0]
    assert claim["edges"] == ["L0H0 -> L1H0:k", "L1H0 -> logits"]
    assert claim["prompts"] == "held_out" and "eval_prompts" not in claim
    assert claim["expect"] == {"approx": 0.93, "atol": 0.05}
    assert "2 edges found by eap-ig" in text


@pytest.mark.parametrize("claim, message", [
    ("{id: x, measure: edge_scores, model: m, method: eap, steps: 5, expect: {argmax: 'L0H0 -> "
     "logits'}}", "`steps` is EAP-IG's number of integration steps"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: {top: 3, share: 0.1}, "
     "expect: {'>': 0}}", "takes one of top, share, faithfulness"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: {method: eap-ig}, "
     "expect: {'>': 0}}", "a found circuit needs its size"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: ['L0H0 -> logits'], "
     "metric: cpr, expect: {'>': 0}}", "scores a discovery method over circuit sizes"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: {top: 3, method: eap}, "
     "metric: cmd, expect: {'<': 1}}", "drop `edges.top`"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: {method: eap}, metric: cpr, "
     "sizes: [0.5, 0.1], expect: {'>': 0}}", "circuit sizes must increase"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: ['L0H0 -> logits'], "
     "eval_prompts: ref, expect: {'>': 0}}", "`eval_prompts` measures a found circuit"),
    ("{id: x, measure: circuit, model: m, kind: corrupt, edges: {top: 2, method: eap}, "
     "eval_prompts: nope, expect: {'>': 0}}", "nope"),
])
def test_discovery_spec_errors_name_file_line_and_field(tmp_path, claim, message):
    from test_edge_graph import SPEC

    from harness.errors import SpecError
    from harness.spec import load_spec

    path = tmp_path / "s.yaml"
    path.write_text(SPEC + "  - " + claim + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value) + "".join(str(o) for o in getattr(info.value, "others", []))
    assert message in text and "s.yaml" in text and ":10" in text, text
