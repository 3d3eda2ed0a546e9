"""What the kinds' protocol decides, end to end: claims that read no answers need no one-token
answers; every index a kind names is range-checked before weights load, by the same function
the measurements use on a loaded model."""

from __future__ import annotations

import pytest

from harness.errors import SpecError
from harness.testing import build_tiny_gpt2, write_spec
from harness.validate import validate_spec

MULTI_TOKEN = " zqxjvk wqpz"   # several tokens for the toy tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "m")   # 2 layers of 4 heads


def test_claims_that_read_no_answers_need_no_one_token_answer(tmp_path, tiny):
    from harness.runner import run_spec_file
    from harness.session import Session

    path = write_spec(tmp_path, tiny, f"""\
        - text: "the movie was very good and the plot was"
          answer: "{MULTI_TOKEN}"
          foil: " bad"
        """, """\
        - {id: loss, measure: loss, model: a, expect: {'>': 0}}
        - {id: attention, measure: attention, model: a, source: previous, heads: [L1H0],
           expect: {'>=': 0}}
        """)
    validate_spec(path)   # no "answer ... is N tokens"
    result = run_spec_file(path, Session(verbose=False, device="cpu"))
    assert result.error is None, result.error
    assert {v.claim_id: v.status for v in result.verdicts} == {"loss": "passed",
                                                               "attention": "passed"}


def test_a_claim_that_reads_answers_still_needs_one_token(tmp_path, tiny):
    path = write_spec(tmp_path, tiny, f"""\
        - text: "the movie was"
          answer: "{MULTI_TOKEN}"
          foil: " bad"
        """, "- {id: ld, measure: logit_diff, model: a, expect: {'>': 0}}\n")
    with pytest.raises(SpecError, match="tokens for model 'a'"):
        validate_spec(path)


@pytest.mark.parametrize("claim, message", [
    ("{id: c, measure: attention, model: a, source: previous, heads: [L5H0], expect: {'>': 0}}",
     "claims[0].heads[0]: layer 5 is out of range: model 'a' has 2 layers"),
    ("{id: c, measure: attention, model: a, source: previous, heads: [L1H9], expect: {'>': 0}}",
     "claims[0].heads[0]: head 9 is out of range: model 'a' has 4 heads"),
    ("{id: c, measure: attention, model: a, source: previous, layers: [0, 7], "
     "expect: {max: {'>': 0}}}", "claims[0].layers[1]: layer 7 is out of range"),
    ("{id: c, measure: circuit, model: a, members: [L0H0, mlp4], kind: zero, expect: {'>': 0}}",
     "claims[0].members[1]: layer 4 is out of range"),
    ("{id: c, measure: path_patch, from: {model: a, input: corrupt}, into: a, path: resid, "
     "senders: [L0H6], expect: {'>': 0}}", "claims[0].senders[0]: head 6 is out of range"),
    ("{id: c, measure: path_patch, from: {model: a, input: corrupt}, into: a, path: q, "
     "receivers: [L3H0], expect: {max: {'>': 0}}}", "claims[0].receivers[0]: layer 3 is out"),
])
def test_every_index_a_kind_names_is_checked_before_weights_load(tmp_path, tiny, claim,
                                                                  message):
    path = write_spec(tmp_path, tiny, """\
        - text: "the movie was"
          corrupt: "the plot was"
          answer: " good"
          foil: " bad"
        """, f"- {claim}\n")
    with pytest.raises(SpecError) as err:
        validate_spec(path)
    assert message in str(err.value)


def test_measurements_check_indices_with_the_same_function(tiny):
    """A model the static checks never read (a notebook's) gets the same message at run time."""
    from types import SimpleNamespace

    from harness.errors import MeasureError
    from harness.kinds.attention import AttentionClaim
    from harness.kinds.measuring import check_indices

    claim = AttentionClaim(id="c", measure="attention", model="a", source="previous",
                           heads=("L1H9",), expect={">": 0})
    cfg = SimpleNamespace(n_layers=2, n_heads=4, n_key_value_heads=None, d_mlp=128,
                          d_vocab=400)
    with pytest.raises(MeasureError, match="head 9 is out of range: model 'a' has 4 heads"):
        check_indices(claim, SimpleNamespace(bridge=SimpleNamespace(cfg=cfg)), "a")
