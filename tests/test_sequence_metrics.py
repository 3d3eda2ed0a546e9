"""Sequence metrics (loss / accuracy over a span) on a planted model whose predictions are known,
checked against the closed form and a direct computation from the model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _sequence_model import MARKER, WORDS, build_successor_model, expected_losses
from transformers import AutoTokenizer, GPT2LMHeadModel

from harness.measure.sequence import Span, span_mask
from harness.runner import run_spec_file
from harness.session import Session

PROMPTS = {
    "cycle": "".join(WORDS[:4]) * 2,                  # red blue green black red blue green black
    "odd": " pink" + "".join(WORDS[:3]) * 2,          # 7 text tokens
    "marked": " white" + MARKER + "".join(WORDS[:3]),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    directory = build_successor_model(tmp_path_factory.mktemp("succ") / "model")
    return directory, AutoTokenizer.from_pretrained(str(directory)), \
        GPT2LMHeadModel.from_pretrained(str(directory)).eval()


def spec_text(model_dir, claims: str, prompts=None) -> str:
    prompts = prompts or PROMPTS.values()
    lines = "".join(f'  - text: "{t}"\n' for t in prompts)
    return f'models:\n  m: {{path: "{model_dir}"}}\nprompts:\n{lines}claims:\n{claims}'


def run(tmp_path, text: str, name="seq"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    result = run_spec_file(path, Session(verbose=False, device="cpu"))
    assert result.error is None, result.error
    return {v.claim_id: v for v in result.verdicts}


def successor_hits(tokenizer, ids: list[int]) -> list[bool]:
    """Ground truth without the model: is token t the successor of token t-1?"""
    word_ids = [tokenizer(w)["input_ids"][0] for w in WORDS]
    succ = {a: b for a, b in zip(word_ids, word_ids[1:] + word_ids[:1])}
    return [ids[t] == succ.get(ids[t - 1], ids[t - 1]) for t in range(1, len(ids))]


def direct(model, tokenizer, text: str, scored: list[int]) -> tuple[float, float]:
    """Cross-entropy and argmax accuracy over the scored positions, from the HF logits."""
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    losses = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    hits = (logits[:-1].argmax(-1) == ids[0, 1:]).float()
    idx = torch.tensor(scored) - 1
    return float(losses[idx].mean()), float(hits[idx].mean())


SPANS = {   # span -> scored positions (BOS = position 0) of each prompt
    "all": {"cycle": range(1, 9), "odd": range(1, 8), "marked": range(1, 6)},
    "second_half": {"cycle": range(5, 9), "odd": range(5, 8), "marked": range(4, 6)},
    "{start: 1, stop: -1}": {"cycle": range(2, 8), "odd": range(2, 7), "marked": range(2, 5)},
    f'{{after: "{MARKER}"}}': {"marked": range(3, 6)},
}


@pytest.mark.parametrize("span", list(SPANS))
def test_loss_and_accuracy_match_logits_and_closed_form(tmp_path, planted, span):
    model_dir, tokenizer, model = planted
    names = list(SPANS[span])
    claims = "".join(f"  - {{id: {m}, measure: {m}, model: m, span: {span}, per_prompt: all, "
                     f"expect: {{'>=': 0}}}}\n" for m in ("loss", "accuracy"))
    verdicts = run(tmp_path, spec_text(model_dir, claims, [PROMPTS[n] for n in names]))
    for i, name in enumerate(names):
        scored = list(SPANS[span][name])
        loss, acc = direct(model, tokenizer, PROMPTS[name], scored)
        assert verdicts["loss"].extras["per_prompt"][i] == pytest.approx(loss, abs=1e-5)
        assert verdicts["accuracy"].extras["per_prompt"][i] == pytest.approx(acc, abs=1e-5)
        ids = [tokenizer.bos_token_id] + tokenizer(PROMPTS[name])["input_ids"]
        hits = [successor_hits(tokenizer, ids)[t - 1] for t in scored]
        truth = expected_losses(len(tokenizer), hits)
        assert loss == pytest.approx(sum(truth) / len(truth), abs=1e-4)
        assert acc == pytest.approx(sum(hits) / len(hits))


def test_second_half_claims_pass_and_false_claims_fail(tmp_path, planted):
    """The repeat of a cycle is predicted; the first token of each half is not."""
    model_dir, tokenizer, _ = planted
    verdicts = run(tmp_path, spec_text(model_dir, """\
  - {id: acc-true, measure: accuracy, model: m, span: second_half, ci: 0.9, expect: {">=": 0.6}}
  - {id: acc-false, measure: accuracy, model: m, span: second_half, expect: {">": 0.9}}
  - {id: loss-true, measure: loss, model: m, span: all, per_prompt: all, expect: {"<": 6}}
  - {id: loss-false, measure: loss, model: m, span: all, expect: {"<": 0.5}}
"""))
    assert verdicts["acc-true"].status == "passed", verdicts["acc-true"].message
    assert verdicts["acc-true"].extras["stats"]["n"] == 3
    assert verdicts["loss-true"].status == "passed", verdicts["loss-true"].message
    assert verdicts["acc-false"].status == "failed"
    assert verdicts["loss-false"].status == "failed"


def test_span_masks():
    tokens = torch.tensor([[0, 5, 6, 9, 7, 8, 1, 1], [0, 9, 5, 6, 7, 8, 5, 6]])
    final = torch.tensor([5, 7])
    def rows(span, prefix=1):
        mask = span_mask(tokens, final, span, prefix)
        return [r.nonzero().flatten().tolist() for r in mask]
    assert rows(Span("all")) == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]]
    assert rows(Span("all"), prefix=0) == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]]
    assert rows(Span("second_half")) == [[4, 5], [5, 6, 7]]
    assert rows(Span("range", start=-2)) == [[4, 5], [6, 7]]
    assert rows(Span("range", start=0, stop=2), prefix=0) == [[1], [1]]
    assert rows(Span("after", marker_id=9)) == [[4, 5], [2, 3, 4, 5, 6, 7]]


def test_span_without_marker_is_an_error_naming_the_prompt(tmp_path, planted):
    model_dir, _, _ = planted
    verdicts = run(tmp_path, spec_text(model_dir, f"""\
  - {{id: x, measure: loss, model: m, span: {{after: "{MARKER}"}}, expect: {{"<": 9}}}}
"""))
    assert verdicts["x"].status == "error"
    assert "prompt 0" in verdicts["x"].message and "no marker" in verdicts["x"].message

