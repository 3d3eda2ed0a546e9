"""The arithmetic ceiling of an exact head sweep on this machine (docs/performance.md).

A z-over-[layer, head] sweep cannot skip rows: each of its layer x head variants recomputes
every row from its layer on (the last block only keys/values of all rows plus the final row).
This script counts those float32 multiply-adds for the benchmark's GPT-2-small and Llama shapes
(8-token prompt, one prompt), measures this machine's best float32 matrix product on the
sweep's own shapes, and prints the shortest time any exact implementation could take — divide
TransformerLens's time from bench_patching.py by it for the largest possible ratio.

    .venv/bin/python bench/head_sweep_ceiling.py
"""

from __future__ import annotations

import time

import torch

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


def best_matmul_gflops(d: int, d_mlp: int, repeats: int = 10) -> float:
    best = 0.0
    for m, k, n in ((96, d, d_mlp), (1152, d, d_mlp), (1152, d_mlp, d), (1152, d, 3 * d)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    torch.set_grad_enabled(False)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, shape in SHAPES.items():
        flop = head_sweep_flop(*shape)
        peak = best_matmul_gflops(shape[0], shape[5])
        print(f"{name}: head sweep {flop / 1e9:.1f} GFLOP; best float32 matmul {peak:.0f} GFLOP/s"
              f" -> no exact sweep under {flop / 1e9 / peak:.3f} s")


if __name__ == "__main__":
    main()
