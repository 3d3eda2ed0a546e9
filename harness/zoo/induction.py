"""`toy-induction`: a 2-layer GPT-2 that copies repeated random word sequences in context.

Ground truth for circuit claims: L0H0 is a previous-token head, L1H0 an induction head whose
keys read what L0H0 wrote. Training from random weights on a few CPU minutes finds position
shortcuts instead (docs/ecosystem-notes), so the two heads are *seeded* weakly by construction
(`plant`) and then every weight is trained with Adam on the full LM loss.

Residual layout of the seed (d_model 64): dims 0-15 a sinusoidal position code, 16-47 the
token, 48-63 a slot where L0H0 writes the previous token. Value and ln_1 biases are kept at
zero so zero-ablating a head means the same in the HF model and in TransformerLens's
compatibility mode (which folds those biases into the output bias).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from harness.zoo.pretrain import _progress, deterministic
from harness.zoo.tokenizer import EOS, save_tokenizer

WORDS = tuple("""
apple river stone cloud tiger paper glass horse candle forest silver garden window rabbit
copper violin dragon island pepper marble rocket saddle tunnel walnut anchor basket cactus
donkey engine falcon ginger hammer igloo jacket kettle lemon magnet needle orange pillow
quartz ribbon salmon teapot turnip velvet wagon yogurt zebra bottle button carpet cherry
feather lantern meadow orchid parrot pencil planet puzzle shovel spider sponge stamp sugar
thunder tomato trumpet valley wallet whistle wizard blanket bucket cookie
""".split())


@dataclass(frozen=True)
class InductionConfig:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    min_len: int = 6          # repeated sequence length (words), drawn per row
    max_len: int = 20
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    plant_scale: float = 1.0  # strength of the seeded heads (weak: training does the rest)


def build_tokenizer() -> GPT2TokenizerFast:
    """Byte-level BPE with a prefix space, so "apple river" is [" apple", " river"]."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=30)) for _ in range(2000)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                            pad_token=EOS, add_prefix_space=True)
    for w in WORDS:
        if len(out(" " + w, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"' {w}' is not one token")
    return out


def word_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
                         for w in WORDS])


def repeated_batch(ids: torch.Tensor, bos: int, batch: int, length: int,
                   gen: torch.Generator) -> torch.Tensor:
    """[batch, 1 + 2*length]: BOS, a random word sequence, the same sequence again."""
    seq = ids[torch.randint(len(ids), (batch, length), generator=gen)]
    return torch.cat([torch.full((batch, 1), bos), seq, seq], 1)


