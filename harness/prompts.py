"""Prompts -> token batches: template expansion, single-token answers, right-padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxtyping import Int

if TYPE_CHECKING:  # torch loads lazily: `harness validate` checks token lengths without it
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class PromptBatch:
    """Prompts tokenized for one model's tokenizer.

    Right padding: with causal attention and absolute positions, padding after a prompt cannot
    change anything at or before its final token, so no attention mask is needed for final-token
    metrics. `final_pos[i]` is the index of prompt i's last real token.
    """

    texts: tuple[str, ...]
    tokens: Int[Tensor, "batch pos"]
    final_pos: Int[Tensor, " batch"]
    answer_ids: Int[Tensor, " batch"]
    foil_ids: Int[Tensor, " batch"]
    corrupt_tokens: Int[Tensor, "batch pos"] | None = None
    corrupt_final_pos: Int[Tensor, " batch"] | None = None

    @property
    def same_length(self) -> bool:
        return bool((self.final_pos == self.final_pos[0]).all())

    def to(self, device: torch.device | str) -> PromptBatch:
        def move(t):
            return None if t is None else t.to(device)

        return PromptBatch(self.texts, move(self.tokens), move(self.final_pos),
                           move(self.answer_ids), move(self.foil_ids),
                           move(self.corrupt_tokens), move(self.corrupt_final_pos))


NO_TOKEN = -1   # the id of an answer or foil that a prompt does not give


def single_token_id(tokenizer, text: str) -> int | list[str]:
    """The id of `text` if it is exactly one token, else how the tokenizer splits it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    return [tokenizer.decode([i]) for i in ids]


def corrupt_length_mismatches(tokenizer, prompts, prepend_bos: bool) -> list[str]:
    """Why clean/corrupt patching cannot pair these prompts: for each prompt whose clean and
    corrupt texts tokenize to different lengths, which prompt, both counts, both tokenizations.
    (Patching copies activations position by position, so the lengths must agree.)"""
    problems = []
    for i, prompt in enumerate(prompts):
        if prompt.corrupt is None:
            continue
        clean, corrupt = (encode(tokenizer, t, prepend_bos) for t in (prompt.text, prompt.corrupt))
        if len(clean) != len(corrupt):
            show = [tokenizer.decode([t]) for t in clean], [tokenizer.decode([t]) for t in corrupt]
            problems.append(f"prompt {i} {prompt.text!r} is {len(clean)} tokens {show[0]} but its "
                            f"corrupt text {prompt.corrupt!r} is {len(corrupt)} tokens {show[1]}; "
                            "clean/corrupt patching pairs positions one to one, so write texts "
                            "of equal token length (leading spaces count)")
    return problems


def encode(tokenizer, text: str, prepend_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if prepend_bos else []) + list(ids)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows of token ids -> (tokens [batch, pos] right-padded, final_pos [batch])."""
    import torch

    if not rows or not all(rows):
        from harness.errors import MeasureError

        raise MeasureError("a prompt has no tokens (empty text with `prepend_bos: false`), "
                           "so it has no final token to read; write some text or set "
                           "`prepend_bos: true`")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)


def build_batch(tokenizer, prompts, prepend_bos: bool, on_bad_token,
                answers_read: bool = True) -> PromptBatch:
    """Tokenize prompts for one model. `on_bad_token(prompt, field, pieces)` returns the error
    to raise when an answer or foil is not a single token. Missing ones get id NO_TOKEN, and
    so do all of them when the claim reads none (`answers_read=False`)."""
    import torch

    answers, foils = [], []
    for prompt in prompts:
        for field, text, out in (("answer", prompt.answer, answers), ("foil", prompt.foil, foils)):
            if text is None or not answers_read:   # read by none (checked by the cross checks)
                out.append(NO_TOKEN)
                continue
            token = single_token_id(tokenizer, text)
            if isinstance(token, list):
                raise on_bad_token(prompt, field, token)
            out.append(token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens, final_pos = right_pad([encode(tokenizer, p.text, prepend_bos) for p in prompts], pad)
    corrupt_tokens = corrupt_final = None
    if any(p.corrupt for p in prompts):
        corrupt_tokens, corrupt_final = right_pad(
            [encode(tokenizer, p.corrupt or p.text, prepend_bos) for p in prompts], pad)
    return PromptBatch(tuple(p.text for p in prompts), tokens, final_pos,
                       torch.tensor(answers), torch.tensor(foils), corrupt_tokens, corrupt_final)
