"""Tiny GPT-2 checkpoints with random weights, built offline, for tests and benchmarks."""

from __future__ import annotations

import json
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


# Tiny configs of the decoder families the TransformerBridge loads: every architecture the
# harness is tested on. Sizes are small enough that a checkpoint builds in well under a second.
_ATTN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
TINY_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "pythia": ("gpt_neox", dict(_ATTN, rotary_pct=0.25, use_parallel_residual=True)),
    "llama": ("llama", dict(_ATTN, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(_ATTN, num_key_value_heads=2)),
    "mistral": ("mistral", dict(_ATTN, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(_ATTN, num_key_value_heads=2)),
    "gemma": ("gemma", dict(_ATTN, num_key_value_heads=1, head_dim=8)),
    "gemma2": ("gemma2", dict(_ATTN, num_key_value_heads=2, head_dim=8,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              sliding_window=16)),
    "phi": ("phi", dict(_ATTN, partial_rotary_factor=0.5)),
    "phi3": ("phi3", dict(_ATTN, num_key_value_heads=4, pad_token_id=0)),
    "opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                        max_position_embeddings=64, word_embed_proj_dim=32)),
}


def build_tiny_checkpoint(architecture: str, directory: Path, *, seed: int = 0,
                          dtype: torch.dtype = torch.float32, random_biases: bool = False
                          ) -> Path:
    """Save a seeded random model of `architecture` (a key of TINY_ARCHITECTURES) and the toy
    tokenizer to `directory`, as `save_pretrained` would for a hub checkpoint.

    Norm weights and biases are randomized so that folding them matters (fresh HF norms are
    all ones, which would hide a missing scale). With `random_biases` the projections' biases
    are too (HF initializes them to zero, which hides a dropped or misplaced bias, e.g.
    Qwen2's q/k/v biases on a path that skips all-zero ones), at the weights' own scale.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, sizes = TINY_ARCHITECTURES[architecture]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=400)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1000 + seed)
    weight_scale = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                base = 1.0 if name.endswith("weight") and model_type != "gemma" \
                    and model_type != "gemma2" else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
            elif random_biases and name.endswith("bias"):
                p.copy_(weight_scale * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory


def build_tiny_tl_checkpoint(directory: Path, *, attn_only: bool = True, n_layers: int = 2,
                             n_heads: int = 4, d_head: int = 8, seed: int = 0,
                             weights: str = "safetensors") -> Path:
    """Save a seeded random TransformerLens-format model (no HF architecture: by default
    attention-only, like `attn-only-2l`) and the toy tokenizer to `directory`, the way
    HookedTransformer checkpoints are published: a TransformerLens config.json and a state dict
    in HookedTransformer's property layout (`blocks.0.attn.W_Q`: [head, d_model, d_head]),
    as `model.safetensors` or, with `weights="pth"`, a legacy `model_final.pth`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=400)
    d_model, n_ctx, d_vocab, d_mlp = n_heads * d_head, 64, len(tokenizer), 4 * n_heads * d_head
    config = dict(n_layers=n_layers, d_model=d_model, d_head=d_head, n_heads=n_heads,
                  d_mlp=-1 if attn_only else d_mlp, n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu",
                  attn_only=attn_only, normalization_type="LN",
                  positional_embedding_type="standard", tokenizer_name=None)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, base=0.0, scale=0.3):
        return base + scale * torch.randn(shape, generator=gen)

    state = {"embed.W_E": rand(d_vocab, d_model, scale=1.0),
             "pos_embed.W_pos": rand(n_ctx, d_model), "ln_final.w": rand(d_model, base=1.0),
             "ln_final.b": rand(d_model), "unembed.W_U": rand(d_model, d_vocab),
             "unembed.b_U": rand(d_vocab, scale=0.1)}
    for layer in range(n_layers):
        block = f"blocks.{layer}."
        state.update({block + "ln1.w": rand(d_model, base=1.0), block + "ln1.b": rand(d_model),
                      block + "attn.b_O": rand(d_model, scale=0.1),
                      block + "attn.W_O": rand(n_heads, d_head, d_model)})
        for name in "QKV":
            state[block + f"attn.W_{name}"] = rand(n_heads, d_model, d_head)
            state[block + f"attn.b_{name}"] = rand(n_heads, d_head, scale=0.1)
        if not attn_only:
            state.update({block + "ln2.w": rand(d_model, base=1.0), block + "ln2.b": rand(d_model),
                          block + "mlp.W_in": rand(d_model, d_mlp),
                          block + "mlp.b_in": rand(d_mlp, scale=0.1),
                          block + "mlp.W_out": rand(d_mlp, d_model),
                          block + "mlp.b_out": rand(d_model, scale=0.1)})
    state = {k: v.contiguous() for k, v in state.items()}
    if weights == "pth":
        torch.save(state, directory / "model_final.pth")
    else:
        from safetensors.torch import save_file
        save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(tokenizer, directory)
    return directory
