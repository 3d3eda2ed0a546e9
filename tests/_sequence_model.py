"""A planted GPT-2 whose next-token distribution is known in closed form, for sequence metrics.

Every word of WORDS is one token (with its leading space). The model predicts the successor of
the current token: the words form a cycle (WORDS[i] -> WORDS[i+1]), every other token maps to
itself. Attention and MLPs write nothing; the embedding is one-hot (d_model = vocabulary) and
the unembedding maps each token to its successor, so at every position the successor's logit
exceeds all others by the same margin and all others are equal: the loss of a position is
log(e^margin + V - 1) - margin when its token is the successor, log(e^margin + V - 1) otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from harness.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer

WORDS = [" red", " blue", " green", " black", " white", " pink", " gray", " brown"]
MARKER = " |"
SCALE = 4.0   # one-hot embedding scale; LayerNorm undoes it
LM_SCALE = 0.3   # unembedding scale: sets the successor's margin (about 5 nats)


def build_successor_model(directory: Path) -> Path:
    texts = ["".join(WORDS) + MARKER + "".join(WORDS)] * 50
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    vocab = len(tokenizer)
    ids = [tokenizer(w)["input_ids"] for w in WORDS + [MARKER]]
    assert all(len(i) == 1 for i in ids), ids
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=vocab, n_layer=1, n_head=1,
                        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    succ = list(range(vocab))
    cycle = [i[0] for i in ids[:-1]]
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        succ[a] = b
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
                    or name.endswith("ln_f.weight"):
                p.fill_(1.0)
        model.transformer.wte.weight.copy_(SCALE * torch.eye(vocab))
        lm = torch.zeros(vocab, vocab)
        lm[succ, torch.arange(vocab)] = LM_SCALE   # logit of succ(t) reads coordinate t
        model.lm_head.weight.copy_(lm)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory


def margin(vocab: int) -> float:
    """The successor's logit minus every other logit: LayerNorm of a one-hot vector."""
    sigma = math.sqrt((1 / vocab) * (1 - 1 / vocab) + 1e-5 / SCALE**2)
    return LM_SCALE / sigma


def expected_losses(vocab: int, hits: list[bool]) -> list[float]:
    m = margin(vocab)
    total = math.log(math.exp(m) + vocab - 1)
    return [total - m if hit else total for hit in hits]
