"""MIB's integrated faithfulness (CPR, CMD) on curves whose areas are worked out by hand."""

from __future__ import annotations

import pytest

from harness.measure.circuit_curves import (
    MIB_SIZES,
    cmd,
    cpr,
    edge_counts,
    faithfulness,
)
from harness.measure.edge_discovery import ranking, share_count, smallest_faithful_prefix


def test_faithfulness_is_the_share_of_the_gap():
    assert faithfulness(circuit=3.0, full=4.0, empty=0.0) == 0.75
    assert faithfulness(circuit=-1.0, full=1.0, empty=-1.0) == 0.0
    assert faithfulness(circuit=2.0, full=1.0, empty=0.0) == 2.0      # overshoot is kept
    with pytest.raises(ValueError, match="differ"):
        faithfulness(1.0, 2.0, 2.0)


def test_cpr_and_cmd_of_hand_computed_curves():
    sizes = [0.1, 0.5, 1.0]
    # a perfect circuit at every size: area 0.9 under f = 1, none between f and 1
    assert cpr(sizes, [1, 1, 1]) == pytest.approx(0.9)
    assert cmd(sizes, [1, 1, 1]) == pytest.approx(0.0)
    # f rises 0 -> 1 -> 1: under = 0.4 * 0.5 + 0.5 * 1 = 0.7; from 1 = 0.4 * 0.5 = 0.2
    assert cpr(sizes, [0, 1, 1]) == pytest.approx(0.7)
    assert cmd(sizes, [0, 1, 1]) == pytest.approx(0.2)
    # overshoot counts against CMD on both sides of 1: |1 - 1.5| = 0.5 and |1 - 0.5| = 0.5
    assert cmd(sizes, [1.5, 0.5, 1]) == pytest.approx(0.4 * 0.5 + 0.5 * 0.25)
    assert cpr(sizes, [1.5, 0.5, 1]) == pytest.approx(0.4 * 1.0 + 0.5 * 0.75)


def test_a_better_method_has_higher_cpr_and_lower_cmd():
    good = [0.5, 0.8, 0.9, 0.95, 1, 1, 1, 1, 1, 1]
    bad = [0.0, 0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1, 1]
    assert cpr(MIB_SIZES, good) > cpr(MIB_SIZES, bad)
    assert cmd(MIB_SIZES, good) < cmd(MIB_SIZES, bad)


def test_edge_counts_follow_mib():
    assert edge_counts([0.001, 0.05, 1.0], 32491) == [32, 1624, 32491]


@pytest.mark.parametrize("sizes", [[0.5], [0.0, 1.0], [0.5, 1.5], [0.5, 0.2]])
def test_bad_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="size"):
        cpr(sizes, [1.0] * len(sizes))


def test_curve_length_must_match():
    with pytest.raises(ValueError, match="3 sizes but 2"):
        cmd([0.1, 0.5, 1.0], [1, 1])


# ----------------------------------------------------------------------------- discovery

def test_ranking_is_by_size_of_score():
    assert ranking([0.1, -3.0, 2.0, 0.0]) == [1, 2, 0, 3]


def test_share_keeps_at_least_one_edge():
    assert share_count(0.05, 100) == 5
    assert share_count(0.001, 100) == 1


def test_smallest_faithful_prefix_finds_the_first_size_reaching_the_target():
    # faithfulness of a prefix of n edges: 0.1 per edge, so 0.9 needs 9 edges
    def faith(edges):
        return 0.1 * len(edges)

    n, tried = smallest_faithful_prefix(list(range(20)), faith, 0.9)
    assert n == 9
    assert tried[9] >= 0.9 and tried[8] < 0.9
    assert len(tried) < 10                     # doubling + bisection, not a linear scan


def test_smallest_faithful_prefix_gives_all_edges_when_the_target_is_out_of_reach():
    n, tried = smallest_faithful_prefix(list(range(5)), lambda edges: 0.0, 0.9)
    assert n == 5 and tried[5] == 0.0
