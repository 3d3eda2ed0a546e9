"""Every expectation operator, holding and not holding."""

from __future__ import annotations

import pytest
import torch

from harness.expect import OPERATORS, Measurement, evaluate, resolve_cell
from harness.measure.results import Grid


def holds(expect: dict, measurement: Measurement, defaults=None) -> bool:
    outcomes = evaluate(expect, measurement, defaults or {"atol": 1e-4, "rtol": 0.0})
    return all(o.ok for o in outcomes)


def scalar(v: float) -> Measurement:
    return Measurement("scalar", v)


GRID_LP = Grid(("layer", "pos"), ((0, 1, 2), ("<bos>", "This", " really")),
               torch.tensor([[-0.25, 0.1, 0.0], [0.0, 0.2, 0.3], [0.0, 0.05, 0.9]]))
VECTOR = Grid(("component",), (("embed", "attn0", "mlp0", "attn1", "mlp1"),),
              torch.tensor([0.1, -0.5, 0.2, 0.3, 1.5]))
HEADS = Grid(("layer", "head"), ((0, 1), (0, 1, 2)),
             torch.tensor([[0.0, 0.1, 0.0], [0.8, 0.0, 0.6]]))


@pytest.mark.parametrize("expect, value, ok", [
    ({">": 0}, 0.5, True), ({">": 0}, 0.0, False),
    ({">=": 0}, 0.0, True), ({">=": 0}, -0.1, False),
    ({"<": 1}, 0.5, True), ({"<": 1}, 1.0, False),
    ({"<=": 1}, 1.0, True), ({"<=": 1}, 1.5, False),
    ({"between": [0, 1]}, 0.5, True), ({"between": [0, 1]}, 1.5, False),
    ({"approx": 2.0, "atol": 0.1}, 2.05, True), ({"approx": 2.0, "atol": 0.01}, 2.05, False),
    ({"approx": 100.0, "rtol": 0.01, "atol": 0}, 100.5, True),
    ({"approx": 100.0, "rtol": 0.001, "atol": 0}, 100.5, False),
    ({"sign": "positive"}, 0.1, True), ({"sign": "positive"}, -0.1, False),
    ({"sign": "negative"}, -0.1, True), ({"sign": "negative"}, 0.1, False),
    ({">": 0, "<": 1}, 0.5, True), ({">": 0, "<": 1}, 1.5, False),
])
def test_scalar_operators(expect, value, ok):
    assert holds(expect, scalar(value)) is ok


def test_margin_is_distance_to_the_boundary():
    (outcome,) = evaluate({">": 1.0}, scalar(0.25), {})
    assert not outcome.ok and outcome.margin == pytest.approx(-0.75)
    (outcome,) = evaluate({"<": 1.0}, scalar(0.25), {})
    assert outcome.ok and outcome.margin == pytest.approx(0.75)


@pytest.mark.parametrize("raw, src, dst, ok", [
    (0.5, 2.0, -0.1, True),     # patched takes from's sign
    (-0.05, 2.0, -0.1, False),  # still into's sign
    (0.5, 2.0, 0.1, False),     # from and into agree: nothing to flip
])
def test_flips_sign(raw, src, dst, ok):
    m = Measurement("patch", 0.3, extras={"raw": raw, "from": src, "into": dst})
    assert holds({"flips_sign": True}, m) is ok


@pytest.mark.parametrize("expect, value, ok", [
    ({"contains": " bad"}, "This movie was really bad.", True),
    ({"contains": " bad"}, "This movie was really good.", False),
    ({"not_contains": "bad bad"}, "really bad. The acting was awful.", True),
    ({"not_contains": "bad bad"}, "really bad bad bad", False),
    ({"equals": "abc"}, "abc", True), ({"equals": "abc"}, "abd", False),
])
def test_text_operators(expect, value, ok):
    assert holds(expect, Measurement("text", value)) is ok


@pytest.mark.parametrize("expect, ok", [
    ({"includes": [" bad"]}, True), ({"includes": [" bad", " fun"]}, False),
    ({"excludes": [" fun"]}, True), ({"excludes": [" good"]}, False),
    ({"equals": [" bad", " good"]}, True), ({"equals": [" good", " bad"]}, False),
])
def test_token_operators(expect, ok):
    assert holds(expect, Measurement("tokens", [" bad", " good"])) is ok


