"""The graph of edges (harness/edge_graph.py): which nodes and edges a model shape has, in
which order, and which edge labels name no edge of a model (with the reason)."""

from __future__ import annotations

import pytest

from harness.edge_graph import EdgeError, EdgeGraph, Node


def brute_force_edges(g: EdgeGraph) -> set[str]:
    """Every (sender, receiver) with the sender written before the receiver reads, from the
    block structure written out longhand."""
    out = set()
    written: list[str] = ["embed"]
    for layer in range(g.n_layers):
        heads = [f"L{layer}H{h}" for h in range(g.n_heads)]
        kv = "KV" if g.grouped else "H"
        inputs = [f"L{layer}H{h}:q" for h in range(g.n_heads)] + \
            [f"L{layer}{kv}{h}:{x}" for x in "kv" for h in range(g.n_kv_heads)]
        out |= {f"{s} -> {r}" for s in written for r in inputs}
        mlp_reads = list(written) if g.parallel else written + heads
        written = written + heads
        if g.has_mlp:
            out |= {f"{s} -> mlp{layer}" for s in mlp_reads}
            written.append(f"mlp{layer}")
    return out | {f"{s} -> logits" for s in written}


@pytest.mark.parametrize("shape", [
    dict(n_layers=2, n_heads=4, n_kv_heads=4),
    dict(n_layers=3, n_heads=4, n_kv_heads=2),
    dict(n_layers=2, n_heads=4, n_kv_heads=4, parallel=True),
    dict(n_layers=3, n_heads=2, n_kv_heads=2, has_mlp=False),
])
def test_the_edges_are_every_sender_upstream_of_every_receiver(shape):
    g = EdgeGraph(**shape)
    labels = [e.label for e in g.edges]
    assert len(labels) == len(set(labels))
    assert set(labels) == brute_force_edges(g)
    for edge in g.edges:   # each label names its own edge back
        assert g.edge(edge.label) == edge
        assert g.sender_index[edge.sender] < g.n_upstream(edge.receiver)


def test_a_real_model_shape_has_about_seventy_thousand_edges():
    """SmolLM2-135M: 30 layers, 9 query heads, 3 key/value heads (the issue's count)."""
    g = EdgeGraph(n_layers=30, n_heads=9, n_kv_heads=3)
    assert (len(g.senders), len(g.receivers), len(g.edges)) == (301, 481, 70651)


def test_indices_follow_graph_order():
    g = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=2)
    assert g.senders[:2] == (Node("embed"), Node("head", 0, 0))
    heads, mlp = g.layer_senders(1)
    assert [str(g.senders[i]) for i in heads] == ["L1H0", "L1H1", "L1H2", "L1H3"]
    assert str(g.senders[mlp.start]) == "mlp1"
    recv = g.layer_receivers(1)
    assert [str(g.receivers[i]) for i in recv["k"]] == ["L1KV0:k", "L1KV1:k"]
    assert str(g.receivers[recv["mlp"].start]) == "mlp1"
    assert str(g.receivers[-1]) == "logits"


@pytest.mark.parametrize("shape, text, message", [
    ({}, "L1H0 -> L0H0:q", "L1H0 (layer 1) writes after L0H0:q (layer 0) reads"),
    ({}, "L1H0 -> L1H3:k", "a head input reads only earlier layers"),
    ({}, "mlp1 -> mlp0", "mlp1 (layer 1) writes after mlp0"),
    ({}, "L0H4 -> logits", "head 4 is out of range: the model has 4 heads per layer"),
    ({}, "L0H0 -> L2H0:q", "layer 2 is out of range: the model has 2 layers"),
    ({}, "L0H0 -> L1KV4:v", "head 4 is out of range"),
    ({"n_kv_heads": 2}, "L0H0 -> L1H3:k", "write L1KV1:k (query head 3 reads key/value head 1)"),
    ({"n_kv_heads": 2}, "L0H0 -> L1KV2:v", "the model has 2 key/value heads per layer"),
    ({"parallel": True}, "L1H0 -> mlp1", "parallel block"),
    ({"has_mlp": False}, "embed -> mlp0", "attention-only"),
    ({}, "L0H0 => logits", "is not an edge"),
])
def test_edges_a_model_does_not_have_are_refused_with_the_reason(shape, text, message):
    g = EdgeGraph(**{"n_layers": 2, "n_heads": 4, "n_kv_heads": 4, **shape})
    with pytest.raises(EdgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        g.edge(text)


def test_key_value_head_labels_name_the_query_head_input_without_grouping():
    g = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=4)
    assert g.edge("L0H0 -> L1KV2:k") == g.edge("L0H0 -> L1H2:k")
    assert g.edge("L0H0 -> L1KV2:k").label == "L0H0 -> L1H2:k"
    assert g.edge("L1H0 -> mlp1").label == "L1H0 -> mlp1"   # sequential: same layer reaches


# ----------------------------------------------------------------------------- spec errors

SPEC = """\
spec: s
models:
  m: {path: /nowhere}
prompts:
  - {text: "a b", answer: " c", foil: " d", corrupt: "e b"}
prompt_sets:
  ref:
    - {text: "e f", answer: " c", foil: " d"}
claims:
"""


@pytest.mark.parametrize("claim, message", [
    ("{id: x, measure: circuit, model: m, edges: ['L1H0 -> L0H0:q'], kind: corrupt, "
     "expect: {'>': 0}}", "edge 0 'L1H0 -> L0H0:q' does not exist: L1H0 (layer 1) writes after"),
    ("{id: x, measure: circuit, model: m, edges: ['L0H0 -> mlp0', 'L0H0->logits'], "
     "kind: corrupt, expect: {'>': 0}}", "'L0H0->logits' is not an edge"),
    ("{id: x, measure: circuit, model: m, edges: ['L0H0 -> logits', 'L0H0 -> logits'], "
     "kind: zero, expect: {'>': 0}}", "an edge is listed twice"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], kind: corrupt, expect: {'>': 0}}",
     "write the circuit as `edges:`"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], edges: ['L0H0 -> logits'], "
     "kind: zero, expect: {'>': 0}}", "exactly one of them"),
    ("{id: x, measure: circuit, model: m, edges: ['L0H0 -> logits'], kind: mean, "
     "expect: {'>': 0}}", "needs `reference:`"),
    ("{id: x, measure: edge_scores, model: m, method: eapp, expect: {argmax: 'L0H0 -> logits'}}",
     "unknown method 'eapp'"),
])
def test_edge_spec_errors_name_file_line_and_field(tmp_path, claim, message):
    from harness.errors import SpecError
    from harness.spec import load_spec

    path = tmp_path / "s.yaml"
    path.write_text(SPEC + "  - " + claim + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value) + "".join(str(o) for o in getattr(info.value, "others", []))
    assert message in text and "s.yaml" in text and ":10" in text, text


@pytest.mark.parametrize("edge, message", [
    ("L0H7 -> L1H0:q", "head 7 is out of range"),
    ("L0H0 -> L5H0:q", "layer 5 is out of range"),
    ("L0H0 -> L1KV3:k", "key/value head 3 is out of range"),
])
def test_edges_out_of_range_are_caught_before_weights_load(edge, message):
    """The same range check static checks run on config.json (`index_problems`)."""
    from harness.kinds.base import index_problems
    from harness.kinds.circuit import CircuitClaim

    claim = CircuitClaim(id="x", measure="circuit", model="m", edges=(edge,), kind="zero",
                         expect={">": 0})
    problems = index_problems(claim, {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2}, "m")
    assert problems and problems[0][0] == ("edges", 0) and message in problems[0][1]
