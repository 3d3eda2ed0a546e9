"""Behavioral measurements read from the output logits: logit difference, top-k, generation."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness.prompts import PromptBatch


def final_logits(bridge, tokens: Int[Tensor, "batch pos"],
                 final_pos: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's own final token (right padding cannot reach it)."""
    with torch.inference_mode():
        logits = bridge(tokens.to(_device(bridge)), return_type="logits")
    rows = torch.arange(tokens.shape[0], device=logits.device)
    return logits[rows, final_pos.to(logits.device)].float().cpu()


def logit_diff(bridge, batch: PromptBatch) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(foil) at the final position, per prompt."""
    logits = final_logits(bridge, batch.tokens, batch.final_pos)
    rows = torch.arange(logits.shape[0])
    return logits[rows, batch.answer_ids] - logits[rows, batch.foil_ids]


def top_k_tokens(bridge, tokenizer, batch: PromptBatch, k: int) -> list[list[tuple[str, float]]]:
    """The k most likely next tokens per prompt, with their probabilities."""
    probs = final_logits(bridge, batch.tokens, batch.final_pos).softmax(-1)
    top = probs.topk(k, dim=-1)
    return [[(tokenizer.decode([int(i)]), float(p)) for i, p in zip(ids, ps)]
            for ids, ps in zip(top.indices, top.values)]


def generate(bridge, tokenizer, tokens: Int[Tensor, " pos"], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
             hooks_for=None) -> str:
    """Greedy (temperature 0) or seeded sampling continuation of one prompt; returns the
    prompt text plus the continuation, without special tokens. `hooks_for(tokens)` gives
    forward hooks applied at every step (generation while patching)."""
    generator = torch.Generator().manual_seed(seed)
    ids = tokens.tolist()
    n_ctx = bridge.cfg.n_ctx
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-n_ctx:]], device=_device(bridge))
            if hooks_for is None:
                logits = bridge(window, return_type="logits")
            else:
                logits = bridge.run_with_hooks(window, fwd_hooks=hooks_for(window),
                                               return_type="logits")
            logits = logits[0, -1].float().cpu()
            if temperature > 0:
                next_id = int(torch.multinomial((logits / temperature).softmax(-1), 1,
                                                generator=generator))
            else:
                next_id = int(logits.argmax())
            ids.append(next_id)
            if stop_at_eos and next_id == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _device(bridge) -> torch.device:
    return next(bridge.parameters()).device
