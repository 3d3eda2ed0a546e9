"""Prompt text reaches the tokenizer exactly as written, from every source; rows carry their
own answer/foil; clean/corrupt token-length mismatches are reported before any model runs."""

from __future__ import annotations

import json

import pytest
import torch

from harness import testing
from harness.errors import SpecError
from harness.runner import load_and_check, run_spec_file
from harness.session import Session
from harness.spec import load_spec

TEXTS = [" This movie was really", "The acting was", "  The plot was  very"]
CLAIM = """\
- id: ld
  measure: logit_diff
  model: a
  per_prompt: all
  expect: {">": -1000}
"""


def _sources(tmp_path) -> dict[str, str]:
    """The same three prompts written inline, in a .txt file, in JSONL, through `datasets`."""
    (tmp_path / "p.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    inline = "".join(f"- text: {json.dumps(t)}\n  answer: \" bad\"\n  foil: \" good\"\n"
                     for t in TEXTS)
    family = "  answer: \" bad\"\n  foil: \" good\"\n"
    return {"inline": inline, "txt": "- file: p.txt\n" + family,
            "jsonl": "- file: p.jsonl\n" + family,
            "dataset": "- dataset: {name: json, data_files: p.jsonl, split: train}\n" + family}


def test_every_source_gives_bit_identical_tokens_and_values(tmp_path, tiny_checkpoints):
    session = Session(verbose=False, device="cpu")
    tokens, values = {}, {}
    for name, prompts in _sources(tmp_path).items():
        path = testing.write_spec(tmp_path, tiny_checkpoints["a"], prompts, CLAIM, name)
        spec = load_spec(path)
        assert [p.text for p in spec.prompt_set(None)] == TEXTS, name
        model = session.model(spec, "a")
        tokens[name] = session.batch(spec, spec.prompt_set(None), model, True).tokens
        result = run_spec_file(path, session)
        assert result.verdicts[0].status == "passed", result.verdicts[0].message
        values[name] = result.verdicts[0].extras["per_prompt"]
    for name in tokens:
        assert torch.equal(tokens[name], tokens["inline"]), name
        assert values[name] == values["inline"], name
    # the leading spaces matter: stripping them changes the tokens
    tok = session.tokenizer(load_spec(path), "a")
    assert tok(TEXTS[0])["input_ids"] != tok(TEXTS[0].strip())["input_ids"]


def test_strip_and_first_words_apply_to_text_and_corrupt_alike(tmp_path, tiny_checkpoints):
    (tmp_path / "p.jsonl").write_text(json.dumps(
        {"text": "  The movie was really good ", "corrupt": "  The film was really bad "}) + "\n")
    spec = load_spec(testing.write_spec(tmp_path, tiny_checkpoints["a"], """\
        - file: p.jsonl
          answer: " bad"
          foil: " good"
        - file: p.jsonl
          strip: true
          answer: " bad"
          foil: " good"
        - file: p.jsonl
          first_words: 3
          answer: " bad"
          foil: " good"
        - text: " The movie was "
          corrupt: " The film was "
          strip: true
          answer: " bad"
          foil: " good"
        """, CLAIM))
    got = [(p.text, p.corrupt) for p in spec.prompt_set(None)]
    assert got == [("  The movie was really good ", "  The film was really bad "),
                   ("The movie was really good", "The film was really bad"),
                   ("  The movie was", "  The film was"),
                   ("The movie was", "The film was")]


def test_rows_carry_their_own_answer_and_foil(tmp_path, tiny_checkpoints):
    rows = [{"text": "This movie was really", "answer": " bad", "foil": " good"},
            {"text": "The acting was", "answer": " good", "foil": " bad"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in ("file: p.jsonl", "dataset: {name: json, data_files: p.jsonl}"):
        spec = load_spec(testing.write_spec(tmp_path, tiny_checkpoints["a"], f"- {source}\n",
                                            CLAIM))
        assert [(p.answer, p.foil) for p in spec.prompt_set(None)] == [
            (" bad", " good"), (" good", " bad")], source
    # the entry's values are defaults for rows without their own
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "The plot was"}) + "\n"
                                      + json.dumps(rows[1]) + "\n")
    spec = load_spec(testing.write_spec(tmp_path, tiny_checkpoints["a"],
                                        "- file: q.jsonl\n  answer: ' fun'\n  foil: ' bad'\n",
                                        CLAIM))
    assert [(p.answer, p.foil) for p in spec.prompt_set(None)] == [(" fun", " bad"),
                                                                    (" good", " bad")]


def test_row_without_answer_and_no_default_names_the_line(tmp_path, tiny_checkpoints):
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "a", "answer": " bad", "foil": " good"})
                                      + "\n" + json.dumps({"text": "b", "foil": " good"}) + "\n")
    with pytest.raises(SpecError) as err:
        load_spec(testing.write_spec(tmp_path, tiny_checkpoints["a"], "- file: p.jsonl\n",
                                     CLAIM))
    assert "p.jsonl:2" in str(err.value) and "`answer`" in str(err.value)
    with pytest.raises(SpecError, match="this prompt has no `answer`"):
        load_spec(testing.write_spec(tmp_path, tiny_checkpoints["a"],
                                     "- text: hello\n  foil: ' good'\n", CLAIM))


def test_corrupt_of_another_length_is_a_spec_error_before_models_load(tmp_path,
                                                                     tiny_checkpoints):
    path = testing.write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "This movie was really"
          corrupt: "This movie was not really at all"
          answer: " bad"
          foil: " good"
        """, """\
        - id: trace
          measure: patch
          from: {model: a, input: clean}
          into: {model: a, input: corrupt}
          site: resid_pre
          layers: [0]
          expect: {">": -100}
        """)
    session = Session(verbose=False, device="cpu")
    with pytest.raises(SpecError) as err:
        load_and_check(path, session)
    message = str(err.value)
    assert "prompt 0 'This movie was really'" in message and "corrupt text" in message
    assert "' movie'" in message and "pad the prompts" not in message
    assert not session.loaded_models()   # tokenizers only


def test_cli_reports_mismatch_and_multi_token_marker_with_exit_2(tmp_path, tiny_checkpoints,
                                                                 capsys):
    from harness.cli import main as harness_main

    path = testing.write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "This movie was really"
          corrupt: "  This movie was really"
        """, """\
        - id: trace
          measure: patch_sweep
          from: {model: a, input: clean}
          into: {model: a, input: corrupt}
          site: resid_pre
          over: [layer]
          metric: loss
          expect: {max: {">": 0}}
        - id: marked
          measure: loss
          model: a
          span: {after: " qqzx"}
          expect: {"<": 9}
        """)
    assert harness_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "claims[0]" in err and "corrupt text '  This movie was really'" in err
    assert "claims[1].span.after" in err and "span marker ' qqzx'" in err
    assert "Traceback" not in err
