"""Turning per-edge scores into a circuit: the top N edges, a share of all edges, or the
smallest prefix of the ranking that reaches a faithfulness target. Pure: the scores come from
`edge_attribution.py` (or exact patching), faithfulness from a function the caller passes.

Edges are ranked by the size of their score (MIB's `absolute` default): an edge whose patch
pushes the metric either way matters to the behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def ranking(scores: Sequence[float]) -> list[int]:
    """Edge indices by |score|, largest first; ties keep graph order (stable)."""
    return sorted(range(len(scores)), key=lambda i: -abs(scores[i]))


def share_count(share: float, n_edges: int) -> int:
    """How many edges a share of all edges keeps (at least one)."""
    return max(1, int(share * n_edges))


def smallest_faithful_prefix(order: Sequence[int], faithfulness: Callable[[list[int]], float],
                             target: float) -> tuple[int, dict[int, float]]:
    """The fewest top-ranked edges whose circuit is at least `target` faithful: prefix sizes
    doubling (1, 2, 4, ...) until one reaches it, then bisection inside the last doubling.
    Assumes faithfulness grows with the prefix, which a ranking of true effects makes nearly
    so; every size tried is returned (size -> faithfulness) for the report. A ranking that
    never reaches the target returns all edges."""
    tried: dict[int, float] = {}

    def faithful(n: int) -> bool:
        if n not in tried:
            tried[n] = faithfulness(list(order[:n]))
        return tried[n] >= target

    n_all = len(order)
    low, high = 0, 1
    while not faithful(high):
        if high == n_all:
            return n_all, tried
        low, high = high, min(2 * high, n_all)
    while high - low > 1:            # faithful(high), not faithful(low) (or low == 0)
        mid = (low + high) // 2
        if faithful(mid):
            high = mid
        else:
            low = mid
    return high, tried

