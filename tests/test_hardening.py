"""Hostile and malformed inputs, each as a new user met it (issue 12): a clear SpecError naming
file, line and field before any weights load; nothing lost; nothing run unasked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.spec import load_spec

GOOD = b"""\
models:
  source: {zoo: toy-reviews-source}
prompts:
  - text: "This movie was really"
    answer: " bad"
    foil: " good"
claims:
  - id: c
    measure: logit_diff
    model: source
    expect: {">": 0}
"""


def spec_error(tmp_path: Path, raw: bytes, name: str = "bad.yaml") -> SpecError:
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    return info.value


# ----------------------------------------------------------------------------- reading specs

def test_non_utf8_byte_is_a_spec_error(tmp_path):
    err = spec_error(tmp_path, GOOD.replace(b"really", b"r\xe9ally"))
    assert "not UTF-8" in str(err) and "0xe9" in str(err) and err.line == 4


def test_deep_nesting_is_a_spec_error(tmp_path):
    err = spec_error(tmp_path, GOOD + b"description: " + b"[" * 1000 + b"]" * 1000 + b"\n")
    assert "nests deeper than" in str(err)
    err = spec_error(tmp_path, GOOD + b"description:\n" + b"".join(
        b"  " * i + b"- \n" for i in range(200)))
    assert "nests deeper than" in str(err)


def test_alias_bomb_stops_quickly(tmp_path):
    rows = ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
    rows += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    start = time.perf_counter()
    err = spec_error(tmp_path, GOOD + "\n".join(rows).encode() + b"\n")
    assert "expands to more than" in str(err) and time.perf_counter() - start < 10


def test_self_referencing_alias(tmp_path):
    assert "nests deeper" in str(spec_error(tmp_path, GOOD + b"x: &a [*a]\n"))


def test_oversized_spec(tmp_path):
    err = spec_error(tmp_path, GOOD + b"# " + b"x" * 5_000_000 + b"\n")
    assert "larger than" in str(err) and "file:" in str(err)


def test_yaml_12_numbers(tmp_path):
    raw = GOOD.replace(b'{">": 0}', b'{between: [1e-3, 1.0e6]}') + \
        b"defaults: {tolerance: {atol: .5e-2}}\n"
    path = tmp_path / "numbers.yaml"
    path.write_bytes(raw)
    spec = load_spec(path)
    assert spec.claims[0].expect["between"] == [0.001, 1e6]
    assert spec.defaults.tolerance.atol == 0.005


def test_merge_keys_say_what_to_do(tmp_path):
    err = spec_error(tmp_path, GOOD + b"base: &b {x: 1}\nother:\n  <<: *b\n")
    assert "merge keys" in str(err) and err.line == 14


def test_nan_bound_is_rejected(tmp_path):
    err = spec_error(tmp_path, GOOD.replace(b'{">": 0}', b'{">": .nan}'))
    assert "claims[0].expect.>" in str(err) and ".nan" in str(err) and err.line == 11


def test_answer_equal_to_foil_is_rejected(tmp_path):
    err = spec_error(tmp_path, GOOD.replace(b'" good"', b'" bad"'))
    assert "prompts[0].foil" in str(err) and err.line == 6 and "always 0" in str(err)


def test_bad_template_conversion(tmp_path):
    raw = GOOD.replace(b'- text: "This movie was really"',
                       b'- template: "{a!z}"\n    values: {a: [x]}')
    assert "cannot be filled in" in str(spec_error(tmp_path, raw))


def test_top_level_key_named_like_a_measure(tmp_path):
    assert "unknown field 'logit_diff'" in str(spec_error(tmp_path, GOOD + b"logit_diff: 1\n"))


def test_parsing_a_large_spec_is_fast(tmp_path):
    """~1 MB of prompts parses in well under the old ~10 s."""
    row = b'  - {text: "This movie was really", answer: " bad", foil: " good"}\n'
    raw = GOOD.replace(b"claims:", b"".join([row] * 15_000) + b"claims:")
    path = tmp_path / "big.yaml"
    path.write_bytes(raw)
    start = time.perf_counter()
    assert len(load_spec(path).prompts) == 15_001
    assert time.perf_counter() - start < 8
