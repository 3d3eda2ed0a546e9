"""The one grammar (harness/labels.py): every label form parses what it formats, bad labels get
a message that says what was given and what to write, and docs/spec-format.md's tables and
`ci` rule are the ones labels.py defines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import labels
from harness.expect import resolve_cell
from harness.freeze import cell_name
from harness.labels import (
    LAYER_PARTS,
    WORDS,
    Head,
    LabelError,
    LayerPart,
    Neuron,
    TokenPosition,
    format_label,
    format_position,
    parse_label,
    parse_position,
)
from harness.measure.results import Grid
from harness.spec import CLAIM_KINDS, ClaimBase

DOCS = Path(__file__).parent.parent / "docs" / "spec-format.md"

index = st.integers(0, 10**6)
any_label = st.one_of(
    st.builds(Head, index, index, st.booleans()),
    st.builds(Neuron, index, index),
    st.builds(LayerPart, st.sampled_from(LAYER_PARTS), index),
    st.sampled_from(sorted(WORDS)),
)


@given(any_label)
def test_every_label_parses_what_it_formats(label):
    assert parse_label(format_label(label)) == label


@given(st.text(max_size=30))
def test_any_text_is_a_label_that_formats_back_or_a_label_error(text):
    try:
        label = parse_label(text)
    except LabelError as exc:
        assert "is not a label; write" in str(exc)
    else:
        assert parse_label(format_label(label)) == label


@pytest.mark.parametrize("text, label", [
    ("L3H7", Head(3, 7)), ("L3KV1", Head(3, 1, kv=True)), ("L3N12", Neuron(3, 12)),
    ("mlp3", LayerPart("mlp", 3)), ("attn0", LayerPart("attn", 0)),
    ("resid_pre3", LayerPart("resid_pre", 3)), ("resid_mid10", LayerPart("resid_mid", 10)),
    ("final", "final"), ("L03H7", Head(3, 7)),
])
def test_each_form(text, label):
    assert parse_label(text) == label


@pytest.mark.parametrize("text", ["L3H7\n", " L3H7", "L3-H0", "L٣H7", "mlp", "H3", "L3H",
                                  "resid3", "attn_out3", "Final", 3, None])
def test_malformed_labels_are_refused(text):
    with pytest.raises(LabelError, match="is not a label"):
        parse_label(text)


def test_the_message_says_what_was_given_what_to_write_and_an_example():
    with pytest.raises(LabelError) as info:
        parse_label("L3-H0", ("head", "kv_head"), "head name")
    assert str(info.value) == ("'L3-H0' is not a head name; write query heads as "
                               "L{layer}H{head} (e.g. L3H7) or key/value heads as "
                               "L{layer}KV{head} (e.g. L3KV1)")
    with pytest.raises(LabelError, match=r"'attn3' is not a component; .* mlp\{layer\}"):
        labels.parse_component("attn3")
    with pytest.raises(LabelError, match=r"'\\x1b\[31m' is not"):   # escapes shown, not obeyed
        parse_label("\x1b[31m")


def test_restricted_forms_refuse_the_others():
    with pytest.raises(LabelError):
        parse_label("L3KV1", ("head",))
    assert parse_label("L3KV1", ("head", "kv_head")) == Head(3, 1, kv=True)
    assert labels.parse_component("mlp2") == LayerPart("mlp", 2)


@given(st.text(max_size=12) | any_label.map(format_label))
def test_the_spec_checks_components_as_circuits_parse_them(text):
    from harness.spec import COMPONENT_RE

    try:
        labels.parse_component(text)
        parsed = True
    except LabelError:
        parsed = False
    assert bool(COMPONENT_RE.match(text)) == parsed


@given(st.builds(Head, index, index, st.booleans()) | st.builds(Neuron, index, index))
def test_cells_and_labels_are_inverse(label):
    cell = labels.label_cell(label)
    named = labels.cell_label(cell)
    assert parse_label(named) == (Head(label.layer, label.head) if isinstance(label, Head)
                                  else label)


def _grid(axes, sizes):
    import torch

    values = torch.arange(float(torch.tensor(sizes).prod())).reshape(sizes)
    return Grid(tuple(axes), tuple(tuple(range(n)) for n in sizes), values)


@pytest.mark.parametrize("axes, cell, label", [
    (("layer", "head"), (1, 2), "L1H2"), (("layer", "neuron"), (2, 5), "L2N5"),
])
def test_freeze_writes_a_cell_name_that_expectations_read_back(axes, cell, label):
    grid = _grid(axes, (3, 8))
    as_json = {"axes": list(axes), "labels": [list(x) for x in grid.labels]}
    assert cell_name(as_json, cell) == label
    assert resolve_cell(grid, label) == cell


def test_a_kv_label_names_a_layer_head_cell_and_a_neuron_label_not():
    grid = _grid(("layer", "head"), (3, 4))
    assert resolve_cell(grid, "L2KV1") == (2, 1)
    with pytest.raises(ValueError, match="must name every axis"):
        resolve_cell(grid, "L2N1")


@given(st.sampled_from(sorted(labels.POSITION_WORDS)) | st.builds(TokenPosition, st.text()))
def test_position_rules_parse_what_they_format(rule):
    assert parse_position(format_position(rule)) == rule


@pytest.mark.parametrize("value", ["last", {"token": 3}, {"tok": " a"}, {}, None, ["all"]])
def test_bad_position_rules_are_refused(value):
    with pytest.raises(LabelError, match="a position is final, all or"):
        parse_position(value)


def test_sweep_axes():
    for axes in labels.SWEEP_AXES:
        assert labels.sweep_axes_problem(list(axes)) is None
    assert labels.sweep_axes_problem(["pos", "layer"]) == (
        "`over: [pos, layer]` is not a sweep; use one of [layer, pos], [layer], "
        "[layer, head], [layer, head, pos]")


def test_the_spec_and_the_engine_share_sweep_axes_and_sequence_metrics():
    from harness import claims, spec
    from harness.errors import MeasureError
    from harness.measure.selection import check_over

    assert spec.SWEEP_AXES is labels.SWEEP_AXES
    assert spec.SEQUENCE_METRICS is labels.SEQUENCE_METRICS
    assert not hasattr(claims, "SEQUENCE")   # no second copy
    with pytest.raises(MeasureError, match=re.escape(labels.sweep_axes_problem(["head"]))):
        check_over("z", ["head"])


# ----------------------------------------------------------------------------- the ci rule

def test_the_ci_conditions_are_the_kinds_that_decide_per_claim():
    """`CI_WHEN` words exactly the kinds whose `has_intervals()` reads their fields."""
    deciding = {m for m, cls in CLAIM_KINDS.items()
                if cls.has_intervals is not ClaimBase.has_intervals}
    assert deciding == set(labels.ci_conditions(CLAIM_KINDS))


def test_the_ci_rule_names_the_kinds_that_take_ci():
    rule = labels.ci_rule(CLAIM_KINDS)
    for measure, cls in CLAIM_KINDS.items():
        takes = cls.HAS_INTERVALS or measure in labels.ci_conditions(CLAIM_KINDS)
        assert (f"`{measure}`" in rule) == takes, measure


def test_the_docs_state_the_ci_rule():
    text = " ".join(DOCS.read_text().split())
    assert f"`ci: 0.95` applies to {labels.ci_claims(CLAIM_KINDS)} over the mean" in text


# ----------------------------------------------------------------------------- docs tables

GENERATED = re.compile(r"<!-- generated from harness/labels.py: (\w+) -->\n(.*?)\n"
                       r"<!-- end generated -->", re.S)


def test_the_docs_tables_are_the_ones_labels_py_generates():
    found = dict(GENERATED.findall(DOCS.read_text()))
    expected = labels.doc_tables()
    assert set(found) == set(expected), "docs/spec-format.md needs one block per table"
    for name, table in expected.items():
        assert found[name] == table, (
            f"docs/spec-format.md's {name} table differs from harness/labels.py; write:\n"
            f"{table}")


# ----------------------------------------------------------------------------- the kinds use it

@given(st.text(max_size=12) | st.builds(Head, index, index, st.booleans()).map(format_label))
def test_a_head_label_the_engine_reads_is_one_the_spec_accepts_and_back(text):
    """`heads:` of a site selection: the spec refuses exactly what `sites.parse_head` (the
    engine's reading) refuses, and reads the same (layer, head)."""
    from pydantic import ValidationError

    from harness.kinds.fields import SiteSelection
    from harness.sites import parse_head

    try:
        parse_label(text, ("head", "kv_head"))
        is_head = True
    except LabelError:
        is_head = False
    for site in ("z", "k"):
        try:
            engine = parse_head(text, site)
        except ValueError:
            engine = None
        try:
            pairs = SiteSelection(site=site, heads=(text,)).head_pairs()
        except ValidationError as exc:
            assert engine is None, f"{text!r} on {site}: the engine reads it, the spec refuses"
            # not a head label at all, or the other kind of head than the site has
            assert ("is not a head name" in str(exc)) == (not is_head)
        else:
            assert pairs == (engine,)


def test_a_bad_head_label_is_shown_escaped_with_the_forms_to_write():
    from pydantic import ValidationError

    from harness.kinds.fields import SiteSelection

    with pytest.raises(ValidationError) as info:
        SiteSelection(site="z", heads=("L3\x1b[2JH0",))
    message = str(info.value)
    assert "\x1b" not in message and "'L3\\x1b[2JH0' is not a head name" in message
    assert "L{layer}H{head}" in message and "L{layer}KV{head}" in message


@given(st.text(max_size=12) | any_label.map(format_label))
def test_component_fields_accept_and_index_what_parse_component_reads(text):
    from pydantic import ValidationError

    from harness.kinds.circuit import CircuitClaim
    from harness.kinds.fields import component_indices

    try:
        parsed = labels.parse_component(text)
    except LabelError:
        parsed = None
    fields = {"id": "c", "measure": "circuit", "model": "m", "members": [text], "kind": "zero",
              "expect": {">": 0}}
    try:
        CircuitClaim.model_validate(fields)
    except ValidationError as exc:
        assert parsed is None and "is not a component" in str(exc)
    else:
        assert parsed is not None
        indexed = {(i.axis, i.value) for i in component_indices([text], "members")}
        assert indexed == {("layer", parsed.layer)} | (
            {("head", parsed.head)} if isinstance(parsed, Head) else set())


def _literal_values(model, field):
    annotation = model.model_fields[field].annotation
    return set(get_args(annotation))


def test_the_kinds_fields_take_the_grammars_words():
    from harness.kinds import CLAIM_CLASSES
    from harness.kinds.fields import FeatureEdit, SpanWord
    from harness.kinds.patching import AblateClaim, PatchClaim
    from harness.kinds.sequence import SequenceClaim

    for cls in (PatchClaim, AblateClaim):
        assert set(labels.SEQUENCE_METRICS) < _literal_values(cls, "metric")
        assert cls.model_fields["span"].default == labels.DEFAULT_SPAN
    assert {c.model_fields["measure"].annotation.__args__[0] for c in CLAIM_CLASSES
            if issubclass(c, SequenceClaim)} == set(labels.SEQUENCE_METRICS)
    assert _literal_values(FeatureEdit, "positions") == set(labels.POSITION_WORDS)
    assert set(get_args(SpanWord)) == set(labels.SPAN_WORDS)


def test_a_bad_sweep_says_what_labels_says():
    from pydantic import ValidationError

    from harness.kinds.patching import PatchSweepClaim

    fields = {"id": "s", "measure": "patch_sweep", "site": "z", "over": ["pos", "layer"],
              "from": "a", "into": "b", "expect": {"max": {">": 0}}}
    with pytest.raises(ValidationError) as info:
        PatchSweepClaim.model_validate(fields)
    assert labels.sweep_axes_problem(["pos", "layer"]) in str(info.value)


@pytest.mark.parametrize("span", ["second-half", "al", {"begin": 1}])
def test_a_bad_span_names_every_span_form(span):
    from pydantic import TypeAdapter, ValidationError

    from harness.kinds.fields import SpanSpec

    with pytest.raises(ValidationError) as info:
        TypeAdapter(SpanSpec).validate_python(span)
    assert labels.SPAN_HELP in str(info.value)
    for form in [*labels.SPAN_WORDS, *labels.SPAN_MAPPINGS]:
        assert form in labels.SPAN_HELP


# ----------------------------------------------------------------------------- edges

head = st.builds(Head, index, index)
edge_sender = st.one_of(st.just("embed"), head, st.builds(LayerPart, st.just("mlp"), index))
edge_receiver = st.one_of(
    st.just("logits"), st.builds(LayerPart, st.just("mlp"), index),
    st.builds(labels.HeadInput, head, st.sampled_from(labels.HEAD_INPUTS)),
    st.builds(labels.HeadInput, st.builds(Head, index, index, st.just(True)),
              st.sampled_from(("k", "v"))))


@given(st.builds(labels.EdgeLabel, edge_sender, edge_receiver))
def test_every_edge_parses_what_it_formats(edge):
    assert labels.parse_edge(labels.format_edge(edge)) == edge


@given(st.text(max_size=30))
def test_any_text_is_an_edge_that_formats_back_or_a_label_error(text):
    try:
        edge = labels.parse_edge(text)
    except LabelError as exc:
        assert "is not an edge" in str(exc) or "belong to query heads" in str(exc)
    else:
        assert labels.parse_edge(labels.format_edge(edge)) == edge


@pytest.mark.parametrize("text, sender, receiver", [
    ("L0H1 -> L1H2:k", Head(0, 1), labels.HeadInput(Head(1, 2), "k")),
    ("mlp3 -> L5H0:q", LayerPart("mlp", 3), labels.HeadInput(Head(5, 0), "q")),
    ("embed -> mlp0", "embed", LayerPart("mlp", 0)),
    ("L9H9 -> logits", Head(9, 9), "logits"),
    ("L0H0 -> L1KV1:v", Head(0, 0), labels.HeadInput(Head(1, 1, kv=True), "v")),
])
def test_each_edge_form(text, sender, receiver):
    assert labels.parse_edge(text) == labels.EdgeLabel(sender, receiver)
    assert labels.format_edge(labels.parse_edge(text)) == text


@pytest.mark.parametrize("text, message", [
    ("L0H1->L1H2:k", "is not an edge; an edge is 'SENDER -> RECEIVER'"),
    ("L0H1 -> L1H2", "'L1H2' is not an edge receiver; write L{layer}H{head}:q|k|v"),
    ("L0KV1 -> logits", "'L0KV1' is not an edge sender"),
    ("logits -> mlp0", "'logits' is not an edge sender"),
    ("L0H0 -> L1KV0:q", "q inputs belong to query heads; write L1H{head}:q"),
    ("L0H0 -> L1H0:x", "is not an edge receiver"),
    ("L0H0 -> embed", "'embed' is not an edge receiver"),
    (["L0H0", "L1H0:q"], "is not an edge"),
])
def test_malformed_edges_say_what_to_write(text, message):
    with pytest.raises(LabelError, match=re.escape(message)):
        labels.parse_edge(text)
