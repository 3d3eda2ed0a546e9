"""Spec loading: every example of the format parses; every bad input names file, line, field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.spec import expand, find_specs, load_spec

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent

BASE = """\
models:
  source: {zoo: toy-reviews-source}
  rlhf: {zoo: toy-reviews-rlhf}
prompts:
  - text: "This movie was really"
    answer: " bad"
    foil: " good"
claims:
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> SpecError:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def claim(body: str) -> str:
    return BASE + textwrap.indent(textwrap.dedent(body), "  ")


@pytest.mark.parametrize("name", ["spec_format_example.yaml", "spec_format_variants.yaml"])
def test_format_examples_parse(name):
    spec = load_spec(DATA / name)
    assert spec.claims
    assert len({c.id for c in spec.claims}) == len(spec.claims)


def test_doc_examples_parse(tmp_path):
    """Every complete spec in docs/spec-format.md (blocks with `claims:`) is valid."""
    text = (REPO / "docs" / "spec-format.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    specs = [b for b in blocks if "claims:" in b and "models:" in b]
    assert len(specs) >= 5
    for name in ("prompts.jsonl", "imdb.jsonl"):   # files the examples read
        (tmp_path / name).write_text('{"text": "This movie was really bad, I think"}\n')
    (tmp_path / "rows.jsonl").write_text('{"text": " The movie was", "answer": " bad"}\n')
    for i, block in enumerate(specs):
        load_spec(write(tmp_path, block, f"doc{i}.yaml"))


def test_spec_name_defaults_to_stem(tmp_path):
    path = write(tmp_path, claim("""\
        - id: a
          measure: logit_diff
          model: source
          expect: {"<": 0}
        """), "my_spec.yaml")
    assert load_spec(path).spec == "my_spec"


def test_template_expands_to_cross_product(tmp_path):
    spec = load_spec(DATA / "spec_format_example.yaml")
    texts = [p.text for p in spec.prompt_set(None)]
    assert texts[0] == "This movie was really"
    assert texts[1:] == ["This movie was really", "This movie was very", "This movie was quite",
                         "This film was really", "This film was very", "This film was quite"]


def test_corrupt_template_expands_with_the_same_values(tmp_path):
    from harness.spec import PromptEntry

    entry = PromptEntry(template="The {n} was great", corrupt="The {n} was awful",
                        values={"n": ["movie", "plot"]}, answer=" bad", foil=" good")
    assert [(p.text, p.corrupt) for p in expand((entry,))] == [
        ("The movie was great", "The movie was awful"),
        ("The plot was great", "The plot was awful")]


@pytest.mark.parametrize("body, line, path, words", [
    ("""\
     - id: a
       measure: logit_dif
       model: source
       expect: {"<": 0}
     """, 10, "claims[0].measure", ["unknown measure 'logit_dif'", "did you mean 'logit_diff'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: sorce
       expect: {"<": 0}
     """, 11, "claims[0].model", ["unknown model 'sorce'", "did you mean 'source'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       expct: {"<": 0}
     """, 12, "claims[0].expct", ["unknown field 'expct'", "did you mean 'expect'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
     """, 9, "claims[0].expect", ["missing required field 'expect'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       expect: {"<": 0}
     - id: a
       measure: logit_diff
       model: rlhf
       expect: {">": 0}
     """, 13, "claims[1].id", ["duplicate claim id 'a'"]),
    ("""\
     - id: a
       measure: patch
       from: rlhf
       into: source
       site: resid
       layers: [1]
       expect: {flips_sign: true}
     """, 13, "claims[0].site", ["unknown site 'resid'", "did you mean 'resid_pre'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       expect: {gt: 0}
     """, 12, "claims[0].expect.gt", ["unknown expectation 'gt'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       expect: {contains: " bad"}
     """, 12, "claims[0].expect.contains", ["does not apply to measure 'logit_diff'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       expect: {">": "zero"}
     """, 12, "claims[0].expect.>", ["needs a number", "'zero'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       prompts: shrt
       expect: {">": 0}
     """, 12, "claims[0].prompts", ["unknown prompt set 'shrt'"]),
    ("""\
     - id: a
       measure: patch_sweep
       from: rlhf
       into: source
       site: mlp_out
       over: [layer, head]
       expect: {argmax: {layer: 3, head: 0}}
     """, 9, "claims[0]", ["needs a per-head site"]),
    ("""\
     - id: a
       measure: patch
       from: rlhf
       into: source
       site: z
       heads: [L3-H0]
       expect: {flips_sign: true}
     """, 14, "claims[0].heads", ["'L3-H0' is not a head name"]),
    ("""\
     - id: a
       measure: dla
       model: rlhf
       by: component
       expect: {argmax: {layer: [3]}}
     """, 13, "claims[0].expect.argmax", ["needs a cell"]),
    ("""\
     - id: a
       measure: dla
       model: rlhf
       by: neuron
       expect: {argmax: mlp3}
     """, 12, "claims[0].by", ["'layer', 'component' or 'head'", "'neuron'"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       per_prompt: most
       expect: {">": 0}
     """, 12, "claims[0].per_prompt", ["most"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       per_prompt: {fraction: "about half"}
       expect: {">": 0}
     """, 12, "claims[0].per_prompt", ["'about half' is not a comparison"]),
    ("""\
     - id: a
       measure: logit_lens
       model: source
       expect: {same_below: 2}
     """, 12, "claims[0].expect.same_below", ["does not apply"]),
    ("""\
     - id: a
       measure: logit_diff
       expect: {">": 0}
     """, 9, "claims[0].model", ["missing required field 'model'"]),
    # expectations that would hold whatever was measured, or never: spec errors
    ("""\
     - id: a
       measure: dla
       model: rlhf
       by: component
       expect: {top: {k: 2, includes: []}}
     """, 13, "claims[0].expect.top", ["non-empty list of cells"]),
    ("""\
     - id: a
       measure: dla
       model: rlhf
       by: component
       expect: {top: {k: 2, equals: [mlp3, mlp2, attn3]}}
     """, 13, "claims[0].expect.top", ["lists 3 cells but k is 2"]),
    ("""\
     - id: a
       measure: dla
       model: rlhf
       by: component
       expect: {top: {k: 2, equals: [mlp3, mlp3]}}
     """, 13, "claims[0].expect.top", ["names a cell twice"]),
    ("""\
     - id: a
       measure: generate
       model: rlhf
       expect: {contains: ""}
     """, 12, "claims[0].expect.contains", ["every text contains ''"]),
    ("""\
     - id: a
       measure: logit_diff
       model: source
       per_prompt: {fraction: ">= 0"}
       expect: {">": 0}
     """, 12, "claims[0].per_prompt", ["holds for every share", "tests nothing"]),
    ("""\
     - id: a
       measure: generate
       model: rlhf
       samples: 4
       temperature: 1.0
       expect: {rate: {contains: " bad", ">": 1}}
     """, 14, "claims[0].expect.rate", ["holds for no share", "never pass"]),
])
def test_claim_errors(tmp_path, body, line, path, words):
    err = error_of(tmp_path, claim(body))
    message = str(err)
    assert "spec.yaml" in message
    assert err.path == path, message
    assert err.line == line, message
    for word in words:
        assert word in message, message


def test_model_errors(tmp_path):
    err = error_of(tmp_path, """\
        models:
          source: {zoo: toy-reviews-source, hf: gpt2}
        claims: []
        """)
    assert err.path == "models.source" and err.line == 2
    assert "exactly one of hf / path / zoo / train" in str(err)

    err = error_of(tmp_path, """\
        models:
          source: {zoo: toy-reviews-source, dtype: float64}
        claims: []
        """)
    assert err.path == "models.source.dtype" and "'float32', 'bfloat16' or 'float16'" in str(err)

    err = error_of(tmp_path, """\
        models:
          source: {zoo: toy-reviews-source}
          tuned: {train: {recipe: rlhf-sentiment, base: sourc}}
        claims: []
        """)
    assert err.path == "models.tuned.train.base" and "did you mean 'source'" in str(err)


def test_template_errors(tmp_path):
    err = error_of(tmp_path, """\
        models:
          source: {zoo: toy-reviews-source}
        prompts:
          - template: "This {noun} was {adv}"
            values: {noun: [movie], adverb: [really]}
            answer: " bad"
            foil: " good"
        claims: []
        """)
    assert err.path == "prompts[0]" and err.line == 4
    assert "placeholder '{adv}' has no entry in `values`" in str(err)

    err = error_of(tmp_path, """\
        models:
          source: {zoo: toy-reviews-source}
        prompts:
          - text: "This movie was"
            template: "This {noun} was"
            answer: " bad"
            foil: " good"
        claims: []
        """)
    assert "exactly one of `text`, `template`, `file`, `dataset` or `corpus`" in str(err)


def test_yaml_errors(tmp_path):
    err = error_of(tmp_path, "models: {a: 1\nclaims: [")
    assert "invalid YAML" in str(err) and err.line is not None
    err = error_of(tmp_path, "models: !!python/object/apply:os.system ['echo hi']\n")
    assert "invalid YAML" in str(err) and "python/object" in str(err)
    err = error_of(tmp_path, "models: {}\nmodels: {}\nclaims: []\n")
    assert "duplicate key 'models'" in str(err) and err.line == 2
    err = error_of(tmp_path, "")
    assert "empty" in str(err)
    err = error_of(tmp_path, "- a\n- b\n")
    assert "a spec is a mapping" in str(err)


def test_several_errors_are_reported_together(tmp_path):
    err = error_of(tmp_path, claim("""\
        - id: a
          measure: logit_diff
          model: nope
          expect: {">": 0}
        - id: b
          measure: logit_diff
          model: nada
          expect: {">": 0}
        """))
    assert len(err.others) == 1
    assert "'nope'" in str(err) and "'nada'" in str(err)


def test_spec_objects_are_frozen():
    spec = load_spec(DATA / "spec_format_example.yaml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        spec.claims[0].id = "other"


def test_find_specs_sorted_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.yaml", "a.yml", "sub/c.yaml", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_specs([tmp_path])] == [
        "a.yml", "b.yaml", "sub/c.yaml"]
