"""The arithmetic ceiling of an exact head sweep on this machine (docs/performance.md).

A z-over-[layer, head] sweep cannot skip rows: each of its layer x head variants recomputes
every row from its layer on (the last block only keys/values of all rows plus the final row).
This script counts those float32 multiply-adds for the benchmark's GPT-2-small and Llama shapes
(8-token prompt, one prompt), measures this machine's best float32 matrix product on the
sweep's own shapes (MKL's and oneDNN's, the two the engine uses on a CPU), and prints the
shortest time any exact implementation could take — divide TransformerLens's time from
bench_patching.py by it for the largest possible ratio — and what the norms, residual adds,
attention kernels and MLP activations an eager implementation cannot skip add to it.

    .venv/bin/python bench/head_sweep_ceiling.py [--rates]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.measure.linear import onednn_checked  # noqa: E402
from harness.measure.llama_fast import rms_norm  # noqa: E402
from harness.measure.rotary_ops import rotate  # noqa: E402

SHAPES = {  # d_model, layers, query heads, KV heads, d_head, d_mlp, MLP matrices
    "gpt2": (768, 12, 12, 12, 64, 3072, 2),
    "llama": (768, 12, 12, 4, 64, 2048, 3),
}
ROWS = 8


def head_sweep_flop(d, n_layers, n_heads, n_kv, d_head, d_mlp, mlp_mats, rows=ROWS,
                    layers=None) -> float:
    """`layers`: the sweep's layers (default all); a variant patched at layer l runs the
    blocks after l, so early layers cost more."""
    q, kv, o = 2 * d * n_heads * d_head, 2 * d * 2 * n_kv * d_head, 2 * n_heads * d_head * d
    mlp = 2 * d * d_mlp * mlp_mats
    block = q + kv + o + mlp
    last = rows * kv + (q + o + mlp)            # keys/values of every row, the rest of one
    total = 0.0
    for layer in (range(n_layers) if layers is None else layers):
        if layer == n_layers - 1:
            variant = mlp                           # only the final row's MLP changes
        else:
            variant = rows * mlp + (n_layers - 2 - layer) * rows * block + last
        total += n_heads * variant
    return total


def head_sweep_products(d, n_layers, n_heads, n_kv, d_head, d_mlp, mlp_mats, rows=ROWS
                        ) -> list[tuple[int, int, int]]:
    """The same arithmetic as `head_sweep_flop` (all layers) as matrix products (rows, d_in,
    d_out), batched as fully as any exact sweep can batch them: a layer's weights meet every
    variant that has entered by then, and no more. So the early layers' products are small
    (GPT-2 small's layer 0: 12 variants x 8 rows = 96), which no implementation can avoid."""
    qkv, o, up = (d, (n_heads + 2 * n_kv) * d_head), (n_heads * d_head, d), (d, d_mlp)
    mlp = [up] * (mlp_mats - 1) + [(d_mlp, d)]
    products = []
    for layer in range(n_layers - 1):
        attending, in_mlp = n_heads * layer * rows, n_heads * (layer + 1) * rows
        if attending:                           # entered before this layer's attention
            products += [(attending, *qkv), (attending, *o)]
        products += [(in_mlp, *shape) for shape in mlp]
    before_last = n_heads * (n_layers - 1)      # the last block: keys/values of every row,
    products += [(before_last * rows, d, 2 * n_kv * d_head), (before_last, d, n_heads * d_head),
                 (before_last, *o)]             # the rest of the final row only
    products += [(n_heads * n_layers, *shape) for shape in mlp]
    return products


def shape_floor_s(products: list[tuple[int, int, int]], **timing) -> float:
    """The shortest time these products take at this machine's best float32 rate on each
    one's own shape (`best_rate_gflops`)."""
    rates = {shape: best_rate_gflops(*shape, **timing) for shape in dict.fromkeys(products)}
    return sum(2 * m * k * n / 1e9 / rates[m, k, n] for m, k, n in products)


def sequence_floor(products: list[tuple[int, int, int]]) -> Callable[[], None]:
    """The products run back to back, as a sweep meets them: each on operands of its own (a
    sweep's layers have their own weights, so none is hot from the product before) and with
    the faster of the two libraries on its shape. Time the returned call beside the sweep,
    alternately: the two then meet the same state of the machine, whose speed drifts by
    10-20% within minutes, and their ratio varies far less than either time."""
    fastest: dict[tuple[int, int, int], int] = {}
    calls = []
    for m, k, n in products:
        candidates = _plain_products(torch.randn(m, k), torch.randn(k, n))
        if (m, k, n) not in fastest:
            times = [_seconds(c) for c in candidates] if len(candidates) > 1 else [0.0]
            fastest[m, k, n] = times.index(min(times))
        calls.append(candidates[fastest[m, k, n]])

    def run() -> None:
        for call in calls:
            call()
    return run


def _seconds(call: Callable[[], object], repeats: int = 3, trials: int = 2) -> float:
    """The best of `trials` timings of `repeats` calls, per call, after one warm-up call."""
    call()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _plain_products(a: torch.Tensor, b: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """The float32 products the engine may use for a @ b: MKL's and, on a CPU whose torch
    has it, oneDNN's (the fused MLP product, linear.py) without a post-op."""
    products = [partial(torch.matmul, a, b)]
    if onednn_checked():
        products.append(partial(torch.ops.mkldnn._linear_pointwise, a, b.t().contiguous(),
                                None, "none", [], ""))
    return products


def best_product_s(m: int, k: int, n: int, repeats: int = 3, trials: int = 2) -> float:
    """The shortest time of either product (`_plain_products`) on an [m, k] x [k, n]
    product: the best of `trials` timings of `repeats` calls each."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return min(_seconds(product, repeats, trials) for product in _plain_products(a, b))


def best_rate_gflops(m: int, k: int, n: int, repeats: int = 3, trials: int = 2) -> float:
    """The best rate of `best_product_s`."""
    return 2 * m * k * n / 1e9 / best_product_s(m, k, n, repeats, trials)


def head_sweep_kernels(d, n_layers, n_heads, n_kv, d_head, d_mlp, mlp_mats, rows=ROWS
                       ) -> list[tuple[str, int]]:
    """The kernels besides the products that an exact sweep run with PyTorch's eager kernels
    cannot skip, as (kind, rows), batched as `head_sweep_products` batches the products: before
    each sublayer's product a norm, after it a residual add, one attention kernel over the
    variants that have entered (of `rows` tokens each; "attention_1": one query per variant,
    the last block), and the MLP's activation (with a gated MLP's product) between its
    products."""
    kernels = []
    for layer in range(n_layers - 1):
        attending, in_mlp = n_heads * layer * rows, n_heads * (layer + 1) * rows
        if attending:
            kernels += [("norm", attending), ("attention", attending), ("add", attending)]
        kernels += [("norm", in_mlp), ("activation", in_mlp), ("add", in_mlp)]
    before_last, last = n_heads * (n_layers - 1), n_heads * n_layers
    kernels += [("norm", before_last * rows), ("attention_1", before_last * rows),
                ("add", before_last), ("norm", last), ("activation", last), ("add", last)]
    return kernels


def kernels_by_kind(kernels: list[tuple[str, int]], d, n_heads, n_kv, d_head, rows=ROWS,
                    rotary=False, d_mlp=0, gated=False, repeats: int = 5, trials: int = 3
                    ) -> dict[str, float]:
    """The shortest time those kernels take, summed by kind, each timed alone at its own
    shape (best of `trials` timings of `repeats` calls): LayerNorm or, with `rotary` (the
    Llama shape), the engine's RMSNorm (`llama_fast.rms_norm`); an in-place add; PyTorch's
    fused attention, after the rotation of q and k where `rotary`; the activation of `d_mlp`
    neurons (`activation_s`). A lower bound for eager kernels: each reads inputs left hot by
    its last call."""
    def norm(m):
        x = torch.randn(m, d)
        return (partial(rms_norm, x, 1e-5) if rotary else
                partial(F.layer_norm, x, (d,), eps=1e-5))

    def add(m):
        x, y = torch.randn(m, d), torch.randn(m, d)
        return partial(x.add_, y)

    def attention(m, queries):
        n = m // rows
        q = torch.randn(n, n_heads, queries, d_head)
        k, v = torch.randn(n, n_kv, rows, d_head), torch.randn(n, n_kv, rows, d_head)
        cos, sin = torch.randn(rows, d_head), torch.randn(rows, d_head)

        def run():   # q [n, head, queries, d_head]: the last queries' cos and sin
            q_, k_ = (rotate(q, cos[-queries:], sin[-queries:]), rotate(k, cos, sin)) \
                if rotary else (q, k)
            return F.scaled_dot_product_attention(q_, k_, v, is_causal=queries > 1,
                                                  enable_gqa=n_kv != n_heads)
        return run

    make = {"norm": norm, "add": add, "attention": lambda m: attention(m, rows),
            "attention_1": lambda m: attention(m, 1)}
    seconds = {(kind, m): activation_s(m, d, d_mlp, gated, repeats, trials)
               if kind == "activation" else _seconds(make[kind](m), repeats, trials)
               for kind, m in dict.fromkeys(kernels)}
    by_kind: dict[str, float] = {}
    for kind, m in kernels:
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds[kind, m]
    return by_kind


def shape_kernels_s(shape: tuple[int, ...], rows: int = ROWS, rotary: bool = False,
                    **timing) -> dict[str, float]:
    """`kernels_by_kind` for a shape of `SHAPES` (a gated MLP where it has three matrices)."""
    d, _, n_heads, n_kv, d_head, d_mlp, mlp_mats = shape
    return kernels_by_kind(head_sweep_kernels(*shape, rows=rows), d, n_heads, n_kv, d_head,
                           rows=rows, rotary=rotary, d_mlp=d_mlp, gated=mlp_mats == 3,
                           **timing)


def activation_s(m: int, d: int, d_mlp: int, gated: bool, repeats: int = 5, trials: int = 3
                 ) -> float:
    """The MLP's activation on m rows at the cheaper of its eager forms, as the engine picks
    them (measure/linear.py): a gated MLP's SiLU and product as PyTorch's kernels; GPT-2's
    tanh GELU alone or, cheaper here, as what a oneDNN product fused with it costs beyond
    the faster plain product of the same shape."""
    if d_mlp <= 0:
        raise ValueError("the activation's kernels need d_mlp")
    pre, up = torch.randn(m, d_mlp), torch.randn(m, d_mlp)
    if gated:
        return _seconds(lambda: F.silu(pre).mul_(up), repeats, trials)
    alone = _seconds(partial(F.gelu, pre, approximate="tanh"), repeats, trials)
    if not onednn_checked():
        return alone
    x, w = torch.randn(m, d), torch.randn(d_mlp, d)
    fused = _seconds(partial(torch.ops.mkldnn._linear_pointwise, x, w, None, "gelu", [],
                             "tanh"), repeats, trials)
    return max(0.0, min(alone, fused - best_product_s(m, d, d_mlp, repeats, trials)))


def best_matmul_gflops(d: int, d_mlp: int, repeats: int = 5, trials: int = 3) -> float:
    """The best rate on any of four of the sweep's shapes (the flat floor's rate), mostly
    set by the 1152-row ones: more than a sweep's early, small batches can reach."""
    return max(best_rate_gflops(m, k, n, repeats, trials) for m, k, n in
               ((96, d, d_mlp), (1152, d, d_mlp), (1152, d_mlp, d), (1152, d, 3 * d)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", action="store_true",
                        help="also print each product shape's best rate (the shape floor's)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, shape in SHAPES.items():
        flop = head_sweep_flop(*shape)
        peak = best_matmul_gflops(shape[0], shape[5])
        products = head_sweep_products(*shape)
        by_shape = shape_floor_s(products)
        by_kind = shape_kernels_s(shape, rotary=name == "llama")
        kernels = sum(by_kind.values())
        print(f"{name}: head sweep {flop / 1e9:.1f} GFLOP; best float32 matmul {peak:.0f} GFLOP/s"
              f" -> no exact sweep under {flop / 1e9 / peak:.3f} s (flat floor); each product"
              f" at its own shape's best rate: {by_shape:.3f} s (shape floor); plus the eager"
              f" norms, adds, attention and activations: {kernels:.3f} s more"
              f" ({(by_shape + kernels) / by_shape:.2f}x the shape floor: "
              + ", ".join(f"{kind} {t * 1e3:.1f} ms" for kind, t in by_kind.items()) + ")")
        if args.rates:
            for m, k, n in sorted(dict.fromkeys(products)):
                print(f"  [{m} x {k}] @ [{k} x {n}]: {best_rate_gflops(m, k, n):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
