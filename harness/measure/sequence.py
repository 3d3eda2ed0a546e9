"""Sequence metrics: next-token loss and accuracy over a span of each prompt's positions.

Position t of a prompt is *scored* when the span selects it: the model's logits at t - 1 predict
token t (so the first token, BOS or not, is never scored). Spans are read per prompt, on its own
tokens, from the first text token (after BOS) to its final token:

- `all`: every text token (the first text token too when BOS is prepended);
- `second_half`: the last floor(n / 2) of its n text tokens (the repeat of a sequence written
  twice);
- `{start: a, stop: b}`: text tokens a..b-1 (Python slice: negatives count from the end);
- `{after: TOKEN}`: the tokens after the first occurrence of the marker token.

Per prompt the value is the mean over its scored positions; claims average prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from harness.errors import MeasureError
from harness.labels import SEQUENCE_METRICS


@dataclass(frozen=True)
class Span:
    """Which positions a sequence metric scores; `kind` is all / second_half / range / after."""

    kind: str = "all"
    start: int | None = None
    stop: int | None = None
    marker_id: int | None = None   # `after`: the marker token's id


def span_mask(tokens: Int[Tensor, "batch pos"], final_pos: Int[Tensor, " batch"], span: Span,
              prefix: int) -> Bool[Tensor, "batch pos"]:
    """True where a position is scored. `prefix` = 1 when BOS was prepended (not text)."""
    batch, n_pos = tokens.shape
    pos = torch.arange(n_pos)[None]
    final = final_pos.cpu()[:, None]
    first = torch.full_like(final, prefix)
    if span.kind == "all":
        lo, hi = first, final + 1
    elif span.kind == "second_half":
        n = final + 1 - first
        lo, hi = first + n - n // 2, final + 1
    elif span.kind == "range":
        n = (final + 1 - first)[:, 0].tolist()
        bounds = [slice(span.start, span.stop).indices(k)[:2] for k in n]
        lo = first + torch.tensor([b[0] for b in bounds])[:, None]
        hi = first + torch.tensor([b[1] for b in bounds])[:, None]
    elif span.kind == "after":
        is_marker = (tokens.cpu() == span.marker_id) & (pos >= first) & (pos <= final)
        found = is_marker.any(1, keepdim=True)
        lo = torch.where(found, is_marker.int().argmax(1, keepdim=True) + 1, final + 1)
        hi = final + 1
    else:
        raise MeasureError(f"unknown span kind {span.kind!r}")
    return (pos >= lo) & (pos < hi) & (pos >= 1)


def check_spans(mask: Bool[Tensor, "batch pos"], texts, span: Span) -> None:
    """Every prompt must score at least one position; name the first that does not."""
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        i = empty[0]
        why = "has no marker token" if span.kind == "after" else "is too short"
        raise MeasureError(f"prompt {i} {texts[i]!r}: the span ({describe(span)}) selects no "
                           f"position: the prompt {why}; {len(empty)} prompt(s) like this")


def describe(span: Span) -> str:
    if span.kind == "range":
        return f"tokens {span.start}..{span.stop}"
    if span.kind == "after":
        return f"after token id {span.marker_id}"
    return span.kind


def metric_of_logits(logits: Float[Tensor, "batch pos vocab"], targets: Int[Tensor, "batch pos"],
                     mask: Bool[Tensor, "batch pos"], metric: str) -> Float[Tensor, " batch"]:
    """Per-prompt mean loss (nats) or argmax accuracy over the span; reads only the scored
    positions' logits."""
    if metric not in SEQUENCE_METRICS:
        raise MeasureError(f"unknown sequence metric {metric!r}; use "
                           + " or ".join(SEQUENCE_METRICS))
    # only the scored positions: logits at t - 1 predict token t
    rows, cols = mask[:, 1:].to(logits.device).nonzero(as_tuple=True)
    scored = logits[rows, cols].float()
    wanted = targets.to(logits.device)[rows, cols + 1]
    if metric == "loss":
        values = -scored.log_softmax(-1).gather(-1, wanted[:, None])[:, 0]
    else:
        values = (scored.argmax(-1) == wanted).float()
    total = values.new_zeros(logits.shape[0]).index_add_(0, rows, values)
    count = values.new_zeros(logits.shape[0]).index_add_(0, rows, torch.ones_like(values))
    return (total / count).cpu()


def sequence_metric(bridge, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch pos"],
                    mask: Bool[Tensor, "batch pos"], metric: str, memory_budget_mb: float = 2048,
                    hooks_for=None) -> Float[Tensor, " batch"]:
    """`metric_of_logits` of the bridge on `tokens` (scored against `targets`), in prompt slices
    within the memory budget. `hooks_for(rows)` gives forward hooks for a slice."""
    from harness.measure.logits import _device, prompts_per_forward

    step = prompts_per_forward(bridge.cfg, tokens.shape[1], memory_budget_mb)
    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], step):
            rows = slice(start, start + step)
            batch_tokens = tokens[rows].to(_device(bridge))
            if hooks_for is None:
                logits = bridge(batch_tokens, return_type="logits")
            else:
                logits = bridge.run_with_hooks(batch_tokens, fwd_hooks=hooks_for(rows),
                                               return_type="logits")
            parts.append(metric_of_logits(logits, targets[rows], mask[rows], metric))
            del logits
    return torch.cat(parts)
