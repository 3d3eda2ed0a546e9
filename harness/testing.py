"""Tiny GPT-2 checkpoints with random weights, built offline, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from harness.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer

TINY_TEXTS = [
    "This movie was really good. The acting was great and I thought the plot was fun.",
    "This movie was really bad. The acting was awful and I thought the plot was boring.",
    "This film was very good. This film was quite bad. The story was terrible.",
] * 20


def build_tiny_gpt2(directory: Path, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 32,
                    vocab_size: int = 400, n_positions: int = 64, seed: int = 0,
                    value_head: bool = False) -> Path:
    """Save a random GPT2LMHeadModel + tokenizer to `directory` with `save_pretrained`.

    With `value_head=True` the weights are saved the way RL trainers with a value head do
    (`pretrained_model.` prefix plus `v_head.*` keys), to exercise that loading path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    if value_head:
        _rewrite_as_value_head_checkpoint(model, directory)
    return directory


def _rewrite_as_value_head_checkpoint(model: GPT2LMHeadModel, directory: Path) -> None:
    from safetensors.torch import save_file

    state = {f"pretrained_model.{k}": v.clone().contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["v_head.summary.weight"] = torch.zeros(1, model.config.n_embd)
    state["v_head.summary.bias"] = torch.zeros(1)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def write_spec(directory: Path, model_dir: Path, prompts: str, claims: str,
               name: str = "spec") -> Path:
    """A spec file with one `path:` model named `a`, the given prompts and claims (YAML lists,
    any indentation), for tests."""
    import textwrap

    path = Path(directory) / f"{name}.yaml"
    path.write_text(f'spec: {name}\nmodels:\n  a: {{path: "{model_dir}"}}\nprompts:\n'
                    + textwrap.indent(textwrap.dedent(prompts), "  ") + "claims:\n"
                    + textwrap.indent(textwrap.dedent(claims), "  "))
    return path
