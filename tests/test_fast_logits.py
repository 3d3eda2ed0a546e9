"""logit_diff and top_k read the final-position logits from one forward of the HF model inside
the bridge (only final positions projected), equal to the bridge's own numbers."""

from __future__ import annotations

import pytest
import torch

from harness.measure.logits import logit_diff, top_k_tokens
from harness.models import load_model
from harness.prompts import build_batch
from harness.spec import ModelSource, Prompt

TEXTS = ["This movie was really", "The acting was", "I thought the plot was quite",
         "This film was"]


def _fresh(name="toy-reviews-rlhf"):
    from harness.zoo import zoo_checkpoint

    return load_model(name, ModelSource(zoo=name), str(zoo_checkpoint(name)), "cpu")


def _batch(model):
    prompts = [Prompt(text=t, answer=" bad", foil=" good") for t in TEXTS]
    return build_batch(model.tokenizer, prompts, True, None)


def _bridge_final(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        logits = model.bridge(batch.tokens, return_type="logits")
    return logits[torch.arange(len(TEXTS)), batch.final_pos].float()


@pytest.mark.parametrize("name", ["toy-reviews-rlhf", "toy-reviews-source"])
def test_logit_diff_and_top_k_equal_the_bridge(name):
    model = _fresh(name)
    batch = _batch(model)
    assert not batch.same_length                         # right padding is exercised
    reference = _bridge_final(model, batch)
    n = torch.arange(len(TEXTS))
    expected = reference[n, batch.answer_ids] - reference[n, batch.foil_ids]
    torch.testing.assert_close(logit_diff(model.bridge, batch), expected, atol=1e-5, rtol=0)
    assert model.bridge._harness_direct_logits is True     # the HF path was used
    tops = top_k_tokens(model.bridge, model.tokenizer, batch, 5)
    probs = reference.softmax(-1).topk(5)
    for row, p, ids in zip(tops, probs.values, probs.indices):
        assert [tok for tok, _ in row] == [model.tokenizer.decode([int(i)]) for i in ids]
        torch.testing.assert_close(torch.tensor([q for _, q in row]), p, atol=1e-5, rtol=0)
    # sliced (one prompt per forward) gives the same numbers
    torch.testing.assert_close(logit_diff(model.bridge, batch, memory_budget_mb=1e-6),
                               expected, atol=1e-5, rtol=0)


def test_a_model_whose_hf_logits_differ_keeps_the_bridge(monkeypatch):
    model = _fresh()
    batch = _batch(model)
    expected = logit_diff(model.bridge, batch)
    fresh = _fresh()
    real = fresh.bridge.original_model.forward

    def skewed(*args, **kwargs):   # the direct call alone (it keeps only final logits) errs
        out = real(*args, **kwargs)
        if "logits_to_keep" in kwargs:
            out.logits[..., model.tokenizer.encode(" bad")[-1]] += 1.0
        return out
    monkeypatch.setattr(fresh.bridge.original_model, "forward", skewed)
    torch.testing.assert_close(logit_diff(fresh.bridge, batch), expected, atol=1e-5, rtol=0)
    assert fresh.bridge._harness_direct_logits is False


def test_the_one_off_check_runs_the_bridge_on_two_prompts_only(monkeypatch):
    """The first call's check against the bridge reads two prompts, not the whole batch (that
    forward cost ~13 s on 60 SmolLM2 prompts), and the numbers are still the bridge's."""
    model = _fresh()
    batch = _batch(model)
    expected = logit_diff(_fresh().bridge, batch)
    rows_seen = []
    real = model.bridge.forward

    def counting(tokens, *args, **kwargs):
        rows_seen.append(tokens.shape[0])
        return real(tokens, *args, **kwargs)
    monkeypatch.setattr(model.bridge, "forward", counting)
    torch.testing.assert_close(logit_diff(model.bridge, batch), expected, atol=1e-5, rtol=0)
    assert model.bridge._harness_direct_logits is True
    assert rows_seen == [2]


def test_a_projection_wrong_only_at_the_longest_prompt_is_caught(monkeypatch):
    """The checked prompts include the longest one, so a direct call that projects the wrong
    last position (shorter prompts untouched) is refused and the bridge's logits are used."""
    model = _fresh()
    batch = _batch(model)
    longest = int(batch.final_pos.argmax())
    assert longest != 0 and (batch.final_pos < batch.final_pos[longest]).any()
    expected = logit_diff(_fresh().bridge, batch)
    real = model.bridge.original_model.forward

    def skewed(*args, **kwargs):
        out = real(*args, **kwargs)
        if "logits_to_keep" in kwargs:
            out.logits[:, -1] += torch.linspace(0, 1, out.logits.shape[-1])
        return out
    monkeypatch.setattr(model.bridge.original_model, "forward", skewed)
    torch.testing.assert_close(logit_diff(model.bridge, batch), expected, atol=1e-5, rtol=0)
    assert model.bridge._harness_direct_logits is False
