"""Path patching against the exact head sweep on the same prompts, in one process.

Builds, offline, a random GPT-2-small-shaped and a Llama-shaped model (bench_patching.py's
builders) and runs on 4 prompts of 15 random tokens (clean, and corrupt with two columns
changed): the engine's exact z-over-[layer, head] sweep (clean -> corrupt), then path patching of
every head as a sender to the final residual and to one mid-layer head's queries and keys (the
slowest receiver layer: senders before it times layers after it is largest there). Prints each
time and its ratio to the head sweep's (targets: 1.5x to the residual, 2.5x to q/k/v;
docs/performance.md). `--reference` also times the hook implementation
(`circuits.path_patch`, every sender rerun from the embeddings) and prints the largest
difference of the engine's per-prompt logit diffs from it.

    python bench/bench_path_patching.py [--models gpt2,llama] [--repeat 3] [--reference]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patching import MODELS  # noqa: E402

from harness.progress import quiet_libraries  # noqa: E402

N_PROMPTS, N_TOKENS = 4, 15


def best_time(fn, repeat: int):
    out, times = None, []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def bench_model(model: str, args) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    from harness.measure import circuits as C
    from harness.measure.patching import PatchingEngine, Run

    with tempfile.TemporaryDirectory() as tmp:
        directory = MODELS[model](Path(tmp) / "m", 0)
        bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
        bridge.enable_compatibility_mode()
    cfg = bridge.cfg
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 300, (N_PROMPTS, N_TOKENS), generator=gen)
    corrupt = clean.clone()
    corrupt[:, [3, 7]] = torch.randint(3, 300, (N_PROMPTS, 2), generator=gen)
    final_pos = torch.full((N_PROMPTS,), N_TOKENS - 1)
    answer, foil = torch.tensor([101] * N_PROMPTS), torch.tensor([202] * N_PROMPTS)
    engine = PatchingEngine()
    from_run, into_run = Run("m", bridge, clean, final_pos), Run("m", bridge, corrupt, final_pos)
    engine.logit_diff(from_run, answer, foil)           # clean traces, as in a session
    engine.logit_diff(into_run, answer, foil)
    senders = [[C.Component(layer, h)] for layer in range(cfg.n_layers)
               for h in range(cfg.n_heads)]
    mid = cfg.n_layers // 2
    print(f"\n{model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads; "
          f"{engine.path_of(into_run)}; {N_PROMPTS} prompts x {N_TOKENS} tokens, "
          f"{len(senders)} senders")
    _, sweep_s = best_time(lambda: engine.patch_sweep(from_run, into_run, answer, foil,
                                                      site="z", over=("layer", "head")),
                           args.repeat)
    print(f"{'measurement':<36}{'seconds':>9}{'/ head sweep':>14}"
          + (f"{'hooks s':>9}{'max |diff|':>12}" if args.reference else ""))
    print(f"{'head sweep z over [layer, head]':<36}{sweep_s:>9.3f}{1.0:>13.2f}x")
    for path, receivers in (("resid", ()), ("q", (f"L{mid}H0",)), ("k", (f"L{mid}KV0",))):
        got, seconds = best_time(partial(engine.path_patch, from_run, into_run, answer, foil,
                                         senders, path, receivers), args.repeat)
        label = f"path patch -> {path} {' '.join(receivers)}".rstrip()
        row = f"{label:<36}{seconds:>9.3f}{seconds / sweep_s:>13.2f}x"
        if args.reference:
            start = time.perf_counter()
            ref = C.path_patch(bridge, clean, corrupt, final_pos, answer, foil, senders, path,
                               receivers)
            row += f"{time.perf_counter() - start:>9.2f}{(got - ref).abs().max().item():>12.2e}"
        print(row, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many calls")
    parser.add_argument("--reference", action="store_true",
                        help="also time the hook implementation and compare its values")
    args = parser.parse_args(argv)
    quiet_libraries()  # third-party bars: HARNESS_LIBRARY_PROGRESS=1 shows them
    torch.set_grad_enabled(False)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for model in args.models.split(","):
        bench_model(model, args)


if __name__ == "__main__":
    main()
