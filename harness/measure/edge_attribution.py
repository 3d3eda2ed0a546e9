"""Scoring every edge at once from gradients: EAP and EAP-IG, on the edge forward.

EAP (edge attribution patching; Syed et al. 2023) estimates the effect of patching one edge
u -> v, the sender's corrupt-run output in place of its clean one on that edge only, by its
first-order Taylor term at the clean run:

    score(u -> v) = Σ_pos (out_u(corrupt) − out_u(clean)) · ∂metric/∂input_v (clean run)

one forward and one backward pass for all edges. EAP-IG (Hanna et al. 2024) replaces the
gradient by its average over `steps` runs whose input embeddings lie on the straight line from
the corrupt prompt's to the clean one's (k / steps of the way, k = 1..steps: one step is EAP),
which follows the metric where it is flat at the clean run (a KL to the clean run has
zero gradient there).

Receiver input gradients come from the edge forward's input hook (`edge_forward.py`): each
receiver's rebuilt input gets a zero tensor that requires grad. Scores are summed over
prompts in slices sized by the memory budget and divided by the number of prompts, so a score
is a mean effect per prompt in the metric's units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness.errors import MeasureError
from harness.measure.budget import WORK_SHARE, budget_bytes

METRICS = ("logit_diff", "loss", "kl")   # as edge_circuits.METRICS
METHODS = ("eap", "eap-ig")


@dataclass(frozen=True)
class Prompts:
    """What scoring reads of a claim's prompts: clean and corrupt tokens of equal shape, the
    final position of each row and its answer and foil tokens."""

    clean: Int[Tensor, "batch pos"]
    corrupt: Int[Tensor, "batch pos"]
    final_pos: Int[Tensor, " batch"]
    answer_ids: Int[Tensor, " batch"]
    foil_ids: Int[Tensor, " batch"]

    def rows(self, rows: slice) -> Prompts:
        return Prompts(*(t[rows] for t in (self.clean, self.corrupt, self.final_pos,
                                          self.answer_ids, self.foil_ids)))


Metric = Callable[[Float[Tensor, "variant batch pos d_model"]], Float[Tensor, ""]]


def metric_fn(ef, name: str, prompts: Prompts, clean_final: Tensor | None = None) -> Metric:
    """The metric summed over the slice's prompts, as a function of an edge run's final
    residual: the logit difference (answer − foil), the answer's loss (−log p), or the KL
    divergence of the run's next-token distribution from the clean run's (`clean_final`)."""
    if name == "logit_diff":
        return lambda final: ef.logit_diff(final, prompts.final_pos, prompts.answer_ids,
                                           prompts.foil_ids).sum()
    if name == "loss":
        def loss(final):
            logp = ef.final_logits(final, prompts.final_pos).log_softmax(-1)
            answer = prompts.answer_ids.to(logp.device)
            return -logp.gather(-1, answer.expand(logp.shape[0], -1)[..., None]).sum()
        return loss
    if name == "kl":
        assert clean_final is not None
        with torch.no_grad():
            ref = ef.final_logits(clean_final, prompts.final_pos).log_softmax(-1)

        def kl(final):
            logp = ef.final_logits(final, prompts.final_pos).log_softmax(-1)
            return (ref.exp() * (ref - logp)).sum()
        return kl
    raise MeasureError(f"unknown edge metric {name!r}; one of {', '.join(METRICS)}")


def receiver_gradients(ef, embed: Float[Tensor, "batch pos 1 d_model"], metric: Metric
                       ) -> Float[Tensor, "batch pos receiver d_model"]:
    """∂metric/∂input_v for every receiver v, on the model's own forward from these input
    embeddings (every edge kept, so nothing is ablated)."""
    g = ef.graph
    taps: list[Tensor] = []

    def tap(layer: int, group: str, x: Tensor) -> Tensor:
        zero = torch.zeros_like(x, requires_grad=True)
        taps.append(zero)
        return x + zero

    with torch.enable_grad():
        run = ef.run(embed, ef.zero_outputs(), None, input_hook=tap)
        grads = torch.autograd.grad(metric(run.final), taps, allow_unused=True)
    parts = []
    for zero, grad in zip(taps, grads):
        grad = torch.zeros_like(zero) if grad is None else grad
        grad = grad[0]                                     # the one variant
        parts.append(grad if grad.dim() == 4 else grad[:, :, None])
    out = torch.cat(parts, 2)
    assert out.shape[2] == len(g.receivers), (out.shape, len(g.receivers))
    return out


def edge_scores_from(diff: Float[Tensor, "batch pos sender d_model"],
                     grad: Float[Tensor, "batch pos receiver d_model"], upstream: Tensor
                     ) -> Float[Tensor, "batch sender receiver"]:
    """Σ_pos diff_u · grad_v for every pair and prompt, zero where u is not upstream of v."""
    scores = torch.einsum("bpsd,bprd->bsr", diff.float(), grad.float())
    return scores * upstream


def upstream_mask(graph) -> Tensor:
    """[sender, receiver]: 1 where the edge exists (senders are the first n of each receiver)."""
    mask = torch.zeros(len(graph.senders), len(graph.receivers))
    for r, node in enumerate(graph.receivers):
        mask[: graph.n_upstream(node), r] = 1
    return mask


def prompts_per_slice(ef, n_pos: int, memory_budget_mb: float) -> int:
    """How many prompts one forward + backward may hold: every receiver's input and what the
    norms and projections keep of it for the backward pass (about 8 copies, float32)."""
    g = ef.graph
    per_prompt = n_pos * len(g.receivers) * ef.ops.d_model * 4 * 8
    return max(1, budget_bytes(memory_budget_mb, WORK_SHARE) // per_prompt)


def attribution_scores(ef, prompts: Prompts, method: str = "eap", steps: int = 5,
                       metric: str = "logit_diff", memory_budget_mb: float = 2048,
                       progress=None) -> Float[Tensor, "sender receiver"]:
    """EAP or EAP-IG scores of every edge, [sender, receiver] in graph order (zero where no
    edge), each the mean over prompts of the estimated change of `metric` when that edge
    alone carries its sender's corrupt-run output."""
    return attribution_effects(ef, prompts, method, steps, metric, memory_budget_mb,
                               progress).mean(0)


