"""Shared fixtures: tiny random GPT-2 checkpoints built offline once per test session."""

from __future__ import annotations

from pathlib import Path

# Import the heavy libraries once in this process: pytester's in-process runs would otherwise
# import them again, and pyarrow (via datasets) refuses to register its types twice.
import datasets  # noqa: F401,E402
import pytest
import transformer_lens.model_bridge  # noqa: F401,E402

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny GPT-2s with the same tokenizer and a value-head copy of the first."""
    from harness.testing import build_tiny_gpt2

    root = tmp_path_factory.mktemp("tiny")
    return {
        "a": build_tiny_gpt2(root / "a", n_layer=2, seed=0),
        "b": build_tiny_gpt2(root / "b", n_layer=2, seed=1),
        "a_value_head": build_tiny_gpt2(root / "a_vh", n_layer=2, seed=0, value_head=True),
    }
