"""The `.venv` trap: pytest run from a second clone with the first clone's `.venv` imports the
first clone's harness (an editable install). The plugin says so in the header."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import harness
from harness.plugin import other_checkout

HERE = Path(harness.__file__).resolve().parents[1]


def test_the_own_checkout_gets_no_warning():
    assert other_checkout(HERE) is None


def test_a_folder_without_the_package_gets_no_warning(tmp_path):
    assert other_checkout(tmp_path) is None


def test_another_checkout_is_named_even_under_q(tmp_path):
    clone = tmp_path / "clone"
    (clone / "harness").mkdir(parents=True)
    (clone / "harness" / "__init__.py").write_text("")
    (clone / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (clone / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    pytest_script = Path(sys.executable).parent / "pytest"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(pytest_script), "-q", "-p", "no:cacheprovider", "test_nothing.py"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())   # the warnings summary wraps long lines
    assert "imports " + str(HERE / "harness") in text, out.stdout
    assert "not this checkout's " + str(clone / "harness") in text
