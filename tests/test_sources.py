"""One source resolver (harness/sources.py): every caller finds a model's files in the same place,
and the identity that keys loaded models and clean traces covers every field of a source."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from harness import static_checks
from harness.models import model_key, resolve_location
from harness.sources import locate, source_key
from harness.spec import ModelSource, load_spec
from harness.train import resolve_model
from harness.validate import light_tokenizer


def _spec(tmp_path: Path, models: dict):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "models": models,
        "prompts": [{"text": "This movie was really", "answer": " bad", "foil": " good"}],
        "claims": [{"id": "c", "measure": "logit_diff", "model": next(iter(models)),
                    "expect": {"between": [-100, 100]}}]}))
    return load_spec(path)


def test_the_four_callers_find_the_same_folder(tmp_path, tiny_checkpoints):
    folder = tiny_checkpoints["a"]
    spec = _spec(tmp_path, {"local": {"path": str(folder)}, "toy": {"zoo": "toy-reviews-source"},
                            "tuned": {"train": {"recipe": "rlhf-sentiment", "base": "local"}}})
    for name, recipe_name in (("local", str(folder)), ("toy", "toy-reviews-source")):
        source = spec.models[name]
        found = locate(source, spec.directory)
        assert found.target == resolve_location(source, spec.directory) \
            == resolve_model(recipe_name) == str(found.directory)
        assert static_checks._facts_of(spec, name) is not None
        assert found.weight_files and all(p.parent == found.directory and
                                          p.suffix in (".safetensors", ".bin")
                                          for p in found.weight_files)
        ids = light_tokenizer(spec, name).encode(" bad good", add_special_tokens=False).ids
        from tokenizers import Tokenizer

        direct = Tokenizer.from_file(str(found.directory / "tokenizer.json"))
        assert ids == direct.encode(" bad good", add_special_tokens=False).ids
    # a trained model has its base's files for the static checks and the token checks
    shapes = [replace(static_checks._facts_of(spec, n), tokenizer=None) for n in ("tuned", "local")]
    assert shapes[0] == shapes[1] and shapes[0].n_layers == 2
    assert light_tokenizer(spec, "tuned").get_vocab() == light_tokenizer(spec, "local").get_vocab()


def test_a_new_source_field_changes_the_key(tmp_path, tiny_checkpoints):
    class WithQuant(ModelSource):      # a field a later version may add
        quant: str | None = None

    a = WithQuant(path=str(tiny_checkpoints["a"]), quant="q4")
    b = WithQuant(path=str(tiny_checkpoints["a"]), quant="q8")
    location = str(tiny_checkpoints["a"])
    assert source_key(a, tmp_path) != source_key(b, tmp_path)
    assert model_key("m", a, location, "cpu") != model_key("m", b, location, "cpu")
    # where and whether it loads is not part of the weights' identity
    assert source_key(a, tmp_path) == source_key(a.model_copy(update={"optional": True}),
                                                 tmp_path)


def test_paths_are_keyed_absolute(tmp_path, tiny_checkpoints):
    here = ModelSource(path="a")
    (tmp_path / "x").mkdir()
    assert source_key(here, tmp_path) != source_key(here, tmp_path / "x")
    assert source_key(here, tmp_path) == source_key(ModelSource(path=str(tmp_path / "a")),
                                                    Path("/elsewhere"))
