"""Attention claims: how much heads attend from destination to source positions chosen by a
rule, and TransformerLens's head-detector scores on generated repeated random sequences.

Everything reads `attn.hook_pattern` through the bridge's hooks (names from `harness.sites`),
so it works on every architecture the TransformerBridge loads; patterns are per query head.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from harness.errors import MeasureError, did_you_mean
from harness.measure.budget import WORK_SHARE, budget_bytes
from harness.roles import ALIASES, DETECTOR_ROLES, RULES, role_name
from harness.sites import site


def source_mask(tokens: Int[Tensor, "batch pos"], final_pos: Int[Tensor, " batch"],
                rule: str | int, token_id: int | None = None) -> Bool[Tensor, "batch dest src"]:
    """True where `src` is a source of `dest` under the rule (causal, real tokens only).

    previous: dest - 1; first/bos: position 0; self: dest; duplicate: earlier positions with
    dest's token; induction: the positions right after those (TransformerLens's head-detector
    patterns; their names are aliases, `harness.roles`); an int: that position; `token_id`:
    positions holding that token.
    """
    rule = ALIASES.get(rule, rule) if isinstance(rule, str) else rule
    batch, n = tokens.shape
    dest = torch.arange(n)[:, None]
    src = torch.arange(n)[None, :]
    same = tokens[:, :, None] == tokens[:, None, :]                       # [b, dest, src]
    if token_id is not None:
        mask = (tokens == token_id)[:, None, :].expand(batch, n, n)
    elif isinstance(rule, int) and not isinstance(rule, bool):
        mask = (src == rule).expand(batch, n, n)
    elif rule == "previous":
        mask = (src == dest - 1).expand(batch, n, n)
    elif rule in ("first", "bos"):
        mask = (src == 0).expand(batch, n, n)
    elif rule == "self":
        mask = (src == dest).expand(batch, n, n)
    elif rule == "duplicate":
        mask = same & (src < dest)
    elif rule == "induction":
        shifted = torch.zeros_like(same)
        shifted[:, :, 1:] = same[:, :, :-1] & (src[:, :-1] < dest)       # src - 1 is a duplicate
        mask = shifted
    else:
        raise MeasureError(f"unknown attention source {rule!r}" + did_you_mean(str(rule), RULES)
                           + " (names: docs/spec-format.md, `harness.roles`)")
    real = torch.arange(n)[None, :] <= final_pos[:, None]                 # [b, pos]
    return mask & (src <= dest) & real[:, :, None] & real[:, None, :]


def pattern_slices(bridge, tokens: Int[Tensor, "batch pos"], layers: list[int],
                   memory_budget_mb: float = 2048
                   ) -> Iterator[tuple[slice, Float[Tensor, "layer batch head dest src"]]]:
    """Attention patterns of the given layers, one prompt slice at a time (the rows it covers
    and its patterns), each slice sized to the budget with room for a reduction's temporaries:
    callers reduce a slice before the next is made, so the patterns of all prompts are never
    held at once."""
    names = [site("pattern").hook_name(layer) for layer in layers]
    n = tokens.shape[1]
    per_prompt = 4 * len(layers) * bridge.cfg.n_heads * n * n * 3 + 1
    step = max(1, budget_bytes(memory_budget_mb, WORK_SHARE) // per_prompt)
    device = next(bridge.parameters()).device
    for start in range(0, tokens.shape[0], step):
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(tokens[start:start + step].to(device),
                                             names_filter=lambda name: name in names)
            pattern = torch.stack([cache[name].float().cpu() for name in names])
            del cache
        yield slice(start, start + step), pattern


def attention_scores(bridge, tokens: Int[Tensor, "batch pos"], final_pos: Int[Tensor, " batch"],
                     rule: str | int, token_id: int | None = None, layers: list[int] | None = None,
                     memory_budget_mb: float = 2048, texts=None
                     ) -> Float[Tensor, "layer head batch"]:
    """Attention from each eligible destination to its sources (summed), averaged over the
    eligible destinations of each prompt: those with at least one source under the rule."""
    layers = list(range(bridge.cfg.n_layers)) if layers is None else list(layers)
    mask = source_mask(tokens.cpu(), final_pos.cpu(), rule, token_id)
    eligible = mask.any(-1)                                              # [b, dest]
    empty = (~eligible.any(-1)).nonzero().flatten().tolist()
    if empty:
        shown = repr(texts[empty[0]]) if texts else f"#{empty[0]}"
        what = f"token id {token_id}" if token_id is not None else f"source '{rule}'"
        raise MeasureError(f"prompt {shown} has no position with a {what} to attend to; "
                           "use prompts where the rule applies (e.g. a repeated word for "
                           "duplicate/induction)")
    parts = []
    for rows, pattern in pattern_slices(bridge, tokens, layers, memory_budget_mb):  # [L,b,h,d,s]
        to_sources = (pattern * mask[None, rows, None]).sum(-1)          # [L, b, h, dest]
        live = eligible[None, rows, None]
        parts.append((to_sources * live).sum(-1) / live.sum(-1))         # [L, b, h]
    return torch.cat(parts, 1).permute(0, 2, 1)


def repeated_random_tokens(vocab: Int[Tensor, " n"], length: int, count: int, seed: int,
                           bos: int | None) -> Int[Tensor, "count pos"]:
    """`count` rows of [BOS,] a seeded random sequence of `length` tokens, the same again."""
    gen = torch.Generator().manual_seed(seed)
    seq = vocab[torch.randint(len(vocab), (count, length), generator=gen)]
    parts = ([torch.full((count, 1), bos, dtype=torch.long)] if bos is not None else [])
    return torch.cat(parts + [seq, seq], 1)


def head_detector_scores(bridge, tokens: Int[Tensor, "batch pos"], role: str, *,
                         exclude_bos: bool = False, exclude_current_token: bool = False,
                         memory_budget_mb: float = 2048) -> Float[Tensor, "layer head batch"]:
    """TransformerLens `detect_head(..., error_measure="mul")` per sequence: the share of all
    attention (every destination row) that falls on the role's detection pattern."""
    try:
        role = role_name(role, DETECTOR_ROLES, "head role")
    except ValueError as exc:
        raise MeasureError(str(exc)) from None
    n = tokens.shape[1]
    keep = torch.ones(n, n)
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        keep = keep * (1 - torch.eye(n))
    parts = []
    layers = list(range(bridge.cfg.n_layers))
    for rows, pattern in pattern_slices(bridge, tokens, layers, memory_budget_mb):
        part = tokens[rows].cpu()
        mask = source_mask(part, torch.full((part.shape[0],), n - 1), role).float()
        kept = pattern * keep
        parts.append((kept * mask[None, :, None]).sum((-1, -2)) / kept.sum((-1, -2)))
        del kept, pattern
    return torch.cat(parts, 1).permute(0, 2, 1)                              # [L, h, b]
