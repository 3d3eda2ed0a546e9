"""Claims over prompt families: file/dataset/corpus sources, bootstrap intervals, counterexample
search."""

from __future__ import annotations

import json
import random

import pytest
import torch

from harness import testing
from harness.cli import main as harness_main
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec
from harness.stats import bootstrap_mean_ci

NOUNS = ["acting", "plot", "movie", "film", "story", "music", "ending", "script"]


def write_spec(tmp_path, model_dir, prompts: str, claims: str, name="family"):
    return testing.write_spec(tmp_path, model_dir, prompts, claims, name)


def test_file_and_jsonl_prompts(tmp_path, tiny_checkpoints):
    (tmp_path / "p.txt").write_text("This movie was really good\n\nThe acting was fine\n")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"review": "The plot was really", "answer": " good"}) + "\n")
    spec = load_spec(write_spec(tmp_path, tiny_checkpoints["a"], """\
        - file: p.txt
          first_words: 3
          answer: " bad"
          foil: " good"
        - file: p.jsonl
          field: review
          answer: " bad"
          foil: " fun"
        """, """\
        - id: x
          measure: logit_diff
          model: a
          expect: {">": -100}
        """))
    prompts = spec.prompt_set(None)
    assert [p.text for p in prompts] == ["This movie was", "The acting was",
                                         "The plot was really"]
    assert prompts[2].answer == " good" and prompts[2].foil == " fun"


def test_dataset_prompts_reproduce_the_seed_recipe(tmp_path, tiny_checkpoints):
    """The seed: prompts = the first 4 words of each IMDB review, read with `datasets`."""
    reviews = ["I rented this movie last weekend and it was bad.",
               "One of the best   films I have ever seen.", "Short one"]
    with open(tmp_path / "imdb.jsonl", "w") as handle:
        for text in reviews:
            handle.write(json.dumps({"text": text, "label": 0}) + "\n")
    spec = load_spec(write_spec(tmp_path, tiny_checkpoints["a"], """\
        - dataset: {name: json, data_files: imdb.jsonl, split: train, field: text}
          first_words: 4
          limit: 512
          answer: " bad"
          foil: " good"
        """, """\
        - id: x
          measure: logit_diff
          model: a
          expect: {">": -100}
        """))
    assert [p.text for p in spec.prompt_set(None)] == [" ".join(r.split()[:4])
                                                       for r in reviews]


def test_missing_dataset_is_a_spec_error(tmp_path, tiny_checkpoints, capsys):
    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - dataset: {name: json, data_files: nowhere.jsonl}
          answer: " bad"
          foil: " good"
        """, """\
        - id: x
          measure: logit_diff
          model: a
          expect: {">": 0}
        """)
    assert harness_main(["validate", str(path)]) == 2
    assert "cannot load dataset 'json'" in capsys.readouterr().err


def test_corpus_prompts_of_different_lengths(tmp_path, tiny_checkpoints):
    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - corpus: {n: 12, seed: 3}
          first_words: 5
          answer: " bad"
          foil: " good"
        """, """\
        - id: x
          measure: logit_diff
          model: a
          per_prompt: all
          expect: {">": -100}
        """)
    spec = load_spec(path)
    assert len(spec.prompt_set(None)) == 12
    result = run_spec_file(path, Session(verbose=False))
    (verdict,) = result.verdicts
    assert verdict.status == "passed" and len(verdict.extras["per_prompt"]) == 12


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = torch.Generator().manual_seed(0)
    trials, covered = 300, 0
    for trial in range(trials):
        sample = torch.randn(60, generator=rng) * 2.0 + 1.5
        low, high = bootstrap_mean_ci(sample, 0.95, n_boot=1000, seed=trial)
        covered += low <= 1.5 <= high
    assert 0.90 <= covered / trials <= 0.98


def test_claims_gate_on_the_interval(tmp_path, tiny_checkpoints):
    prompts = """\
        - template: "The {noun} was"
          values: {noun: [%s]}
          answer: " bad"
          foil: " good"
        """ % ", ".join(NOUNS)
    probe = write_spec(tmp_path, tiny_checkpoints["a"], prompts, """\
        - id: probe
          measure: logit_diff
          model: a
          ci: 0.95
          expect: {">": -100}
        """, name="probe")
    (verdict,) = run_spec_file(probe, Session(verbose=False)).verdicts
    stats = verdict.extras["stats"]
    assert stats["n"] == len(NOUNS) and stats["low"] < stats["mean"] < stats["high"]
    assert len(stats["lowest_prompts"]) == 3
    # a threshold between the interval's low end and the mean: the mean passes, the gate fails
    threshold = (stats["low"] + stats["mean"]) / 2
    gated = write_spec(tmp_path, tiny_checkpoints["a"], prompts, f"""\
        - id: point
          measure: logit_diff
          model: a
          expect: {{">": {threshold}}}
        - id: gated
          measure: logit_diff
          model: a
          ci: 0.95
          expect: {{">": {threshold}}}
        """, name="gated")
    point, gate = run_spec_file(gated, Session(verbose=False)).verdicts
    assert point.status == "passed"
    assert gate.status == "failed" and "95% interval" in gate.message


