"""`measure: neuron` against ground truth: the HF model's MLP hidden activations (the input of
each layer's MLP output projection, read with a plain PyTorch forward pre-hook) on three
architectures; a false claim fails; out-of-range neurons are spec errors before weights load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.errors import SpecError
from harness.runner import run_spec_file
from harness.session import Session
from harness.testing import build_tiny_checkpoint, write_spec
from harness.validate import validate_spec

PROMPTS = ["the movie was great and the", "a plot so dull"]   # different lengths: padding
OUTPUT_PROJECTION = {"gpt2": "mlp.c_proj", "pythia": "mlp.dense_4h_to_h",
                     "llama": "mlp.down_proj"}


@pytest.fixture(scope="module", params=sorted(OUTPUT_PROJECTION))
def model(request, tmp_path_factory):
    arch = request.param
    directory = build_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch) / "m")
    return arch, directory


def hf_hidden(arch: str, directory) -> list[torch.Tensor]:
    """Per prompt, [layer, pos, d_mlp]: what each MLP's output projection receives, BOS first
    (the harness prepends it)."""
    hf = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    blocks = [m for n, m in hf.named_modules() if n.endswith(OUTPUT_PROJECTION[arch])]
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].detach()))
               for b in blocks]
    out = []
    try:
        for text in PROMPTS:
            seen.clear()
            ids = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"]
            with torch.no_grad():
                hf(torch.tensor([ids]))
            out.append(torch.stack(seen))
    finally:
        for h in handles:
            h.remove()
    return out


def run(tmp_path, directory, claims: str) -> dict:
    prompts = "".join(f'- text: "{t}"\n' for t in PROMPTS)
    path = write_spec(tmp_path, directory, prompts, claims)
    result = run_spec_file(path, Session(verbose=False, device="cpu"))
    assert result.error is None, result.error
    return {v.claim_id: v for v in result.verdicts}


def test_one_neuron_at_the_final_position_is_the_hf_activation(tmp_path, model):
    arch, directory = model
    truth = hf_hidden(arch, directory)
    value = float(torch.stack([t[1, -1, 5] for t in truth]).mean())
    verdicts = run(tmp_path, directory, f"""\
        - {{id: right, measure: neuron, model: a, layer: 1, neuron: 5,
           expect: {{approx: {value!r}, atol: 1.0e-4}}}}
        - {{id: wrong, measure: neuron, model: a, layer: 1, neuron: 5,
           expect: {{'>': {value + 0.5!r}}}}}
        - {{id: each, measure: neuron, model: a, layer: 1, neuron: 5, per_prompt: all,
           expect: {{'<': {max(float(t[1, -1, 5]) for t in truth) + 1e-3!r}}}}}
        """)
    assert verdicts["right"].status == "passed", verdicts["right"].message
    assert verdicts["wrong"].status == "failed"
    assert verdicts["each"].status == "passed", verdicts["each"].message
    assert verdicts["right"].extras["per_prompt"] == pytest.approx(
        [float(t[1, -1, 5]) for t in truth], abs=1e-4)


def test_a_grid_over_layers_and_neurons_with_a_position_rule(tmp_path, model):
    arch, directory = model
    truth = hf_hidden(arch, directory)
    neurons = [0, 3, 7]
    # mean over each prompt's own tokens (BOS excluded), then over prompts
    expected = torch.stack([t[:, 1:, neurons].mean(1) for t in truth]).mean(0)   # [layer, n]
    verdicts = run(tmp_path, directory, f"""\
        - {{id: grid, measure: neuron, model: a, neurons: {neurons}, position: all,
           reduce: mean, expect: {{max: {{'>': -1000}}}}}}
        """)
    measured = verdicts["grid"].measured
    assert measured["axes"] == ["layer", "neuron"]
    assert measured["labels"] == [[0, 1], neurons]
    torch.testing.assert_close(torch.tensor(measured["values"]), expected, atol=1e-4, rtol=0)


def test_out_of_range_neurons_are_spec_errors_before_weights_load(tmp_path):
    directory = build_tiny_checkpoint("gpt2", tmp_path / "m")   # 2 layers, d_mlp 128
    path = write_spec(tmp_path, directory, '- text: "the movie"\n', """\
        - {id: c, measure: neuron, model: a, layer: 1, neuron: 128, expect: {'>': 0}}
        """)
    with pytest.raises(SpecError, match=r"claims\[0\].neuron: neuron 128 is out of range: "
                                        r"model 'a' has 128 neurons"):
        validate_spec(path)


def test_a_neuron_needs_its_layer():
    from harness.kinds.neuron import NeuronClaim

    with pytest.raises(ValueError, match="both `layer` and `neuron`"):
        NeuronClaim(id="c", measure="neuron", model="a", neuron=3, expect={">": 0})