def attribution_effects(ef, prompts: Prompts, method: str = "eap", steps: int = 5,
                        metric: str = "logit_diff", memory_budget_mb: float = 2048,
                        progress=None) -> Float[Tensor, "batch sender receiver"]:
    """`attribution_scores` per prompt."""
    if method not in METHODS:
        raise MeasureError(f"unknown attribution method {method!r}; one of {', '.join(METHODS)}")
    if method == "eap-ig" and steps < 1:
        raise MeasureError(f"`steps` must be at least 1, got {steps}")
    alphas = [1.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
    n, n_pos = prompts.clean.shape
    per = prompts_per_slice(ef, n_pos, memory_budget_mb)
    upstream = upstream_mask(ef.graph).to(ef.ops.device)
    parts = []
    for start in range(0, n, per):
        part = prompts.rows(slice(start, start + per))
        clean = ef.outputs(ef.trace(part.clean.to(ef.ops.device)))
        corrupt = ef.outputs(ef.trace(part.corrupt.to(ef.ops.device)))
        clean_final = None
        if metric == "kl":
            with torch.no_grad():
                clean_final = ef.run(clean, ef.zero_outputs(), ef.ones()).final
        fn = metric_fn(ef, metric, part, clean_final)
        grad = torch.zeros(*clean.shape[:2], len(ef.graph.receivers), clean.shape[-1],
                           device=clean.device, dtype=torch.float32)
        for alpha in alphas:
            embed = corrupt[:, :, :1] + alpha * (clean[:, :, :1] - corrupt[:, :, :1])
            grad += receiver_gradients(ef, embed, fn).float()
        parts.append(edge_scores_from(corrupt - clean, grad / len(alphas), upstream).cpu())
        if progress is not None:
            progress(len(part.clean))
        del clean, corrupt, grad
    return torch.cat(parts)
