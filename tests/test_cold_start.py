"""`harness validate` is a cold start: no torch, no transformers, no weights."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from harness.cli import main
code = main(["validate", *sys.argv[1:]])
heavy = sorted(m for m in ("torch", "transformers", "transformer_lens", "safetensors.torch")
               if m in sys.modules)
print("HEAVY", heavy)
sys.exit(code)
"""


def _validate(*paths, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["INTERP_HARNESS_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def test_validate_imports_no_torch_and_loads_no_weights(tmp_path):
    """On an empty cache the SmolLM2 specs' GGUF tokenizer is built once by transformers'
    converter (no torch); from then on validate imports neither."""
    for run, allowed in ((1, {"transformers"}), (2, set())):
        done = _validate(REPO / "specs", cache=tmp_path / "cache")
        assert done.returncode == 0, done.stderr
        assert "ok: " in done.stdout and "toy_negative_reviews.yaml (" in done.stdout
        heavy = done.stdout.split("HEAVY ")[-1].strip()
        assert set(ast.literal_eval(heavy)) <= allowed, f"run {run}: {heavy}"
    assert list((tmp_path / "cache" / "gguf-tokenizers").glob("*.json"))


def test_validate_still_catches_multi_token_answers_without_torch(tmp_path, tiny_checkpoints):
    from harness.testing import write_spec

    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "This movie was"
          answer: " unbelievably"
          foil: " good"
        """, """\
        - id: x
          measure: logit_diff
          model: a
          expect: {">": 0}
        """)
    done = _validate(path)
    assert done.returncode == 2
    assert "spec.yaml:6: prompts[0].answer: answer ' unbelievably' is" in done.stderr
    assert "tokens for model 'a'" in done.stderr and "HEAVY []" in done.stdout


@pytest.mark.parametrize("text", [" bad", "bad", " good.", " unbelievably", "  ", "é"])
def test_light_tokenizer_splits_like_the_hf_tokenizer(tiny_checkpoints, text):
    from transformers import AutoTokenizer

    from harness.prompts import single_token_id
    from harness.spec import load_spec
    from harness.testing import write_spec
    from harness.validate import light_pieces, light_tokenizer

    directory = tiny_checkpoints["a"]
    spec = load_spec(write_spec(directory.parent, directory, """\
        - text: "x"
          answer: " bad"
          foil: " good"
        """, "- id: x\n  measure: logit_diff\n  model: a\n  expect: {'>': 0}\n", name="light"))
    light = light_tokenizer(spec, "a")
    assert light is not None
    assert light_pieces(light, text) == single_token_id(AutoTokenizer.from_pretrained(
        str(directory)), text)


def test_json_report_has_a_timing_section(tmp_path, tiny_checkpoints):
    import json

    from harness.cli import main
    from harness.testing import write_spec

    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "This movie was"
          answer: " bad"
          foil: " good"
        """, """\
        - id: x
          measure: logit_diff
          model: a
          expect: {"<": 1000}
        - id: y
          measure: logit_diff
          model: a
          expect: {"<": 1000}
        """)
    out = tmp_path / "r.json"
    assert main(["run", str(path), "-q", "--report-json", str(out)]) == 0
    timing = json.loads(out.read_text())["timing"]
    assert set(timing) >= {"import_s", "model_load_s", "first_claim_s", "first_verdict_after_s",
                           "total_s"}
    assert timing["model_load_s"]["a"] > 0 and timing["first_claim_s"] >= \
        timing["model_load_s"]["a"]            # the first claim pays the one model load
    assert timing["total_s"] >= timing["first_verdict_after_s"] > 0
