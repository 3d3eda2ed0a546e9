"""SAE files: encode/decode equal a direct computation from the weight files, for each
architecture (ReLU, JumpReLU, TopK) and layout (SAELens, sparsify); hook resolution; errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from harness.errors import HarnessError, ModelUnavailable
from harness.saes import load_sae, sparsify_hook

D_IN, D_SAE = 8, 24


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g),
            "b_enc": torch.randn(D_SAE, generator=g) * 0.5,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g),
            "b_dec": torch.randn(D_IN, generator=g) * 0.3}


def _saelens(tmp_path, architecture: str, **cfg_extra):
    w = _weights()
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))
    folder = tmp_path / f"saelens-{architecture}"
    folder.mkdir()
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE,
           "hook_name": "blocks.1.hook_resid_pre", "model_name": "tiny",
           "apply_b_dec_to_input": True, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, w


X = torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(9))


def test_saelens_standard_matches_direct_computation(tmp_path):
    folder, w = _saelens(tmp_path, "standard")
    sae = load_sae(folder)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = torch.where(pre > 0, pre, torch.zeros(()))
    assert torch.allclose(sae.encode(X), expected, atol=1e-5)
    assert (expected == 0).any() and (expected > 0).any()   # the ReLU did something
    feats = sae.encode(X)
    assert torch.allclose(sae.decode(feats), feats @ w["W_dec"] + w["b_dec"], atol=1e-5)
    assert sae.hook == "blocks.1.hook_resid_pre" and sae.layout == "saelens"


def test_saelens_jumprelu_matches_direct_computation(tmp_path):
    folder, w = _saelens(tmp_path, "jumprelu")
    sae = load_sae(folder)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = pre * (pre > w["threshold"])
    got = sae.encode(X)
    assert torch.allclose(got, expected, atol=1e-5)
    # values between 0 and the threshold are cut: differs from a plain ReLU somewhere
    assert not torch.allclose(got, torch.relu(pre))


def test_saelens_topk_matches_direct_computation(tmp_path):
    folder, w = _saelens(tmp_path, "topk", k=3)
    sae = load_sae(folder)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = torch.zeros_like(pre)
    for idx in torch.cartesian_prod(torch.arange(5), torch.arange(7)):
        row = pre[idx[0], idx[1]]
        order = sorted(range(D_SAE), key=lambda j: -float(row[j]))[:3]
        for j in order:
            expected[idx[0], idx[1], j] = max(float(row[j]), 0.0)
    got = sae.encode(X)
    assert torch.allclose(got, expected, atol=1e-5)
    assert int((got > 0).sum(-1).max()) <= 3


def test_saelens_without_b_dec_on_input(tmp_path):
    folder, w = _saelens(tmp_path, "standard", apply_b_dec_to_input=False)
    pre = X @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(load_sae(folder).encode(X), torch.relu(pre), atol=1e-5)


def test_sparsify_layout_matches_direct_computation(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
         "encoder.bias": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    folder = tmp_path / "layers.2"
    folder.mkdir()
    save_file(w, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"expansion_factor": 3, "normalize_decoder": True, "num_latents": D_SAE, "k": 4,
         "multi_topk": False, "skip_connection": False, "d_in": D_IN}))
    sae = load_sae(folder)
    # sparsify: pre = relu(encoder(x - b_dec)); keep the top k; out = acts @ W_dec[idx] + b_dec
    pre = torch.relu(torch.nn.functional.linear(X - w["b_dec"], w["encoder.weight"],
                                                w["encoder.bias"]))
    top = pre.topk(4, dim=-1)
    expected_out = torch.einsum("bpk,bpkd->bpd", top.values, w["W_dec"][top.indices]) + \
        w["b_dec"]
    feats = sae.encode(X)
    assert torch.allclose(sae.decode(feats), expected_out, atol=1e-4)
    assert torch.allclose(feats.gather(-1, top.indices), top.values, atol=1e-5)
    assert sae.layout == "sparsify" and sae.hook == "blocks.2.hook_resid_post"


def test_sparsify_hook_names():
    assert sparsify_hook("layers.6") == "blocks.6.hook_resid_post"
    assert sparsify_hook("gpt_neox.layers.3") == "blocks.3.hook_resid_post"
    assert sparsify_hook("h.0") == "blocks.0.hook_resid_post"
    assert sparsify_hook("layers.6.mlp") is None


def test_hook_override_resolves_through_the_site_table(tmp_path):
    folder, _ = _saelens(tmp_path, "standard")
    sae = load_sae(folder, hook="blocks.0.hook_mlp_in")
    assert sae.hook == "blocks.0.mlp.hook_in"


def test_missing_weights_and_unknown_architecture_say_what_to_do(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelUnavailable, match="no cfg.json"):
        load_sae(folder)
    (folder / "cfg.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="sae_weights.safetensors"):
        load_sae(folder)
    bad, _ = _saelens(tmp_path, "gated")
    with pytest.raises(ModelUnavailable, match="not supported; supported: standard"):
        load_sae(bad)


def test_sae_without_hook_needs_one(tmp_path):
    folder, _ = _saelens(tmp_path, "standard", hook_name=None)
    with pytest.raises(HarnessError, match="give `hook:`"):
        load_sae(folder)
