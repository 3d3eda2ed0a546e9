"""The cost of `against: {random: N}`: N random head selections ablated as the engine measures
them for a claim (single-layer ones as variants of one batched run, multi-layer ones stacked
along one hooked forward's batch), against one ablation and against N ablations one at a
time, on a tiny random GPT-2 (4 layers, d_model 64), 16 prompts, both engine paths.

    python bench/bench_chance.py [--n 100] [--threads N]

Prints ratios measured in the same run (docs/performance.md, "Against chance").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def best(fn, reps: int = 3) -> float:
    out = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformer_lens.model_bridge import TransformerBridge

    from harness.measure.patching import PatchingEngine, Run
    from harness.testing import build_tiny_gpt2

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_gpt2(Path(tmp) / "m", n_layer=4, n_embd=64)
        bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
        bridge.enable_compatibility_mode()
    text = "This movie was really good. The acting was great and I thought the plot was"
    tokens = bridge.to_tokens([text] * 16, prepend_bos=True).cpu()
    final = torch.full((16,), tokens.shape[1] - 1)
    answer, foil = torch.full((16,), 5), torch.full((16,), 6)
    single = [{"heads": [(2, h % 4)]} for h in range(args.n)]
    pairs = [{"heads": [(1, h % 4), (2, (h // 4) % 4)]} for h in range(args.n)]
    for path in ("auto", "general"):
        print(compare(PatchingEngine(path=path), Run("m", bridge, tokens, final), answer, foil,
                      single, pairs))


def compare(engine, run, answer, foil, single, pairs) -> str:
    engine.logit_diff(run, answer, foil)
    one = best(lambda: engine.ablate(run, answer, foil, site="z", heads=[(2, 1)]))
    batched = best(lambda: engine.ablate_each(run, answer, foil, site="z", selections=single))
    each = best(lambda: [engine.ablate(run, answer, foil, site="z", **s) for s in single], 1)
    stacked = best(lambda: engine.ablate_each(run, answer, foil, site="z", selections=pairs), 1)
    n = len(single)
    return (f"{engine.path_of(run)}: one ablation {one * 1e3:.0f} ms; {n} single-layer "
            f"selections batched {batched:.2f} s = {batched / one:.1f}x one, one at a time "
            f"{each:.1f} s = {each / batched:.1f}x batched; {n} two-layer selections "
            f"{stacked:.2f} s = {stacked / one:.1f}x one")


if __name__ == "__main__":
    main()
