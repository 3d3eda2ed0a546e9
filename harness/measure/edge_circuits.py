"""Edge circuits and exact edge scores on the edge forward (`edge_forward.py`).

Ablations of senders: `zero` (every ablated edge carries 0), `mean` (the sender's mean output
over the reference prompts' real positions), `resample` (a reference prompt's output, drawn per
prompt), `corrupt` (the sender's output on the prompt's corrupt text). A circuit is a set of
edges; every configuration a circuit metric needs (model, all ablated, the circuit, the circuit
and the model without each edge) is one weight matrix, and the configurations run as variants
stacked along the batch, in chunks that fit the memory budget. `exact_edge_scores` runs the
clean input once per edge with only that edge carrying the ablated output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from harness.edge_graph import Edge
from harness.errors import MeasureError
from harness.measure.circuits import CircuitScores, real_positions
from harness.measure.edge_forward import EdgeForward
from harness.progress import steps

ABLATIONS = ("zero", "mean", "resample", "corrupt")
METRICS = ("logit_diff", "loss", "kl")


def ablated_outputs(ef: EdgeForward, kind: str, tokens: Tensor, *,
                    corrupt_tokens: Tensor | None = None, ref_tokens: Tensor | None = None,
                    ref_final_pos: Tensor | None = None, draw: Sequence[int] | None = None
                    ) -> Float[Tensor, "b pos sender d_model"]:
    """What every ablated edge carries from each sender, broadcastable to [batch, pos, ...]."""
    if kind == "zero":
        return ef.zero_outputs()
    if kind == "corrupt":
        if corrupt_tokens is None:
            raise MeasureError("`kind: corrupt` needs the prompts' `corrupt:` texts")
        return ef.outputs(ef.trace(corrupt_tokens))
    if kind not in ABLATIONS or ref_tokens is None:
        raise MeasureError(f"`kind: {kind}` needs `reference:` prompts")
    ref = ef.outputs(ef.trace(ref_tokens))
    if kind == "mean":
        return ef.mean_outputs(ref, real_positions(ref_tokens, ref_final_pos))
    if ref_tokens.shape[1] != tokens.shape[1]:
        raise MeasureError(f"resample ablation needs reference prompts of the same token length "
                           f"as the claim's prompts ({ref_tokens.shape[1]} vs {tokens.shape[1]} "
                           "tokens): write reference prompts with as many tokens, or use "
                           "`kind: mean`")
    return ref[torch.tensor(list(draw), device=ref.device)]


def weights_keeping(ef: EdgeForward, kept: Sequence[set[Edge] | None]
                    ) -> Float[Tensor, "variant sender receiver"]:
    """One weight matrix per configuration: 1 on its kept edges (None: every edge), else 0."""
    g = ef.graph
    w = torch.zeros(len(kept), len(g.senders), len(g.receivers), dtype=ef.ops.dtype)
    for i, edges in enumerate(kept):
        if edges is None:
            w[i] = 1
            continue
        for e in edges:
            w[i, g.sender_index[e.sender], g.receiver_index[e.receiver]] = 1
    return w


def _chunk(ef: EdgeForward, batch: int, n_pos: int, memory_budget_mb: float) -> int:
    """Variants per forward: a generous estimate of one variant's live tensors."""
    g, ops = ef.graph, ef.ops
    width = g.n_heads + 2 * g.n_kv_heads + 2
    per_variant = batch * n_pos * (len(g.senders) * ops.d_model * 2
                                   + width * (ops.d_model + 3 * g.n_heads * 64) + ops.d_mlp)
    per_variant *= torch.empty((), dtype=ops.dtype).element_size()
    return max(1, int(memory_budget_mb * 2**20 * 0.25 // per_variant))


def metric_values(ef: EdgeForward, final: Tensor, batch, metric: str,
                  clean_logits: Tensor | None = None) -> Float[Tensor, "variant batch"]:
    """Each variant's metric per prompt at the final position: logit_diff (answer − foil),
    loss (−log p(answer)), kl (KL(clean ‖ variant) of the next-token distributions)."""
    if metric == "logit_diff":
        return ef.logit_diff(final, batch.final_pos, batch.answer_ids, batch.foil_ids).float()
    logp = ef.final_logits(final, batch.final_pos).float().log_softmax(-1)
    if metric == "loss":
        answer = batch.answer_ids.to(logp.device)
        return -logp[:, torch.arange(logp.shape[1], device=logp.device), answer]
    if metric == "kl":
        clean = clean_logits.float().log_softmax(-1)
        return (clean.exp() * (clean - logp)).sum(-1)
    raise MeasureError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def configuration_metrics(ef: EdgeForward, clean: Tensor, ablated: Tensor,
                          weights, batch, metric: str = "logit_diff",
                          memory_budget_mb: float = 2048, clean_logits: Tensor | None = None,
                          desc: str = "edge configurations") -> Float[Tensor, "variant batch"]:
    """The metric of every weight configuration, variants stacked along the batch. `weights`:
    a [variant, sender, receiver] tensor, or (n, build) where build(start, stop) makes the
    weights of variants start..stop-1 (so a graph's every edge needs no n x S x R tensor)."""
    n, build = (len(weights), lambda a, b: weights[a:b]) if isinstance(weights, Tensor) \
        else weights
    n_batch, n_pos = clean.shape[:2]
    per = _chunk(ef, n_batch, n_pos, memory_budget_mb)
    out = []
    done = steps(n, desc)
    with torch.no_grad():
        for start in range(0, n, per):
            w = build(start, min(n, start + per))
            run = ef.run(clean, ablated, w)
            out.append(metric_values(ef, run.final, batch, metric, clean_logits).cpu())
            done(len(w))
    return torch.cat(out)


def edge_circuit_scores(ef: EdgeForward, clean: Tensor, ablated: Tensor, batch,
                        members: Sequence[Edge], memory_budget_mb: float = 2048
                        ) -> CircuitScores:
    """Every configuration faithfulness, minimality and completeness need, as circuits.py's
    node version: model, all ablated, circuit, circuit minus each edge, nothing (last of
    those), model minus each edge, model minus the circuit — logit differences per prompt."""
    circuit = set(members)
    full = set(ef.graph.edges)
    kept: list[set[Edge] | None] = [None, set(), circuit]
    kept += [circuit - {m} for m in members] + [set()]
    kept += [full - {m} for m in members] + [full - circuit]
    diffs = configuration_metrics(ef, clean, ablated, weights_keeping(ef, kept), batch,
                                  "logit_diff", memory_budget_mb)
    n = len(members)
    return CircuitScores(model=diffs[0], ablated=diffs[1], circuit=diffs[2],
                         without=diffs[3:4 + n], model_without=diffs[4 + n:])


def exact_edge_scores(ef: EdgeForward, clean: Tensor, ablated: Tensor, batch,
                      metric: str = "logit_diff", memory_budget_mb: float = 2048
                      ) -> tuple[Float[Tensor, "edge batch"], Float[Tensor, " batch"]]:
    """Each edge's effect per prompt: the metric with only that edge ablated (carrying the
    ablated output) minus the clean metric; and the clean metric."""
    g = ef.graph
    edges = g.edges
    with torch.no_grad():
        clean_run = ef.run(clean, ablated, ef.ones())
        clean_logits = ef.final_logits(clean_run.final, batch.final_pos)[0] \
            if metric == "kl" else None
        base = metric_values(ef, clean_run.final, batch, metric, clean_logits)[0].cpu()
    senders = torch.tensor([g.sender_index[e.sender] for e in edges])
    receivers = torch.tensor([g.receiver_index[e.receiver] for e in edges])

    def only_edge_ablated(start: int, stop: int) -> Tensor:
        w = torch.ones(stop - start, len(g.senders), len(g.receivers), dtype=ef.ops.dtype)
        w[torch.arange(stop - start), senders[start:stop], receivers[start:stop]] = 0
        return w

    values = configuration_metrics(ef, clean, ablated, (len(edges), only_edge_ablated), batch,
                                   metric, memory_budget_mb, clean_logits, "edges")
    return values - base, base
