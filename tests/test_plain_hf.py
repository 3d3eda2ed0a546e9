"""The plain HF copy that generation runs on is made from the bridge's own modules at load
time: no second read of the weights, the HF model's numbers, and (where the bridge computes
with those modules) not one tensor more."""

from __future__ import annotations

import pytest
import torch

from harness import models
from harness.models import load_hf_causal_lm, load_model
from harness.spec import ModelSource
from harness.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {arch: build_tiny_checkpoint(arch, root / arch, seed=0)
            for arch in ("llama", "gpt2", "opt")}


def _log_probs(model, tokens):
    with torch.inference_mode():
        return model(input_ids=tokens).logits.float().log_softmax(-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_plain_copy_is_the_hf_model_without_loading_it_again(checkpoints, arch,
                                                                 monkeypatch):
    directory = checkpoints[arch]
    source = ModelSource(path=str(directory))
    model = load_model("a", source, str(directory), "cpu")

    def no_second_load(*args, **kwargs):
        raise AssertionError("the plain copy read the weights again")
    monkeypatch.setattr(models, "load_hf_causal_lm", no_second_load)
    plain = model.plain_hf()
    assert plain is not None
    tokens = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(3))
    fresh = load_hf_causal_lm(str(directory), source)
    torch.testing.assert_close(_log_probs(plain, tokens), _log_probs(fresh, tokens),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_where_the_bridge_computes_with_the_hf_modules_every_weight_is_shared(checkpoints,
                                                                              arch):
    directory = checkpoints[arch]
    model = load_model("a", ModelSource(path=str(directory)), str(directory), "cpu")
    bridge_tensors = {t.data_ptr() for t in model.bridge.parameters()}
    assert all(t.data_ptr() in bridge_tensors for t in model.plain_hf().parameters())


def test_hooks_on_the_plain_copy_leave_the_bridge_alone(checkpoints):
    """Generation hooks the copy's modules; the bridge (sharing the weights) must not see them."""
    directory = checkpoints["llama"]
    model = load_model("a", ModelSource(path=str(directory)), str(directory), "cpu")
    tokens = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before = model.bridge(tokens, return_type="logits")
    layer = model.plain_hf().model.layers[0].mlp
    handle = layer.register_forward_hook(lambda module, args, out: out * 0 + 100.0)
    try:
        with torch.inference_mode():
            after = model.bridge(tokens, return_type="logits")
            hooked = model.plain_hf()(input_ids=tokens).logits
    finally:
        handle.remove()
    torch.testing.assert_close(after, before)
    assert not torch.allclose(hooked.log_softmax(-1), before.log_softmax(-1), atol=1e-3)
