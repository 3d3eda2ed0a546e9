"""Nothing stored is lost or poisoned (issue 20, items 8-12): baselines, counterexample stores,
the --lf state, temporary files and frozen specs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest


def tiny_spec(directory: Path, model_dir: Path, claims: str, name: str = "spec",
              suffix: str = ".yaml") -> Path:
    path = directory / f"{name}{suffix}"
    path.write_text(f'spec: {name}\nmodels:\n  a: {{path: "{model_dir}"}}\nprompts:\n'
                    '  - text: "This movie was really"\n    answer: " bad"\n    foil: " good"\n'
                    '  - text: "The film was truly"\n    answer: " bad"\n    foil: " good"\n'
                    "claims:\n" + textwrap.indent(textwrap.dedent(claims), "  "))
    return path


def run_cli(*args) -> int:
    from harness.cli import main

    return main(["run", *map(str, args), "-q"])


LOGIT = "- {id: c, measure: logit_diff, model: a, expect: {'<': 1000}}\n"


# ----------------------------------------------------------------------------- 8: --limit

def test_limited_run_cannot_write_baselines(tmp_path, tiny_checkpoints, capsys):
    path = tiny_spec(tmp_path, tiny_checkpoints["a"], LOGIT)
    code = run_cli(path, "--limit", "1", "--update-baselines")
    err = capsys.readouterr().err
    assert code == 2 and "--limit" in err and "--update-baselines" in err
    assert not (tmp_path / "spec.baseline.json").exists()