def test_search_finds_the_planted_failing_value_and_remembers_it(tmp_path, tiny_checkpoints):
    nouns = NOUNS[:]
    random.Random(0).shuffle(nouns)
    prompts = """\
        - template: "The {noun} was"
          values: {noun: [%s]}
          answer: " bad"
          foil: " good"
        """
    probe = write_spec(tmp_path, tiny_checkpoints["a"], prompts % ", ".join(nouns), """\
        - id: probe
          measure: logit_diff
          model: a
          per_prompt: all
          expect: {">": -100}
        """, name="probe")
    (verdict,) = run_spec_file(probe, Session(verbose=False)).verdicts
    values = dict(zip([f"The {n} was" for n in nouns], verdict.extras["per_prompt"]))
    ranked = sorted(values.values())
    planted = max(values, key=values.get)          # the only prompt above the threshold
    threshold = (ranked[-1] + ranked[-2]) / 2
    # the claim is checked on the first value only; the search must find the planted one
    spec = write_spec(tmp_path, tiny_checkpoints["a"], prompts % ", ".join(nouns), f"""\
        - id: below
          measure: logit_diff
          model: a
          prompt: "The {nouns[0] if planted != f'The {nouns[0]} was' else nouns[1]} was"
          expect: {{"<": {threshold}}}
          search: {{max_examples: 40, substitute: {{was: [is]}}}}
        """, name="searched")
    (verdict,) = run_spec_file(spec, Session(verbose=False)).verdicts
    assert verdict.status == "failed"
    found = verdict.extras["search"]
    assert found["found"] == planted and found["known"] is False
    assert found["choices"]["swap"] == {"was": "was"}   # shrunk: no needless substitution
    assert "counterexample found" in verdict.message
    # the store is read first next time
    (again,) = run_spec_file(spec, Session(verbose=False)).verdicts
    assert again.extras["search"]["known"] is True and again.status == "failed"


def test_search_without_counterexample_passes(tmp_path, tiny_checkpoints):
    spec = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - template: "The {noun} was"
          values: {noun: [acting, plot]}
          answer: " bad"
          foil: " good"
        """, """\
        - id: loose
          measure: logit_diff
          model: a
          expect: {">": -100}
          search: {max_examples: 5}
        """)
    (verdict,) = run_spec_file(spec, Session(verbose=False)).verdicts
    assert verdict.status == "passed" and "found no counterexample" in verdict.message


@pytest.mark.parametrize("field, words", [("ci: 0.95", "`ci` applies"),
                                          ("search: {max_examples: 0}", "greater than or equal")])
def test_family_options_are_validated(tmp_path, tiny_checkpoints, field, words):
    from harness.errors import SpecError

    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "The plot was"
          answer: " bad"
          foil: " good"
        """, f"""\
        - id: x
          measure: top_k
          model: a
          {field}
          expect: {{includes: [" bad"]}}
        """)
    with pytest.raises(SpecError, match=words):
        load_spec(path)


def test_sampled_generations_with_a_rate(tmp_path, tiny_checkpoints):
    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "This movie was"
          answer: " bad"
          foil: " good"
        """, """\
        - id: sampled
          measure: generate
          model: a
          temperature: 1.0
          samples: 6
          seed: 7
          max_new_tokens: 4
          expect: {rate: {contains: "This movie", ">=": 1.0}}
        - id: never
          measure: generate
          model: a
          temperature: 1.0
          samples: 6
          max_new_tokens: 4
          expect: {rate: {contains: "zzzz", ">": 0.5}}
        """)
    sampled, never = run_spec_file(path, Session(verbose=False)).verdicts
    assert sampled.status == "passed" and len(sampled.measured["texts"]) == 6
    assert len(set(sampled.measured["texts"])) > 1          # seeds differ per sample
    assert never.status == "failed" and "0/6 samples contain" in never.message
    (again, _) = run_spec_file(path, Session(verbose=False)).verdicts
    assert again.measured == sampled.measured              # seeded: reproducible


def test_generation_while_patching(tmp_path, tiny_checkpoints):
    from harness.measure.generation import generate_uncached as generate
    from harness.measure.generation import patch_hooks
    from harness.models import load_model
    from harness.spec import ModelSource

    a = load_model("a", ModelSource(path="a"), str(tiny_checkpoints["a"]), "cpu")
    b = load_model("b", ModelSource(path="b"), str(tiny_checkpoints["b"]), "cpu")
    texts = ["This movie was", "The acting was", "I thought the plot was"]
    heads = tuple((layer, head) for layer in (0, 1) for head in range(4))
    changed = 0
    for text in texts:
        tokens = a.bridge.to_tokens(text, prepend_bos=True)[0]
        plain = generate(a, tokens, 10)
        self_patched = generate(a, tokens, 10,
                                patch=patch_hooks(a, "z", heads=heads))
        assert self_patched == plain          # patching a model with itself changes nothing
        patched = generate(a, tokens, 10,
                           patch=patch_hooks(b, "z", heads=heads))
        changed += patched != plain
    assert changed >= 1
