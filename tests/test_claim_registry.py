"""One declaration per claim kind: spec.CLAIM_CLASSES. The measure names, the `Claim` union,
the SAE measures and the value kinds derive from it; claims.py has exactly one measurement per
kind and docs/spec-format.md an example of each. A kind declared in one place but not the
others fails here."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import get_args

import pytest
import yaml

from harness import claims, expect, spec
from harness.spec import CLAIM_CLASSES, CLAIM_KINDS, MEASURES, SAE_MEASURES, ClaimBase, load_spec

DOCS = Path(__file__).parent.parent / "docs"


def claim_subclasses() -> set[type]:
    """Every class in spec.py that answers to a `measure:` (not the abstract bases)."""
    found = set()
    for obj in vars(spec).values():
        if isinstance(obj, type) and issubclass(obj, ClaimBase) and "measure" in obj.model_fields:
            found.add(obj)
    return found


def test_every_claim_class_is_registered_once():
    assert claim_subclasses() == set(CLAIM_CLASSES)
    assert len(MEASURES) == len(CLAIM_CLASSES) == len(set(MEASURES))


def test_the_union_and_the_lists_derive_from_the_classes():
    union, = [a for a in get_args(spec.Claim) if get_args(a)]
    assert set(get_args(union)) == set(CLAIM_CLASSES)
    assert MEASURES == tuple(spec.measure_name(c) for c in CLAIM_CLASSES)
    assert set(SAE_MEASURES) == {"feature", "top_features", "feature_diff",
                                 "feature_intervention"}
    assert spec.SEARCHABLE_MEASURES == ("logit_diff", "top_k", "generate")


def test_every_kind_has_exactly_one_measurement():
    assert set(claims.MEASURES) == set(MEASURES)


def test_a_kind_without_its_measurement_stops_claims(monkeypatch):
    monkeypatch.delitem(claims.MEASURES, "circuit")
    with pytest.raises(ImportError, match="no @measure for circuit"):
        claims.check_registry()


def test_a_measurement_for_an_undeclared_kind_is_refused():
    with pytest.raises(ValueError, match="no claim class"):
        claims.measure("not_a_kind")


@pytest.mark.parametrize("cls", CLAIM_CLASSES, ids=lambda c: c.__name__)
def test_every_kind_declares_a_value_kind_some_operator_reads(cls):
    assert cls.VALUE_KIND in expect.VALUE_KINDS, cls.__name__
    assert any(cls.VALUE_KIND in op.kinds and name != "baseline"
               for name, op in expect.OPERATORS.items()), cls.__name__


def doc_claims() -> list[dict]:
    text = (DOCS / "spec-format.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    out = []
    for block in blocks:
        data = yaml.safe_load(block)
        if isinstance(data, dict) and isinstance(data.get("claims"), list):
            out += [c for c in data["claims"] if isinstance(c, dict)]
    return out


def test_docs_show_every_kind():
    documented = {c.get("measure") for c in doc_claims()}
    missing = [m for m in MEASURES if m not in documented]
    assert not missing, f"docs/spec-format.md has no example claim of {missing}"


BASE = """\
models:
  a: {zoo: toy-reviews-source}
  b: {zoo: toy-reviews-rlhf}
saes:
  s: {zoo: toy-reviews-sae}
prompts:
  - text: "This movie was really"
    answer: " bad"
    foil: " good"
    corrupt: "This movie was truly"
claims:
"""


@pytest.mark.parametrize("body, kind", [
    ("{id: c, measure: logit_diff, model: a, expect: {'>': 0}}", expect.SCALAR),
    ("{id: c, measure: top_k, model: a, expect: {includes: [' bad']}}", expect.TOKENS),
    ("{id: c, measure: generate, model: a, expect: {contains: ' bad'}}", expect.TEXT),
    ("{id: c, measure: generate, model: a, samples: 4, temperature: 1.0, "
     "expect: {rate: {contains: ' bad', '>=': 0.5}}}", expect.SAMPLES),
    ("{id: c, measure: dla, model: a, expect: {argmax: mlp1}}", expect.GRID),
    ("{id: c, measure: dla, models: [a, b], expect: {argmax: mlp1}}", expect.PAIR),
    ("{id: c, measure: logit_lens, models: [a, b], expect: {same_below: 2}}", expect.PAIR),
    ("{id: c, measure: patch, from: b, into: a, site: z, heads: [L3H0], "
     "expect: {'>': 0.5}}", expect.PATCH),
    ("{id: c, measure: patch_sweep, from: b, into: a, site: resid_pre, over: [layer, pos], "
     "expect: {argmax: {layer: 3, pos: -1}}}", expect.GRID),
    ("{id: c, measure: attention, model: a, source: previous, heads: [L0H0], "
     "expect: {'>': 0.5}}", expect.SCALAR),
    ("{id: c, measure: attention, model: a, source: previous, expect: {max: {'>': 0.5}}}",
     expect.GRID),
    ("{id: c, measure: path_patch, from: {model: a, input: corrupt}, into: a, path: resid, "
     "senders: [L1H0], expect: {'>': 0.5}}", expect.PATCH),
    ("{id: c, measure: path_patch, from: {model: a, input: corrupt}, into: a, path: resid, "
     "expect: {max: {'>': 0.5}}}", expect.GRID),
    ("{id: c, measure: circuit, model: a, members: [L1H0], kind: zero, "
     "expect: {'>': 0.5}}", expect.SCALAR),
    ("{id: c, measure: circuit, model: a, members: [L1H0], kind: zero, metric: minimality, "
     "expect: {max: {'>': 0.5}}}", expect.GRID),
    ("{id: c, measure: feature_diff, models: [a, b], sae: s, expect: {includes: [0]}}",
     expect.FEATURES),
    ("{id: c, measure: feature_diff, models: [a, b], sae: s, feature: 0, expect: {'>': 0}}",
     expect.SCALAR),
])
def test_value_kinds_that_depend_on_fields(tmp_path, body, kind):
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + textwrap.indent(body, "  - ") + "\n")
    loaded = load_spec(path)
    (claim,) = loaded.claims
    assert isinstance(claim, CLAIM_KINDS[claim.measure])
    assert claim.value_kind() == expect.kind_of(claim) == kind
