"""Inputs that would hang a run or exhaust memory are bounded, with an error that says the
limit (issue 20, items 13-15). Anything that could hang or blow up before its fix runs in a
subprocess with a timeout and a memory cap, so a regression fails instead of stalling CI."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(harness.__file__).resolve().parents[1]
HEAD = """\
models:
  a: {zoo: toy-reviews-source}
prompts:
"""
CLAIM = """\
claims:
  - {id: c, measure: logit_diff, model: a, expect: {">": 0}}
"""


def bounded(*args: str, timeout: float = 120, memory_mb: int = 2000,
            cwd: Path | None = None) -> tuple[int, str]:
    """`python -m harness.cli ARGS` with a wall-clock limit and an address-space cap."""
    def cap():
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap, env=env, cwd=cwd)
    return done.returncode, done.stdout + done.stderr


def write_spec(tmp_path: Path, prompts: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD + prompts + CLAIM)
    return path


# ----------------------------------------------------------------------------- 13: sizes

def test_template_with_ten_billion_expansions(tmp_path):
    names = "abcdefghij"
    values = ", ".join(f"{n}: [{', '.join(f'w{i}' for i in range(10))}]" for n in names)
    path = write_spec(tmp_path, '  - template: "' + "".join(f"{{{n}}}" for n in names)
                      + f'"\n    values: {{{values}}}\n    answer: " bad"\n    foil: " good"\n')
    assert path.stat().st_size < 1000
    code, out = bounded("validate", str(path))
    assert code == 2 and "Traceback" not in out, out
    assert f"{path}:4: prompts[0]" in out and "10,000,000,000 prompts" in out \
        and "100,000" in out, out


def test_huge_corpus_with_a_small_limit(tmp_path):
    path = write_spec(tmp_path, '  - {corpus: {n: 1e9}, limit: 2, answer: " bad", '
                                'foil: " good"}\n')
    code, out = bounded("validate", str(path), timeout=60)
    assert code == 2 and f"{path}:4: prompts[0].corpus.n" in out and "100000" in out, out


def test_first_words_beyond_any_prompt(tmp_path):
    path = write_spec(tmp_path, '  - {corpus: {n: 2}, first_words: 5000000000, '
                                'answer: " bad", foil: " good"}\n')
    code, out = bounded("validate", str(path), timeout=60)
    assert code == 2 and f"{path}:4: prompts[0].first_words" in out and "100000" in out, out
    assert "Traceback" not in out


def test_many_entries_add_up_to_the_limit(tmp_path):
    from harness.errors import SpecError
    from harness.spec import load_spec

    values = ", ".join(f"w{i}" for i in range(300))
    entry = (f'  - template: "{{a}} {{b}}"\n    values: {{a: [{values}], b: [{values}]}}\n'
             '    answer: " bad"\n    foil: " good"\n')
    path = write_spec(tmp_path, entry * 2)      # 90,000 each: under the limit alone
    with pytest.raises(SpecError, match="more than the limit of 100,000 prompts"):
        load_spec(path)


def test_a_billion_shards_is_a_usage_error():
    from harness.errors import HarnessError
    from harness.shard import parse_shard

    with pytest.raises(HarnessError, match="N <= 10,000"):
        parse_shard("1/1000000000")
    assert parse_shard("3/10000") == (3, 10_000)


# ----------------------------------------------------------------------------- 14: files

def model_copy(tmp_path: Path, src: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, tmp_path / "model"))


def model_spec(tmp_path: Path, model: Path, prompts: str | None = None, name="spec") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f'models:\n  a: {{path: "{model}"}}\nprompts:\n'
                    + (prompts or '  - {text: "This movie was really", answer: " bad", '
                                  'foil: " good"}\n') + CLAIM)
    return path


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_prompt_file_that_is_no_regular_file(tmp_path, tiny_checkpoints, source):
    if source == "fifo":
        os.mkfifo(tmp_path / "p.txt")
        source = "p.txt"
    path = model_spec(tmp_path, tiny_checkpoints["a"],
                      f'  - {{file: "{source}", answer: " bad", foil: " good"}}\n')
    code, out = bounded("validate", str(path), timeout=60)
    assert code == 2 and f"{path}:4: prompts[0].file" in out and "not a regular file" in out, out


def test_a_fifo_among_the_specs_of_a_folder(tmp_path, tiny_checkpoints):
    good = model_spec(tmp_path, tiny_checkpoints["a"])
    os.mkfifo(tmp_path / "pipe.yaml")
    code, out = bounded("validate", str(tmp_path), timeout=60)
    assert code == 2 and f"ok: {good}" in out, out
    assert f"{tmp_path / 'pipe.yaml'}" in out and "FIFO" in out, out


@pytest.mark.parametrize("case", ["fifo-weights", "zero-config", "fifo-tokenizer"])
def test_model_folder_files_that_are_no_regular_files(tmp_path, tiny_checkpoints, case):
    model = model_copy(tmp_path, tiny_checkpoints["a"])
    target = {"fifo-weights": "model.safetensors", "zero-config": "config.json",
              "fifo-tokenizer": "tokenizer.json"}[case]
    (model / target).unlink()
    if case == "zero-config":
        (model / target).symlink_to("/dev/zero")
    else:
        os.mkfifo(model / target)
    path = model_spec(tmp_path, model)
    code, out = bounded("validate", str(path), timeout=60)
    assert code == 2 and f"{path}:2: models.a" in out and str(model / target) in out, out
    assert "not a regular file" in out and "Traceback" not in out, out


def test_a_config_with_a_hundred_million_layers_never_loads(tmp_path, tiny_checkpoints):
    import json

    model = model_copy(tmp_path, tiny_checkpoints["a"])
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_layer": 100_000_000}))
    path = model_spec(tmp_path, model)
    code, out = bounded("run", str(path), "-q", timeout=300, memory_mb=6_000)
    assert code == 2 and f"{path}:2: models.a" in out and "limit of 10,000" in out, out


# ----------------------------------------------------------------------------- 15: head_scores

PEAK = """\
import resource, sys
from harness.cli import main
code = main(sys.argv[1:])
print("peak-kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "code", code)
"""


def peak_rss_mb(tmp_path: Path, model: Path, count: int) -> float:
    """Peak resident memory of a whole `harness run` of one head_scores claim, in MB."""
    path = tmp_path / f"heads{count}.yaml"
    path.write_text(f'models:\n  a: {{path: "{model}"}}\nclaims:\n'
                    "  - {id: h, measure: head_scores, model: a, role: induction, "
                    f"random_tokens: {{count: {count}, length: 31}}, "
                    "expect: {max: {'>': -1}}}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", PEAK, "run", str(path), "-q",
                           "--memory-budget-mb", "64", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env)
    words = done.stdout.split()
    assert "peak-kb" in words and words[-1] == "0", done.stdout + done.stderr
    return int(words[words.index("peak-kb") + 1]) / 1024


def test_head_scores_memory_stays_within_the_budget(tmp_path, tiny_checkpoints):
    """1,500 sequences of 63 tokens hold 190 MB of attention patterns on the tiny model (2
    layers x 4 heads): joined, the run's peak grows by about three times that over 100
    sequences; reduced slice by slice it grows by less than the 64 MB budget."""
    small = peak_rss_mb(tmp_path, tiny_checkpoints["a"], 100)
    large = peak_rss_mb(tmp_path, tiny_checkpoints["a"], 1500)
    print(f"peak RSS: {small:.0f} MB at count 100, {large:.0f} MB at count 1500")
    assert large - small < 64, (small, large)
