"""The rlhf-sentiment recipe on a tiny random GPT-2: freezing, training, caching."""

from __future__ import annotations

import time

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
