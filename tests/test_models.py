"""Loading checkpoints into TransformerLens: local dirs, value-head layouts, failures."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.errors import ModelUnavailable
from harness.models import load_model
from harness.spec import ModelSource

PROMPT = "This movie was really"


def _hf_log_probs(directory, tokens):
    hf = AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens).logits.log_softmax(-1)


def test_bridge_matches_hf_model(tiny_checkpoints):
    source = ModelSource(path=str(tiny_checkpoints["a"]))
    model = load_model("a", source, str(tiny_checkpoints["a"]), "cpu")
    tokens = model.bridge.to_tokens(PROMPT, prepend_bos=True)
    with torch.no_grad():
        ours = model.bridge(tokens).log_softmax(-1)
    assert (ours - _hf_log_probs(tiny_checkpoints["a"], tokens)).abs().max() < 1e-5


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_model_lands_on_the_requested_device(tiny_checkpoints, device):
    """TransformerLens keeps a preloaded HF model where it is; load_model must move it."""
    source = ModelSource(path=str(tiny_checkpoints["a"]))
    model = load_model("a", source, str(tiny_checkpoints["a"]), device)
    assert {p.device.type for p in model.bridge.parameters()} == {device}
    assert model.device.startswith(device)


def test_value_head_checkpoint_loads_as_its_base_model(tiny_checkpoints):
    from safetensors import safe_open

    directory = tiny_checkpoints["a_value_head"]
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("v_head.") for k in keys)
    assert all(k.startswith(("pretrained_model.", "v_head.")) for k in keys)
    model = load_model("vh", ModelSource(path=str(directory)), str(directory), "cpu")
    tokens = model.bridge.to_tokens(PROMPT, prepend_bos=True)
    with torch.no_grad():
        ours = model.bridge(tokens).log_softmax(-1)
    # the value-head copy was saved from the same weights as checkpoint "a"
    assert (ours - _hf_log_probs(tiny_checkpoints["a"], tokens)).abs().max() < 1e-5


def test_missing_directory_says_what_was_tried(tmp_path):
    from harness.models import resolve_location

    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_location(ModelSource(path="nowhere"), tmp_path)


def test_unreachable_hub_model_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ModelSource(hf="lvwerra/gpt2-imdb-not-cached", revision="main")
    with pytest.raises(ModelUnavailable) as info:
        load_model("source", source, source.hf, "cpu")
    message = str(info.value)
    assert "lvwerra/gpt2-imdb-not-cached" in message and "revision 'main'" in message
    assert "HF_HUB_OFFLINE=1" in message
