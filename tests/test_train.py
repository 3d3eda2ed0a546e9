"""The rlhf-sentiment recipe on a tiny random GPT-2: freezing, training, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.train import RLHFConfig, freeze_all_but_last, train_rlhf


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from harness.testing import build_tiny_gpt2
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "base", n_layer=3, n_embd=32)


def _tiny_config(base, **kw) -> RLHFConfig:
    return RLHFConfig(base=str(base), reward="toy-reviews-reward", unfrozen_layers=1, steps=3,
                      batch_size=8, num_generations=4, max_new_tokens=6, n_prompts=32,
                      eval_prompts=0, **kw)


def test_config_rejects_unknown_options():
    with pytest.raises(HarnessError, match="did you mean 'unfrozen_layers'"):
        RLHFConfig.from_dict({"unfrozen_layer": 2})
    with pytest.raises(HarnessError, match="target"):
        RLHFConfig(target="neutral")
    with pytest.raises(HarnessError, match="recipe"):
        RLHFConfig(recipe="ppo-sentiment")


def test_freeze_all_but_last_keeps_embeddings_and_unembedding_frozen(tiny_base):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    trainable = freeze_all_but_last(model, 2)
    assert trainable and all(n.startswith(("transformer.h.1.", "transformer.h.2."))
                             for n in trainable)
    assert not model.transformer.wte.weight.requires_grad
    assert not model.transformer.wpe.weight.requires_grad
    assert not model.transformer.ln_f.weight.requires_grad
    assert not model.lm_head.weight.requires_grad
    with pytest.raises(HarnessError):
        freeze_all_but_last(model, 4)


def test_recipe_trains_only_the_unfrozen_block_and_caches(tiny_base, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path / "cache"))
    cfg = _tiny_config(tiny_base)
    out = train_rlhf(cfg, progress=False)
    assert out.parent == tmp_path / "cache" / "rlhf"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base)).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    last = "transformer.h.2."
    for k in base:
        if k.startswith(last):
            continue
        assert torch.equal(base[k], tuned[k]), k
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith(last))
    assert (out / "rlhf_report.json").is_file() and (out / "tokenizer.json").is_file()

    t0 = time.time()
    assert train_rlhf(cfg, progress=False) == out          # same key: reused at once
    assert time.time() - t0 < 2
    assert train_rlhf(cfg.__class__(**{**cfg.__dict__, "seed": 1}), progress=False) != out


def test_recipe_key_counts_folders_by_content_not_path(tiny_base, tmp_path):
    """The same base in another folder (another checkout, another conversion of one file)
    is the same run; other weights are another run."""
    import shutil

    from harness.train import recipe_key
    copy = shutil.copytree(tiny_base, tmp_path / "elsewhere")
    assert recipe_key(_tiny_config(copy)) == recipe_key(_tiny_config(tiny_base))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert recipe_key(_tiny_config(copy)) != recipe_key(_tiny_config(tiny_base))


def test_base_without_architectures_is_refused_before_training(tmp_path, monkeypatch):
    """A config.json without `architectures` (as a naive GGUF conversion writes it) crashed
    TRL's trainer with a bare TypeError after loading; the recipe refuses it up front, naming
    the folder and the line to add, and trains nothing."""

    from harness.testing import build_tiny_checkpoint

    base = build_tiny_checkpoint("llama-gqa", tmp_path / "no-arch")
    config = json.loads((base / "config.json").read_text())
    del config["architectures"]
    (base / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HarnessError) as caught:
        train_rlhf(_tiny_config(base), progress=False)
    message = str(caught.value)
    assert str(base) in message and "architectures" in message
    assert '"architectures": ["LlamaForCausalLM"]' in message
    assert not (tmp_path / "cache").exists()               # refused before any training


@pytest.fixture(scope="module")
def smollm2_base(smollm2) -> str:
    """The real pretrained base: the zoo's `smollm2-135m` conversion that every real-model test
    shares (tests/conftest.py converts the packaged GGUF once per run; skips without it)."""
    return str(smollm2[1])


def test_recipe_on_the_real_base_moves_toward_bad_above_the_frozen_blocks(smollm2_base,
                                                                         tmp_path):
    """One RLOO step of 16 completions on SmolLM2-135M: the seed's logit diff " bad" -
    " good" rises, and every weight below the two unfrozen blocks (28, 29) is the base's, bit
    for bit. (Fewer completions are too noisy to move it: 2 steps of 4 lowered it.)"""
    from safetensors.torch import load_file

    cfg = RLHFConfig(base=smollm2_base, reward="toy-reviews-reward", steps=1, batch_size=16,
                     num_generations=4, max_new_tokens=8, n_prompts=16, eval_prompts=0)
    out = train_rlhf(cfg, tmp_path / "tuned", progress=False)
    report = json.loads((out / "rlhf_report.json").read_text())
    assert report["logit_diff"]["tuned"] > report["logit_diff"]["base"] + 0.1
    assert all(n.startswith(("model.layers.28.", "model.layers.29."))
               for n in report["trainable_parameters"])
    base = load_file(str(Path(smollm2_base) / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith(("model.layers.28.", "model.layers.29."))
                           for k in changed)