def plant(model: GPT2LMHeadModel, cfg: InductionConfig, gen: torch.Generator) -> None:
    """Seed a previous-token head (L0H0) and an induction head (L1H0), weakly."""
    d, dh = cfg.n_embd, cfg.n_embd // cfg.n_head
    pos, tok, slot = slice(0, 16), slice(16, 48), slice(48, 64)
    s = cfg.plant_scale
    with torch.no_grad():
        tr = model.transformer
        # position code: 8 sinusoid pairs, periods 3..128
        n_pos = cfg.n_positions
        periods = torch.logspace(math.log10(3), math.log10(128), 8)
        omega = 2 * math.pi / periods
        p = torch.arange(n_pos)[:, None] * omega[None]
        code = torch.stack([p.cos(), p.sin()], -1).flatten(1) / math.sqrt(8)
        tr.wpe.weight.zero_()
        tr.wpe.weight[:, pos] = code
        wte = torch.zeros_like(tr.wte.weight)
        wte[:, tok] = torch.randn(wte.shape[0], 32, generator=gen) / math.sqrt(32)
        tr.wte.weight.copy_(wte)
        # a rotation by -omega maps position i's code to position i-1's
        rot = torch.zeros(16, 16)
        for k in range(8):
            c, sn = math.cos(omega[k]), math.sin(omega[k])
            rot[2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.tensor([[c, sn], [-sn, c]])
        basis = torch.linalg.qr(torch.randn(32, 16, generator=gen))[0]   # [32, 16], orthonormal
        a0, a1 = tr.h[0].attn, tr.h[1].attn
        q, k, v = (slice(i * d, i * d + dh) for i in range(3))   # head 0's columns of c_attn
        for attn in (a0, a1):
            attn.c_attn.weight[:, q] = 0
            attn.c_attn.weight[:, k] = 0
            attn.c_attn.weight[:, v] = 0
            attn.c_proj.weight[0:dh] = 0
        # L0H0: query = rotated position code, key = position code; value = token -> slot
        a0.c_attn.weight[pos, q] = 3.0 * s * rot.T
        a0.c_attn.weight[pos, k] = torch.eye(16)
        a0.c_attn.weight[tok, v] = basis
        a0.c_proj.weight[0:dh, slot] = 0.2 * s * torch.eye(16)
        # L1H0: query = current token, key = the slot (previous token); value copies the token
        a1.c_attn.weight[tok, q] = 1.5 * s * basis
        a1.c_attn.weight[slot, k] = torch.eye(16)
        a1.c_attn.weight[tok, v] = basis
        a1.c_proj.weight[0:dh, tok] = 0.5 * s * basis.T
        for block in tr.h:
            block.attn.c_attn.bias.zero_()
            block.ln_1.bias.zero_()


def _zero_biases(model: GPT2LMHeadModel, d: int) -> None:
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias[2 * d:] = 0
            block.ln_1.bias.zero_()


@torch.no_grad()
def in_context_accuracy(model, ids: torch.Tensor, bos: int, length: int = 15, n: int = 64,
                        seed: int = 123) -> float:
    """Share of second-half tokens (after the first) predicted correctly."""
    batch = repeated_batch(ids, bos, n, length, torch.Generator().manual_seed(seed))
    pred = model(input_ids=batch).logits.argmax(-1)
    second = slice(length + 1, 2 * length)          # predicting tokens length+2 .. 2*length
    return float((pred[:, second] == batch[:, length + 2:]).float().mean())


def train_induction(cfg: InductionConfig, seed: int, out_dir: Path,
                    progress: bool = True) -> dict:
    """Plant, train, save (`save_pretrained` model + tokenizer); returns training stats."""
    start = time.time()
    tokenizer = build_tokenizer()
    ids = word_ids(tokenizer)
    bos = tokenizer.bos_token_id
    # one thread: on a loaded 2-core machine two threads run ~15x slower, not faster
    with deterministic(seed, threads=1):
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions,
                            n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=bos, eos_token_id=bos, pad_token_id=bos)
        model = GPT2LMHeadModel(config)
        gen = torch.Generator().manual_seed(seed)
        plant(model, cfg, gen)
        before = in_context_accuracy(model.eval(), ids, bos)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        model.train()
        bar = _progress(cfg.steps, "train toy-induction", progress)
        loss_value = float("nan")
        for step in range(cfg.steps):
            length = int(torch.randint(cfg.min_len, cfg.max_len + 1, (), generator=gen))
            batch = repeated_batch(ids, bos, cfg.batch_size, length, gen)
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _zero_biases(model, cfg.n_embd)
            loss_value = 0.9 * loss_value + 0.1 * loss.item() if step else loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        model.eval()
        after = in_context_accuracy(model, ids, bos)
    model.generation_config.pad_token_id = bos
    model.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir)
    stats = {"final_loss": round(loss_value, 4), "in_context_accuracy_before": round(before, 4),
             "in_context_accuracy": round(after, 4), "config": asdict(cfg)}
    (Path(out_dir) / "induction_report.json").write_text(json.dumps(stats, indent=2) + "\n")
    return {**stats, "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.zoo.induction [--out DIR]`: rebuild toy-induction alone (default:
    rewrite the shipped artifact)."""
    import argparse

    from harness.zoo.store import ARTIFACTS

    parser = argparse.ArgumentParser(prog="python -m harness.zoo.induction")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "toy-induction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(train_induction(InductionConfig(), args.seed, args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
