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



# ----------------------------------------------------------------------------- on the model

def edge_pairs(graph) -> list[tuple[int, int]]:
    """(sender index, receiver index) of every edge, in the graph's edge order."""
    return [(graph.sender_index[e.sender], graph.receiver_index[e.receiver])
            for e in graph.edges]


def scores_by_edge(graph, scores) -> list[float]:
    """A [sender, receiver] score tensor as one score per edge, in the graph's edge order."""
    table = scores.detach().cpu().tolist()
    return [table[s][r] for s, r in edge_pairs(graph)]


def circuit_weights(graph, circuits: list[list[int]]):
    """[variant, sender, receiver] weights: 1 on each circuit's edges (indices into
    graph.edges), 0 elsewhere."""
    import torch

    pairs = edge_pairs(graph)
    weights = torch.zeros(len(circuits), len(graph.senders), len(graph.receivers))
    for v, circuit in enumerate(circuits):
        if circuit:
            s, r = zip(*(pairs[i] for i in circuit))
            weights[v, list(s), list(r)] = 1.0
    return weights


def circuit_logit_diffs(ef, clean, ablated, weights, final_pos, answer_ids, foil_ids,
                        memory_budget_mb: float = 2048):
    """Mean logit difference of each variant's edge run ([variant]), variants in chunks that
    fit the memory budget's work share."""
    import torch

    from harness.measure.budget import WORK_SHARE, budget_bytes

    batch, n_pos = clean.shape[:2]
    g = ef.graph
    per_variant = batch * n_pos * (len(g.receivers) // max(1, g.n_layers) + 4) * \
        ef.ops.d_model * 4 * 4
    chunk = max(1, budget_bytes(memory_budget_mb, WORK_SHARE) // per_variant)
    out = []
    with torch.no_grad():
        for start in range(0, len(weights), chunk):
            run = ef.run(clean, ablated, weights[start:start + chunk].to(ef.ops.device))
            out.append(ef.logit_diff(run.final, final_pos, answer_ids, foil_ids).mean(1))
    return torch.cat(out).float().cpu()
