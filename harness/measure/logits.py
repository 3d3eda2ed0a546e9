"""Behavioral measurements read from the final-position logits: logit difference, top-k.
(Generation is in generation.py.)"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness import progress
from harness.measure.budget import SLICE_SHARE, WORK_SHARE, budget_bytes
from harness.prompts import PromptBatch


def read_final_logits(bridge, tokens: Int[Tensor, "batch pos"], final_pos: Int[Tensor, " batch"],
                      read, memory_budget_mb: float = 2048, *,
                      share: float = SLICE_SHARE + WORK_SHARE, hooks_for=None
                      ) -> Tensor | tuple[Tensor, ...]:
    """`read(logits, rows)` of the logits at each prompt's own final token, for all prompts.

    Prompts go through the model in slices whose full logits and activations fit `share` of the
    budget; `read` gets each slice's final-token logits [rows, vocab] (float32, on the CPU) and
    the slice, and returns a tensor (or tuple of tensors) with the prompts first; the slices are
    joined. `hooks_for(rows)` gives forward hooks for a slice (patching through the bridge).
    """
    step = prompts_per_forward(bridge.cfg, tokens.shape[1], memory_budget_mb, share)
    parts = []
    done = progress.steps(tokens.shape[0], "prompts") if tokens.shape[0] > step else None
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], step):
            rows = slice(start, start + step)
            slice_tokens = tokens[rows].to(_device(bridge))
            slice_final = final_pos[rows].to(slice_tokens.device)
            if hooks_for is None:
                final = final_logits(bridge, slice_tokens, slice_final)
            else:
                logits = bridge.run_with_hooks(slice_tokens, fwd_hooks=hooks_for(rows),
                                               return_type="logits")
                final = _at(logits, slice_final)
                del logits
            parts.append(read(final.float().cpu(), rows))
            if done is not None:
                done(len(parts[-1][0]) if isinstance(parts[-1], tuple) else len(parts[-1]))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def final_logits(bridge, tokens: Int[Tensor, "batch pos"], final_pos: Int[Tensor, " batch"]
                 ) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's final position, from one forward of the HF model inside the
    bridge that projects only the final positions onto the vocabulary (`logits_to_keep`).
    The first call per bridge checks this against the bridge's own logits on two of its
    prompts (differences between tokens within 1e-5: compatibility mode may shift a row by a
    constant); a model where it does not hold keeps using the bridge."""
    direct = getattr(bridge, "_harness_direct_logits", None)
    if direct is False or not _is_hf_model(getattr(bridge, "original_model", None)):
        return _at(bridge(tokens, return_type="logits"), final_pos)
    keep = torch.unique(final_pos)
    out = bridge.original_model(tokens, logits_to_keep=keep, use_cache=False).logits
    logits = out[torch.arange(len(final_pos), device=out.device),
                 torch.searchsorted(keep, final_pos)]
    if direct is None:
        rows = check_rows(final_pos)
        reference = _at(bridge(tokens[rows], return_type="logits"), final_pos[rows])
        ok = logits.shape[1:] == reference.shape[1:] and torch.allclose(
            _centered(logits[rows].float()), _centered(reference.float()), atol=1e-5, rtol=1e-5)
        bridge._harness_direct_logits = ok
        if not ok:
            return _at(bridge(tokens, return_type="logits"), final_pos)
    return logits


def check_rows(final_pos: Int[Tensor, " batch"]) -> Tensor:
    """The prompts the one-off check of `final_logits` compares: the first and the longest
    (a bridge forward over every prompt cost ~13 s on 60 SmolLM2 prompts). With different
    final positions the direct call's choice of kept positions is checked too."""
    return torch.unique(torch.stack([final_pos.new_zeros(()), final_pos.argmax()]))


def _is_hf_model(model) -> bool:
    """Whether `model` takes HF's `logits_to_keep` (TransformerLens's native model does not)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _at(logits: Float[Tensor, "batch pos vocab"], final_pos: Int[Tensor, " batch"]
        ) -> Float[Tensor, "batch vocab"]:
    return logits[torch.arange(logits.shape[0], device=logits.device),
                  final_pos.to(logits.device)]


def _centered(logits: Tensor) -> Tensor:
    return logits - logits.mean(-1, keepdim=True)


def prompts_per_forward(cfg, n_pos: int, memory_budget_mb: float,
                        share: float = SLICE_SHARE + WORK_SHARE) -> int:
    """Prompts per forward pass: a generous estimate of its live tensors (float32 logits twice,
    the widest activations of one block) within `share` of the budget."""
    per_row = 2 * cfg.d_vocab + 4 * cfg.d_mlp + 8 * cfg.d_model + 2 * cfg.n_heads * n_pos
    return max(1, budget_bytes(memory_budget_mb, share) // (4 * n_pos * per_row))


def logit_diff_reader(answer_ids: Tensor, foil_ids: Tensor):
    """A `read` for `read_final_logits`: logit(answer) - logit(foil) per prompt."""
    def read(logits: Tensor, rows: slice) -> Tensor:
        n = torch.arange(logits.shape[0])
        return logits[n, answer_ids[rows].cpu()] - logits[n, foil_ids[rows].cpu()]

    return read


def logit_diff(bridge, batch: PromptBatch, memory_budget_mb: float = 2048
               ) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(foil) at the final position, per prompt."""
    return read_final_logits(bridge, batch.tokens, batch.final_pos,
                             logit_diff_reader(batch.answer_ids, batch.foil_ids),
                             memory_budget_mb)


def top_k_tokens(bridge, tokenizer, batch: PromptBatch, k: int,
                 memory_budget_mb: float = 2048) -> list[list[tuple[str, float]]]:
    """The k most likely next tokens per prompt, with their probabilities."""
    def read(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        top = logits.softmax(-1).topk(k, dim=-1)
        return top.values, top.indices

    values, indices = read_final_logits(bridge, batch.tokens, batch.final_pos, read,
                                        memory_budget_mb)
    return [[(tokenizer.decode([int(i)]), float(p)) for i, p in zip(ids, ps)]
            for ids, ps in zip(indices, values)]


def _device(bridge) -> torch.device:
    return next(bridge.parameters()).device
