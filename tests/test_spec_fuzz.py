"""Any bytes given as a spec yield a Spec or a SpecError naming the file, never another
exception (hypothesis, derandomized so CI sees the same examples every run)."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import SpecError
from harness.spec import Spec, load_spec

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))

FIELDS = ["spec", "models", "prompts", "prompt_sets", "claims", "defaults", "zoo", "path", "hf",
          "text", "template", "values", "answer", "foil", "corrupt", "id", "measure", "model",
          "models", "expect", "site", "layers", "heads", "positions", "neurons", "from", "into",
          "over", "k", "per_prompt", "tolerance", "atol", "search", "substitute", "train",
          "logit_diff", "patch", "patch_sweep", "top_k", "generate", ">", "<", "between",
          "argmax", "top", "only_above", "cells", "layer", "pos", "fraction", "file", "corpus",
          "toy-reviews-source", "source", "{a}", "{a.b}", "{0}", "L0H0", "L99H99", "optional"]

scalars = (st.sampled_from(FIELDS) | st.text(max_size=8) | st.integers(-3, 300)
           | st.floats(allow_nan=False) | st.booleans() | st.none())
yaml_shaped = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.integers(0, 3), inner, max_size=5),
    max_leaves=40)
spec_shaped = st.fixed_dictionaries(
    {"models": st.just({"source": {"zoo": "toy-reviews-source"}}) | yaml_shaped,
     "prompts": st.just([{"text": "This movie was", "answer": " bad", "foil": " good"}])
     | yaml_shaped,
     "claims": st.lists(st.fixed_dictionaries(
         {"id": st.just("c") | yaml_shaped,
          "measure": st.sampled_from(["logit_diff", "top_k", "generate", "patch", "dla",
                                      "patch_sweep", "ablate", "logit_lens", "nope"]),
          "model": st.just("source") | yaml_shaped, "expect": yaml_shaped},
         optional={k: yaml_shaped for k in ("site", "layers", "heads", "over", "from", "into",
                                            "k", "per_prompt", "models", "search")}),
         max_size=3)},
    optional={"prompt_sets": yaml_shaped, "defaults": yaml_shaped})


def _load(tmp_path, raw: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        assert isinstance(load_spec(path), Spec)
    except SpecError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes(tmp_path_factory, raw):
    _load(tmp_path_factory.mktemp("b"), raw)


@FUZZ
@given(data=yaml_shaped)
def test_arbitrary_yaml_shaped_mappings(tmp_path_factory, data):
    _load(tmp_path_factory.mktemp("y"), yaml.safe_dump(data).encode())


@FUZZ
@given(data=spec_shaped)
def test_arbitrary_spec_shaped_mappings(tmp_path_factory, data):
    _load(tmp_path_factory.mktemp("s"), yaml.safe_dump(data, allow_unicode=True).encode())
