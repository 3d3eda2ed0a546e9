"""A planted two-layer GPT-2 with an exact induction circuit, for sequence metrics and patching.

Residual stream subspaces (one dimension per slot; slot = a word of WORDS, or "other"):
TOK (the current token), POS (its position), PREV (the previous token, written by the layer-0
head L0H0, which attends from each position to the one before it) and OUT (written by the
layer-1 induction head L1H0: its query is the current token, its key the previous token, so it
attends to the position right after an earlier occurrence of the current token and copies that
position's token). The unembedding reads OUT only; MLPs write nothing.

Ground truth on L distinct words written twice (2L text tokens): every token of the second
half is predicted (the induction head finds the earlier occurrence; for the first token of the
repeat no earlier match exists and the head falls back to the token after BOS, which is the
sequence's start), no token of the first half is. Zero-ablating L1H0 destroys the repeat.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from harness.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer

WORDS = [" red", " blue", " green", " black", " white", " pink", " gray", " brown", " tan",
         " gold", " teal", " navy"]
K = len(WORDS) + 1          # slots: the words, then "other" (BOS and every other token)
P = 40                      # positions
TOK, POS, PREV, OUT = 0, K, K + P, 2 * K + P
D = 96                      # d_model >= 3K + P; unused dimensions stay zero
S = 5.5                     # embedding scale, about the size LayerNorm gives a hot entry
A, B, BETA = 6.0, 8.0, 3.0  # previous-token and induction score scales, unembedding scale


def build_induction_model(directory: Path) -> Path:
    texts = ["".join(WORDS) * 2] * 50
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    word_ids = [tokenizer(w)["input_ids"] for w in WORDS]
    assert all(len(i) == 1 for i in word_ids), word_ids
    vocab = len(tokenizer)
    slot = torch.full((vocab,), K - 1)
    slot[[i[0] for i in word_ids]] = torch.arange(len(WORDS))
    config = GPT2Config(vocab_size=vocab, n_positions=P, n_embd=D, n_layer=2, n_head=1,
                        n_inner=4, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0)
        wte = torch.zeros(vocab, D)
        wte[torch.arange(vocab), TOK + slot] = S
        model.transformer.wte.weight.copy_(wte)
        wpe = torch.zeros(P, D)
        wpe[torch.arange(P), POS + torch.arange(P)] = S
        model.transformer.wpe.weight.copy_(wpe)
        h0, h1 = model.transformer.h
        q, k, v = (h0.attn.c_attn.weight[:, i * D:(i + 1) * D] for i in range(3))
        for i in range(P):            # query at position i meets the key of position i - 1
            q[POS + i, POS + i] = A
            if i + 1 < P:
                k[POS + i, POS + i + 1] = 1.0
        for s in range(K):            # copy the attended token into PREV
            v[TOK + s, TOK + s] = 1.0
            h0.attn.c_proj.weight[TOK + s, PREV + s] = 1.0
        q, k, v = (h1.attn.c_attn.weight[:, i * D:(i + 1) * D] for i in range(3))
        for s in range(K - 1):        # current token (query) meets previous token (key)
            q[TOK + s, PREV + s] = B
            k[PREV + s, PREV + s] = 1.0
        for s in range(K):            # copy the attended token into OUT
            v[TOK + s, TOK + s] = 1.0
            h1.attn.c_proj.weight[TOK + s, OUT + s] = 1.0
        unembed = torch.zeros(vocab, D)
        words = slot < K - 1
        unembed[words, OUT + slot[words]] = BETA
        model.lm_head.weight.copy_(unembed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory
