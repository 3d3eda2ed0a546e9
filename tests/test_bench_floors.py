"""bench/head_sweep_ceiling.py's two floors count the same arithmetic: the shape floor's
products (batched as an exact head sweep must batch them) add up to the flat floor's
multiply-adds, for the benchmark's shapes and others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "head_sweep_ceiling.py"
_SPEC = importlib.util.spec_from_file_location("head_sweep_ceiling", _PATH)
ceiling = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ceiling)


@pytest.mark.parametrize("shape, rows", [
    (ceiling.SHAPES["gpt2"], 8), (ceiling.SHAPES["llama"], 8),
    ((64, 3, 4, 2, 16, 96, 3), 5), ((32, 2, 2, 2, 16, 64, 2), 1)])
def test_the_products_are_the_counted_arithmetic(shape, rows):
    products = ceiling.head_sweep_products(*shape, rows=rows)
    assert sum(2 * m * k * n for m, k, n in products) == ceiling.head_sweep_flop(*shape,
                                                                                 rows=rows)


def test_a_layer_meets_only_the_variants_that_have_entered():
    d, n_layers, n_heads, _, _, d_mlp, _ = shape = ceiling.SHAPES["gpt2"]
    products = ceiling.head_sweep_products(*shape, rows=8)
    assert products[0] == (n_heads * 8, d, d_mlp)           # layer 0: its own 12 variants
    assert max(m for m, _, _ in products) == n_heads * (n_layers - 1) * 8


def test_the_eager_kernels_meet_the_rows_the_products_meet():
    d, n_layers, n_heads, n_kv, d_head, d_mlp, mats = shape = ceiling.SHAPES["llama"]
    kernels = ceiling.head_sweep_kernels(*shape, rows=8)
    products = ceiling.head_sweep_products(*shape, rows=8)
    qkv = (n_heads + 2 * n_kv) * d_head
    attending = [m for m, k, n in products if (k, n) == (d, qkv)]
    assert [m for kind, m in kernels if kind == "attention"] == attending
    assert len([k for k in kernels if k[0] == "norm"]) == 2 * (n_layers - 1) + 1
    in_mlp = [m for m, k, n in products if (k, n) == (d_mlp, d)]   # the MLP's output product
    assert [m for kind, m in kernels if kind == "activation"] == in_mlp
    assert kernels[-4:] == [("add", n_heads * (n_layers - 1)), ("norm", n_heads * n_layers),
                            ("activation", n_heads * n_layers), ("add", n_heads * n_layers)]


@pytest.mark.parametrize("rotary", [False, True])
def test_the_kernels_floor_times_every_kind(rotary):
    shape = (32, 3, 4, 2, 8, 64, 3 if rotary else 2)
    kernels = ceiling.head_sweep_kernels(*shape, rows=4)
    assert {kind for kind, _ in kernels} == {"norm", "add", "attention", "attention_1",
                                             "activation"}
    by_kind = ceiling.kernels_by_kind(kernels, 32, 4, 2, 8, rows=4, rotary=rotary, d_mlp=64,
                                      gated=rotary, repeats=1, trials=1)
    assert set(by_kind) == {kind for kind, _ in kernels}
    assert all(0 < t < float("inf") for kind, t in by_kind.items() if kind != "activation")
    assert 0 <= by_kind["activation"] < float("inf")   # a fused GELU's extra may be nil
    assert by_kind["activation"] > 0 or not rotary       # a SiLU and product take time
    assert ceiling.shape_kernels_s(shape, rows=4, rotary=rotary, repeats=1, trials=1).keys() \
        == by_kind.keys()
    with pytest.raises(ValueError, match="d_mlp"):
        ceiling.kernels_by_kind(kernels, 32, 4, 2, 8, rows=4, repeats=1, trials=1)


def test_the_sequence_floor_runs_every_product_in_the_sweeps_order(monkeypatch):
    shapes = []
    matmul = ceiling.torch.matmul

    def counting(a, b):
        shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return matmul(a, b)
    monkeypatch.setattr(ceiling, "onednn_checked", lambda: False)   # MKL only: countable
    monkeypatch.setattr(ceiling.torch, "matmul", counting)
    products = ceiling.head_sweep_products(32, 3, 4, 2, 8, 64, 3, rows=4)
    run = ceiling.sequence_floor(products)
    run()
    assert shapes == products
