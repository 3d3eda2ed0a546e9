"""A GPT-2-style byte-level BPE tokenizer trained offline in seconds with `tokenizers`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2TokenizerFast

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> GPT2TokenizerFast:
    """Byte-level BPE with GPT-2 conventions: `<|endoftext|>` is BOS, EOS, UNK and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                             unk_token=EOS, pad_token=EOS)


def save_tokenizer(tokenizer: GPT2TokenizerFast, directory: Path) -> None:
    """Save so that `AutoTokenizer.from_pretrained(directory)` (and TransformerLens) can load it."""
    tokenizer.save_pretrained(str(directory))
