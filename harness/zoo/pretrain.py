"""Train the toy world's models from scratch on CPU: the source LM and the reward classifier.

Both are plain Hugging Face models (`GPT2LMHeadModel`, `GPT2ForSequenceClassification`)
saved with `save_pretrained`, so everything downstream (TransformerLens, the sentiment
pipeline, TRL) treats them exactly like hub checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from harness.zoo.corpus import ADJECTIVES, Review, generate_corpus
from harness.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer

BUILD_THREADS = 2   # fixed thread count during builds: CPU float sums depend on it


@contextlib.contextmanager
def deterministic(seed: int, threads: int = BUILD_THREADS) -> Iterator[None]:
    """Seed python/torch, fix the thread count and ask torch for deterministic kernels."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


@dataclass(frozen=True)
class TokenizerConfig:
    n_reviews: int = 20_000
    vocab_size: int = 1000    # upper bound; the grammar's words are all merged well below it


@dataclass(frozen=True)
class SourceConfig:
    """The source LM: a small GPT-2 pretrained on balanced reviews."""
    n_reviews: int = 20_000
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    # Loss weight of adjective tokens. Sentiment agreement between sentences is worth only a
    # few hundredths of a nat per token, so without this the small model never learns it in
    # a CPU-sized run; and without it " good" and " bad" keep nearly equal (tied) embeddings,
    # which caps any later logit difference between them (the final LayerNorm is frozen).
    adjective_weight: float = 5.0


@dataclass(frozen=True)
class RewardConfig:
    """The reward model: a tiny GPT-2 sentiment classifier trained on the corpus labels."""
    n_reviews: int = 8_000
    n_heldout: int = 2_000
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 40
    prefix_fraction: float = 0.3   # share of training texts cut after a random word
    mixed_fraction: float = 0.3    # share spliced from a positive and a negative review


def build_tokenizer(cfg: TokenizerConfig, seed: int, out_dir: Path):
    reviews = generate_corpus(cfg.n_reviews, seed=seed)
    tokenizer = train_bpe_tokenizer([r.text for r in reviews], vocab_size=cfg.vocab_size)
    for word in ADJECTIVES:
        ids = tokenizer.encode(" " + word)
        if len(ids) != 1:
            raise RuntimeError(f"' {word}' is not a single token ({ids}); raise vocab_size")
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, :len(r)] = torch.tensor(r)
        mask[k, :len(r)] = 1
    return ids, mask


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def train_source(cfg: SourceConfig, tokenizer, seed: int, out_dir: Path,
                 progress: bool = True) -> dict:
    """Pretrain the source LM on BOS + review + EOS sequences; returns training stats."""
    reviews = generate_corpus(cfg.n_reviews, seed=seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = [[bos] + tokenizer.encode(r.text) + [eos] for r in reviews]
    adj_mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    adj_mask[[tokenizer.encode(" " + w)[0] for w in ADJECTIVES]] = True
    with deterministic(seed):
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions,
                            n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
        model = GPT2LMHeadModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        bar = _progress(cfg.steps, "pretrain source", progress)
        loss_value = float("nan")
        for step in range(cfg.steps):
            idx = torch.randint(len(rows), (cfg.batch_size,), generator=gen).tolist()
            ids, mask = _pad([rows[i] for i in idx], eos)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = ids[:, 1:]
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            weight = mask[:, 1:].float() * torch.where(adj_mask[targets],
                                                       cfg.adjective_weight, 1.0)
            loss = (per_token * weight).sum() / weight.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_value = 0.9 * loss_value + 0.1 * loss.item() if step else loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        model.eval()
    model.generation_config.pad_token_id = eos
    model.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir)
    return {"final_loss": round(loss_value, 4),
            "n_params": sum(p.numel() for p in model.parameters())}


def _sentences(text: str) -> list[str]:
    return [t.strip() + "." for t in text.split(".") if t.strip()]


def _reward_texts(reviews: Sequence[Review], rng: random.Random, prefix_fraction: float,
                  mixed_fraction: float) -> list[tuple[str, float]]:
    """(text, probability of POSITIVE) training pairs.

    Corpus reviews (label 0/1), some cut after a random word past the first sentence, and
    some spliced from a positive and a negative review whose target is the share of
    positive sentences, so the classifier weighs every sentence and not just the first.
    """
    out: list[tuple[str, float]] = []
    for r in reviews:
        if rng.random() < mixed_fraction:
            other = rng.choice(reviews)
            parts = [(s, r.label) for s in _sentences(r.text)]
            parts += [(s, other.label) for s in _sentences(other.text)]
            rng.shuffle(parts)
            parts = parts[:rng.randint(1, min(4, len(parts)))]
            out.append((" ".join(s for s, _ in parts), sum(y for _, y in parts) / len(parts)))
            continue
        text = r.text
        if rng.random() < prefix_fraction:
            words = text.split()
            first_end = next(k for k, w in enumerate(words) if w.endswith(".")) + 1
            text = " ".join(words[:rng.randint(first_end, len(words))])
        out.append((text, float(r.label)))
    return out


def train_reward(cfg: RewardConfig, tokenizer, seed: int, out_dir: Path,
                 progress: bool = True) -> dict:
    """Train the sentiment classifier; returns held-out accuracy on unseen full reviews."""
    train = generate_corpus(cfg.n_reviews, seed=seed + 1)
    heldout = generate_corpus(cfg.n_heldout, seed=seed + 2)
    rng = random.Random(f"reward-{seed}")
    data = _reward_texts(train, rng, cfg.prefix_fraction, cfg.mixed_fraction)
    pad = tokenizer.eos_token_id
    rows = [tokenizer.encode(t) for t, _ in data]
    targets = torch.tensor([[1.0 - y, y] for _, y in data])
    with deterministic(seed):
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, num_labels=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            id2label={0: "NEGATIVE", 1: "POSITIVE"},
                            label2id={"NEGATIVE": 0, "POSITIVE": 1},
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        model = GPT2ForSequenceClassification(config)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
        gen = torch.Generator().manual_seed(seed + 1)
        model.train()
        bar = _progress(cfg.steps, "train reward", progress)
        for _ in range(cfg.steps):
            idx = torch.randint(len(rows), (cfg.batch_size,), generator=gen).tolist()
            ids, mask = _pad([rows[i] for i in idx], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        model.eval()
        accuracy = classifier_accuracy(model, tokenizer, heldout)
    model.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir)
    return {"heldout_accuracy": accuracy, "n_heldout": len(heldout),
            "n_params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def classifier_accuracy(model, tokenizer, reviews: Sequence[Review], batch: int = 256) -> float:
    correct = 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(reviews), batch):
        chunk = reviews[start:start + batch]
        ids, mask = _pad([tokenizer.encode(r.text) for r in chunk], pad)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        correct += sum(int(p) == r.label for p, r in zip(pred.tolist(), chunk))
    return correct / len(reviews)


def config_dict(cfg) -> dict:
    return {type(cfg).__name__: asdict(cfg)}