@pytest.mark.parametrize("expect, ok", [
    ({"argmax": {"layer": 2, "pos": -1}}, True),
    ({"argmax": {"layer": 2, "pos": " really"}}, True),
    ({"argmax": {"layer": 1, "pos": -1}}, False),
    ({"argmin": {"layer": 0, "pos": 0}}, True),
    ({"argmin": {"layer": 2, "pos": 2}}, False),
    ({"top": {"k": 2, "equals": [{"layer": 2, "pos": 2}, {"layer": 1, "pos": 2}]}}, True),
    ({"top": {"k": 2, "equals": [{"layer": 2, "pos": 2}]}}, False),
    ({"top": {"k": 3, "includes": [{"layer": 1, "pos": 1}]}}, True),
    ({"top": {"k": 1, "includes": [{"layer": 1, "pos": 1}]}}, False),
    ({"only_above": {"threshold": 0.25, "cells": [{"layer": 2, "pos": -1},
                                                  {"layer": 1, "pos": -1}]}}, True),
    ({"only_above": {"threshold": 0.25, "cells": [{"layer": 2, "pos": -1}]}}, False),
    ({"max": {">=": 0.8}}, True), ({"max": {">=": 0.95}}, False),
    ({"min": {">=": -0.25}}, True), ({"min": {">": -0.25}}, False),
    ({"sum": {"between": [1.25, 1.35]}}, True), ({"sum": {"<": 1}}, False),
])
def test_grid_operators(expect, ok):
    assert holds(expect, Measurement("grid", GRID_LP)) is ok


@pytest.mark.parametrize("expect, ok", [
    ({"argmax": "mlp1"}, True), ({"argmax": "attn1"}, False),
    ({"argmin": "attn0"}, True), ({"argmax": 4}, True), ({"argmax": -1}, True),
    ({"top": {"k": 2, "equals": ["mlp1", "attn1"]}}, True),
    # k covering all five cells would hold whatever was measured: it fails, saying so
    ({"top": {"k": 5, "includes": ["mlp1"]}}, False),
    ({"top": {"k": 4, "includes": ["mlp1"]}}, True),
    ({"approx": [0.1, -0.5, 0.2, 0.3, 1.5]}, True),
    ({"approx": [0.1, -0.5, 0.2, 0.3, 1.6]}, False),
])
def test_vector_operators(expect, ok):
    assert holds(expect, Measurement("grid", VECTOR)) is ok


def test_top_k_over_the_whole_grid_says_it_tests_nothing():
    (outcome,) = evaluate({"top": {"k": 9, "includes": ["mlp1"]}}, Measurement("grid", VECTOR),
                          {})
    assert not outcome.ok and "takes every cell, so it tests nothing; give k < 5" in outcome.detail


@pytest.mark.parametrize("expect", [
    {"argmax": "mlp0"}, {"argmin": "mlp0"}, {"top": {"k": 1, "includes": ["mlp0"]}},
    {"only_above": {"threshold": 0.0, "cells": []}},
])
def test_a_grid_with_broken_cells_ranks_nothing(expect):
    """A diverged model's all-NaN grid: torch ranks NaN first, so `argmax: mlp0` (its first
    cell) used to pass; every ranking now fails and says why."""
    nan = Grid(("layer",), (("mlp0", "mlp1", "mlp2"),), torch.full((3,), float("nan")))
    (outcome,) = evaluate(expect, Measurement("grid", nan), {})
    assert not outcome.ok and "3 of 3 cells are not finite" in outcome.detail
    inf = Grid(nan.axes, nan.labels, torch.tensor([0.1, float("inf"), 0.3]))
    (outcome,) = evaluate(expect, Measurement("grid", inf), {})
    assert not outcome.ok and "(first: layer mlp1 = inf)" in outcome.detail


def test_head_cells_by_name():
    assert holds({"argmax": "L1H0"}, Measurement("grid", HEADS))
    assert not holds({"argmax": "L1H2"}, Measurement("grid", HEADS))
    assert holds({"top": {"k": 2, "equals": ["L1H0", "L1H2"]}}, Measurement("grid", HEADS))


def test_unknown_cell_fails_with_a_reason():
    (outcome,) = evaluate({"argmax": "mlp7"}, Measurement("grid", VECTOR), {})
    assert not outcome.ok and "mlp7" in outcome.detail and "did you mean" in outcome.detail
    with pytest.raises(ValueError, match="every axis"):
        resolve_cell(GRID_LP, {"layer": 1})


