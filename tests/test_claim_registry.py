"""One declaration per claim kind: spec.CLAIM_CLASSES. The measure names, the `Claim` union,
the SAE measures and the value kinds derive from it; claims.py has exactly one measurement per
kind and docs/spec-format.md an example of each. A kind declared in one place but not the
others fails here."""

from __future__ import annotations

import ast
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


# ----------------------------------------------------------------------------- one kind, one module

PACKAGE = Path(__file__).parent.parent / "harness"
KINDS = PACKAGE / "kinds"
# issue 21 item 2 moves freeze.py's rules into the kinds; until then it still lists measures
FREEZE_RULES_PENDING: set[str] = set()


def _names_a_measure(node, named: dict[str, set]) -> set[str]:
    """Measure names a literal (or a module-level constant holding literals) spells."""
    if isinstance(node, ast.Constant) and node.value in MEASURES:
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return set().union(*(_names_a_measure(e, named) for e in node.elts))
    if isinstance(node, ast.Name):
        return named.get(node.id, set())
    return set()


def _is_a_measure(node) -> bool:
    """`x.measure`, `x["measure"]`, `x.get("measure")` or a variable called `measure`."""
    if isinstance(node, ast.Attribute):
        return node.attr == "measure"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "measure"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and node.func.attr == "get" and node.args:
        return isinstance(node.args[0], ast.Constant) and node.args[0].value == "measure"
    return isinstance(node, ast.Name) and node.id == "measure"


def measure_branches(source: str) -> list[tuple[int, set[str]]]:
    """(line, measure names) of every comparison of a claim's measure with measure names."""
    tree = ast.parse(source)
    named: dict[str, set] = {}
    for node in tree.body:   # module constants such as GRID = ("dla", "logit_lens")
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            found = _names_a_measure(node.value, {})
            if found:
                named[node.targets[0].id] = found
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_a_measure(s) for s in sides):
                names = set().union(*(_names_a_measure(s, named) for s in sides))
                if names:
                    out.append((node.lineno, names))
    return out


def test_no_module_outside_the_kinds_branches_on_a_measure_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if KINDS in path.parents or path.name in FREEZE_RULES_PENDING:
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}: {sorted(names)}"
                      for line, names in measure_branches(path.read_text())]
    assert not offenders, "ask the claim's kind (harness/kinds/base.py's protocol) instead " \
        "of naming measures:\n" + "\n".join(offenders)


def test_the_scan_finds_a_planted_branch():
    source = ('GRID = ("dla", "patch_sweep")\n'
              'def f(c, v):\n'
              '    if c["measure"] == "top_k": pass\n'
              '    if v.measure in GRID: pass\n'
              '    if c.get("measure") in ("loss",): pass\n'
              '    if v.status == "passed": pass\n')
    assert measure_branches(source) == [(3, {"top_k"}), (4, {"dla", "patch_sweep"}),
                                        (5, {"loss"})]


PROTOCOL = {   # ClassVar -> the values it may take
    "SEARCHABLE": {True, False}, "HAS_INTERVALS": {True, False}, "MODEL_ARROW": {True, False},
    "FIGURE": {None, "heatmap", "lines", "bars", "curve"},
    "PER_PROMPT_LISTING": {None, "tokens", "texts"},
}
METHODS = ("value_kind", "has_intervals", "reads_answers", "scores_span", "needs_corrupt",
           "pairs_clean_and_corrupt", "makes_own_inputs", "indices", "sites", "sized_models",
           "generated_tokens", "cost", "model_names", "model_refs")


@pytest.mark.parametrize("cls", CLAIM_CLASSES, ids=lambda c: c.__name__)
def test_every_kind_answers_the_protocol_from_its_own_module(cls):
    from harness.kinds.base import MEASUREMENTS

    name = spec.measure_name(cls)
    assert cls.__module__.startswith("harness.kinds."), cls.__module__
    assert MEASUREMENTS[name].__module__ == cls.__module__, \
        f"{name}: the measurement lives beside its class, in {cls.__module__}"
    for var, allowed in PROTOCOL.items():
        assert getattr(cls, var) in allowed, (name, var)
    for var in ("REPORT_EXTRAS", "PRIVATE_EXTRAS"):
        keys = getattr(cls, var)
        assert isinstance(keys, tuple) and all(isinstance(k, str) for k in keys), (name, var)
    assert not set(cls.REPORT_EXTRAS) & set(cls.PRIVATE_EXTRAS), name
    for method in METHODS:
        assert callable(getattr(cls, method, None)), (name, method)


def test_a_kind_without_a_protocol_piece_is_caught(monkeypatch):
    from harness.kinds.logits import LogitDiffClaim

    monkeypatch.setattr(LogitDiffClaim, "FIGURE", "pie")
    with pytest.raises(AssertionError):
        test_every_kind_answers_the_protocol_from_its_own_module(LogitDiffClaim)


def test_kind_modules_import_nothing_above_them():
    """Kinds sit below spec.py; what a measurement needs from a run comes in its context."""
    above = {"harness.spec", "harness.session", "harness.models", "harness.claims",
             "harness.runner", "harness.report"}
    for path in sorted(KINDS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                named = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                assert not named & above, f"{path.name} imports {named & above}"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & above, path.name


def test_the_protocol_and_the_reports_load_without_torch():
    import subprocess
    import sys

    code = ("import sys, harness.kinds, harness.spec, harness.report, harness.report_html, "
            "harness.static_checks, harness.shard, harness.validate, harness.show; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False"


def test_report_extras_keep_what_the_kind_lists_and_never_drop_an_unknown_key():
    from harness.kinds.logits import TopKClaim
    from harness.verdicts import report_extras

    m = expect.Measurement(expect.TOKENS, ["a"], (["a"],),
                           {"each": [{}], "prompts": ("p",), "probabilities": [[0.5]],
                            "novel": 1})
    out = report_extras(m, TopKClaim)
    assert list(out) == ["probabilities", "prompts", "novel"]   # `each` is the judge's only
