"""The stages before any weights load, each once and in order: read the spec (the file only),
resolve its prompts (files, datasets, the corpus: read once, handed on), static checks against
config and tokenizer files, token checks. Both front ends run them through
`runner.load_and_check`; `harness validate` through `validate.validate_spec`."""

from __future__ import annotations

import textwrap

import pytest

from harness import prompt_sources, runner, static_checks, validate
from harness.errors import HarnessError, SpecError
from harness.spec import load_spec, read_spec, resolve_prompts

SPEC = """\
models:
  a: {zoo: toy-reviews-source}
prompts:
  - file: rows.jsonl
    answer: " bad"
    foil: " good"
claims:
  - {id: c, measure: logit_diff, model: a, expect: {">": 0}}
"""


@pytest.fixture
def spec_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "This movie was really"}\n'
                                         '{"text": "The plot was"}\n')
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def reads(monkeypatch):
    """Count the reads of prompt files."""
    calls = []
    original = prompt_sources.texts_from_file

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(prompt_sources, "texts_from_file", counted)
    return calls


def test_reading_a_spec_reads_no_prompt_file(spec_file, reads):
    spec = read_spec(spec_file)
    assert reads == [] and not spec.resolved
    with pytest.raises(HarnessError, match="resolve_prompts"):
        spec.prompt_set(None)


def test_prompts_are_read_once_and_handed_on(spec_file, reads):
    spec = resolve_prompts(read_spec(spec_file))
    assert [p.text for p in spec.prompt_set(None)] == ["This movie was really", "The plot was"]
    for claim in spec.claims:
        spec.claim_prompts(claim)
    assert resolve_prompts(spec) is spec
    assert len(reads) == 1


def test_a_missing_prompt_file_is_a_resolve_error_naming_the_spec(spec_file):
    (spec_file.parent / "rows.jsonl").unlink()
    spec = read_spec(spec_file)            # the read stage does not look
    with pytest.raises(SpecError) as info:
        resolve_prompts(spec)
    assert info.value.file == str(spec_file) and info.value.line == 4   # `- file: ...`
    assert info.value.path == "prompts[0].file"
    assert "rows.jsonl" in str(info.value)


def test_checks_that_need_prompts_run_when_they_are_resolved(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "This movie was really"}\n')
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace('    answer: " bad"\n', ""))
    read_spec(path)                        # no foil-less rows known yet
    with pytest.raises(SpecError, match="has no `answer`"):
        load_spec(path)


def stage_spy(monkeypatch, module, order):
    """Wrap the stage functions `module` calls so that `order` records them."""
    def spy(target, attr, name):
        original = getattr(target, attr)

        def wrapper(*args, **kwargs):
            order.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(target, attr, wrapper)

    spy(module, "read_spec", "read")
    spy(module, "resolve_prompts", "resolve")
    spy(static_checks, "check_spec", "static")


def test_run_front_ends_run_the_stages_in_order(spec_file, monkeypatch):
    from harness.session import Session

    order: list[str] = []
    stage_spy(monkeypatch, runner, order)
    tokens = runner.check_tokens
    monkeypatch.setattr(runner, "check_tokens",
                        lambda *a, **k: order.append("tokens") or tokens(*a, **k))
    spec = runner.load_and_check(spec_file, Session(verbose=False))
    assert order == ["read", "resolve", "static", "tokens"]
    assert spec.resolved


def test_validate_runs_the_same_stages_in_order(spec_file, monkeypatch):
    order: list[str] = []
    stage_spy(monkeypatch, validate, order)
    errors = validate.token_errors
    monkeypatch.setattr(validate, "token_errors",
                        lambda *a, **k: order.append("tokens") or errors(*a, **k))
    validate.validate_spec(spec_file)
    assert order == ["read", "resolve", "static", "tokens"]


def test_a_spec_read_from_text_is_resolved_too(tmp_path):
    from harness.spec import load_spec_text

    spec = load_spec_text(textwrap.dedent(SPEC).replace(
        "  - file: rows.jsonl\n", '  - text: "This movie was really"\n'))
    assert spec.resolved and len(spec.prompt_set(None)) == 1


def test_a_sharded_run_reads_each_spec_once(spec_file, reads, tmp_path, monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    spec_file.write_text(SPEC.replace('expect: {">": 0}}', 'expect: {">": 0}, skip: later}'))
    assert main(["run", str(spec_file), "--shard", "1/1", "--quiet"]) == 0
    assert len(reads) == 1