def test_grid_failure_shows_top_cells():
    (outcome,) = evaluate({"argmax": {"layer": 0, "pos": 1}}, Measurement("grid", GRID_LP), {})
    assert not outcome.ok
    assert "top cells: [layer 2, pos 2 (' really')] = 0.9" in outcome.detail


def test_same_below():
    a = Grid(("layer",), (("resid_pre0", "resid_pre1", "resid_pre2", "final"),),
             torch.tensor([0.1, 0.2, 0.3, 0.4]))
    b = Grid(a.axes, a.labels, torch.tensor([0.1, 0.2, 0.9, 1.4]))
    diff = Grid(a.axes, a.labels, b.values - a.values)
    m = Measurement("pair", diff, extras={"a": a, "b": b})
    # resid_pre2 is the output of layers 0..1: it differs, so layer 1 is the first to differ
    assert holds({"same_below": 1}, m)
    assert not holds({"same_below": 2}, m)


SAMPLES = Measurement("samples", {"texts": ["a bad film", "a bad plot", "a good film",
                                           "a bad end"], "scores": [0.9, 0.8, 0.1, 0.7]})


@pytest.mark.parametrize("expect, ok", [
    ({"rate": {"contains": " bad", ">=": 0.75}}, True),
    ({"rate": {"contains": " bad", ">": 0.75}}, False),
    ({"rate": {"not_contains": " good", "between": [0.7, 0.8]}}, True),
    ({"mean_score": {">": 0.6}}, True), ({"mean_score": {">": 0.7}}, False),
])
def test_sample_operators(expect, ok):
    assert holds(expect, SAMPLES) is ok


@pytest.mark.parametrize("measured, stored, ok", [
    (2.0, 2.00001, True), (2.0, 2.1, False),
    ({"axes": ["layer"], "labels": [[0, 1]], "values": [0.1, 0.2]},
     {"axes": ["layer"], "labels": [[0, 1]], "values": [0.1, 0.2]}, True),
    ({"axes": ["layer"], "labels": [[0, 1]], "values": [0.1, 0.2]},
     {"axes": ["layer"], "labels": [[0, 1]], "values": [0.1, 0.3]}, False),
    ("This movie was bad", "This movie was bad", True), ([" bad"], [" good"], False),
])
def test_baseline_operator(measured, stored, ok):
    outcome = OPERATORS["baseline"].check(measured, True, {"atol": 1e-4, "stored": stored})
    assert outcome.ok is ok


@pytest.mark.parametrize("expect, kind, value, own, ok", [
    ({"answer_is_top": True}, "tokens", [" bad", " good"], {"answer": " bad"}, True),
    ({"answer_is_top": True}, "tokens", [" good", " bad"], {"answer": " bad"}, False),
    ({"includes_answer": True}, "tokens", [" good", " bad"], {"answer": " bad"}, True),
    ({"includes_answer": True}, "tokens", [" good", " fun"], {"answer": " bad"}, False),
    ({"next_is_answer": True}, "text", "It was bad", {"answer": " bad", "next_token": " bad"},
     True),
    ({"next_is_answer": True}, "text", "It was good", {"answer": " bad", "next_token": " good"},
     False),
    ({"contains_answer": True}, "text", "It was", {"answer": " bad",
                                                   "continuation": " so bad"}, True),
    ({"contains_answer": True}, "text", "It was bad", {"answer": " bad",
                                                       "continuation": " good"}, False),
])
def test_answer_operators_read_the_prompts_own_answer(expect, kind, value, own, ok):
    assert holds(expect, Measurement(kind, value, extras=own)) is ok


@pytest.mark.parametrize("trust, ok", [
    ({"p_value": 0.0099, "percentile": 100.0, "random": 100}, True),
    ({"p_value": 0.01, "percentile": 99.0, "random": 100}, True),
    ({"p_value": 0.0198, "percentile": 99.0, "random": 100}, False),
    ({}, False),                      # no `against`: nothing says the value beats chance
])
def test_significant_reads_the_p_value_against_chance(trust, ok):
    assert holds({"significant": 0.01}, Measurement("scalar", 1.0, extras={"trust": trust})) \
        is ok


def test_every_operator_is_tested():
    tested = {">", ">=", "<", "<=", "between", "approx", "sign", "flips_sign", "contains",
              "not_contains", "equals", "includes", "excludes", "argmax", "argmin", "top",
              "only_above", "max", "min", "sum", "same_below", "rate", "mean_score",
              "baseline", "answer_is_top", "includes_answer", "next_is_answer",
              "contains_answer", "significant"}
    assert set(OPERATORS) == tested
