"""MIB's integrated faithfulness (Mueller et al., ICML 2025): a circuit method judged over many
circuit sizes at once instead of at one threshold someone picked.

A curve is the faithfulness of the top-k edges, f(k) = (m(C_k) - m(empty)) / (m(full) -
m(empty)), at circuit sizes k given as fractions of all edges. CPR (circuit performance ratio,
higher is better) is the area under f; CMD (circuit-model distance, 0 is best) the area between f
and 1, counting both sides. Both are trapezoid areas over the sizes on a linear axis, as MIB's
evaluation code computes them. Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIB_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def faithfulness(circuit: float, full: float, empty: float) -> float:
    """The share of the full model's metric the circuit keeps above the all-ablated run."""
    gap = full - empty
    if gap == 0 or not math.isfinite(gap):
        raise ValueError(f"faithfulness needs the full model ({full:g}) and the all-ablated run "
                         f"({empty:g}) to differ")
    return (circuit - empty) / gap


def edge_counts(sizes: Sequence[float], n_edges: int) -> list[int]:
    """How many top edges each size keeps: int(size * n_edges), as MIB counts them."""
    check_sizes(sizes)
    return [int(s * n_edges) for s in sizes]


def check_sizes(sizes: Sequence[float]) -> None:
    if len(sizes) < 2:
        raise ValueError("an integrated faithfulness needs at least two circuit sizes")
    if any(not 0 < s <= 1 for s in sizes):
        raise ValueError(f"circuit sizes are fractions of all edges, in (0, 1]: got {list(sizes)}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"circuit sizes must increase: got {list(sizes)}")


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return sum((x2 - x1) * (y1 + y2) / 2 for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:]))


def cpr(sizes: Sequence[float], faithfulness_curve: Sequence[float]) -> float:
    """Area under the faithfulness curve over the sizes (higher is better)."""
    _check_curve(sizes, faithfulness_curve)
    return _trapezoid(sizes, faithfulness_curve)


def cmd(sizes: Sequence[float], faithfulness_curve: Sequence[float]) -> float:
    """Area between the faithfulness curve and 1 over the sizes (0 is best)."""
    _check_curve(sizes, faithfulness_curve)
    return _trapezoid(sizes, [abs(1 - f) for f in faithfulness_curve])


def _check_curve(sizes: Sequence[float], curve: Sequence[float]) -> None:
    check_sizes(sizes)
    if len(curve) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes but {len(curve)} faithfulness values")
