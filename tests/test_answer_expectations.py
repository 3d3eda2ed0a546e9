"""Per-prompt answers: top_k and generate expectations read each prompt's own answer."""

from __future__ import annotations

import json

import pytest
from _sequence_model import WORDS, build_successor_model

from harness.errors import SpecError
from harness.runner import load_and_check, run_spec_file
from harness.session import Session


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_successor_model(tmp_path_factory.mktemp("succ") / "model")


def rows(wrong: bool = False) -> str:
    """Each prompt is a run of the cycle; its answer is the next word (one made wrong)."""
    out = []
    for i in range(4):
        answer = WORDS[(i + 3) % len(WORDS)]
        if wrong and i == 2:
            answer = WORDS[(i + 1) % len(WORDS)]   # a word of the prompt, not its next
        out.append({"text": "".join(WORDS[i:i + 3]), "answer": answer,
                    "foil": WORDS[(i + 6) % len(WORDS)]})
    return "".join(json.dumps(r) + "\n" for r in out)


CLAIMS = """\
  - {id: top1, measure: top_k, model: m, k: 1, expect: {answer_is_top: true}}
  - {id: top3, measure: top_k, model: m, k: 3, expect: {includes_answer: true}}
  - {id: greedy, measure: generate, model: m, max_new_tokens: 2, expect: {next_is_answer: true}}
  - {id: says, measure: generate, model: m, max_new_tokens: 3, expect: {contains_answer: true}}
  - {id: most, measure: top_k, model: m, k: 1, per_prompt: {fraction: ">= 0.7"},
     expect: {answer_is_top: true}}
"""


def run(tmp_path, model_dir, wrong: bool):
    (tmp_path / "rows.jsonl").write_text(rows(wrong))
    path = tmp_path / "answers.yaml"
    path.write_text(f'models:\n  m: {{path: "{model_dir}"}}\nprompts:\n  - file: rows.jsonl\n'
                    f"claims:\n{CLAIMS}")
    result = run_spec_file(path, Session(verbose=False, device="cpu"))
    assert result.error is None, result.error
    return {v.claim_id: v for v in result.verdicts}


def test_each_prompts_own_answer_passes(tmp_path, model_dir):
    verdicts = run(tmp_path, model_dir, wrong=False)
    for name, verdict in verdicts.items():
        assert verdict.status == "passed", (name, verdict.message)


def test_one_wrong_answer_fails_where_it_should(tmp_path, model_dir):
    verdicts = run(tmp_path, model_dir, wrong=True)
    for name in ("top1", "top3", "greedy", "says"):
        assert verdicts[name].status == "failed", name
        assert "held for 3/4 prompts" in verdicts[name].message
    assert verdicts["most"].status == "passed"   # 3 of 4 is at least 70%
    assert repr(WORDS[3]) in verdicts["top1"].message   # the worst prompt, its own answer


def test_answer_expectation_needs_answers(tmp_path, model_dir):
    path = tmp_path / "no_answers.yaml"
    path.write_text(f'models:\n  m: {{path: "{model_dir}"}}\nprompts:\n  - text: " red blue"\n'
                    "claims:\n  - {id: top1, measure: top_k, model: m, k: 1, "
                    "expect: {answer_is_top: true}}\n"
                    "  - {id: fine, measure: top_k, model: m, k: 1, "
                    "expect: {equals: [' green']}}\n")
    with pytest.raises(SpecError) as err:
        load_and_check(path, Session(verbose=False, device="cpu"))
    assert "no `answer`" in str(err.value) and "top1" in str(err.value)
    assert "no_answers.yaml:4" in str(err.value)
