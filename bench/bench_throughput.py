"""Throughput of claims over many prompts on the toy models (issue: prompt families).

Runs, in one process, a `logit_diff` claim and a `patch_sweep` claim over [layer, head] (z)
on N prompts of the toy corpus (the seed's first-4-words recipe), through the same path as
`harness run`, and prints prompts per second and peak memory against the memory budget.

    .venv/bin/python bench/bench_throughput.py [--prompts 1000] [--budget-mb 256]
        [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SPEC = """\
spec: throughput
models:
  source: {{zoo: toy-reviews-source}}
  rlhf: {{zoo: toy-reviews-rlhf}}
prompts:
  - corpus: {{n: {n}, seed: 0}}
    first_words: 4
    answer: " bad"
    foil: " good"
claims:
  - id: logit-diff
    measure: logit_diff
    model: rlhf
    expect: {{">": -100}}
  - id: head-sweep
    measure: patch_sweep
    from: rlhf
    into: source
    site: z
    over: [layer, head]
    expect: {{max: {{">": -100}}}}
"""


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak(device: str) -> float:
    """Start a new high-water mark at the memory in use now; returns that memory in MB."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        pass
    return _status_mb("VmRSS") or peak_mb(device)


def peak_mb(device: str) -> float:
    """High-water mark of the memory claims use: the CUDA allocator's on a GPU, else RSS."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from harness.claims import evaluate_claim
    from harness.runner import load_and_check
    from harness.session import Session

    with tempfile.TemporaryDirectory() as tmp:
        session = Session(device=args.device, memory_budget_mb=args.budget_mb, verbose=False)
        specs = []
        for name, n_prompts in (("warmup", 10), ("throughput", args.prompts)):
            spec_file = Path(tmp) / f"{name}.yaml"
            spec_file.write_text(textwrap.dedent(SPEC.format(n=n_prompts)))
            specs.append(load_and_check(spec_file, session))
        warmup, spec = specs
        n = len(spec.prompt_set(None))
        # outside the measurement, as in a session that has run claims before: models and
        # prompt batches loaded, each claim run once on 10 prompts (imports, first kernels)
        for name in ("source", "rlhf"):
            session.batch(spec, spec.prompt_set(None), session.model(spec, name), True)
        for index in range(len(warmup.claims)):
            evaluate_claim(warmup, index, session)
        device = session.loaded_models()[0]["device"]
        before = reset_peak(device)
        rows = []
        for index, claim in enumerate(spec.claims):
            start = time.perf_counter()
            verdict = evaluate_claim(spec, index, session)
            seconds = time.perf_counter() - start
            if verdict.status != "passed":
                print(f"{claim.id}: {verdict.status}: {verdict.message}", file=sys.stderr)
                return 1
            rows.append({"claim": claim.id, "prompts": n, "seconds": round(seconds, 3),
                         "prompts_per_second": round(n / seconds, 1),
                         "peak_mb": round(peak_mb(device), 1)})
    traces_mb = session.engine.cached_trace_bytes() / 2**20
    what = "CUDA allocator peak" if device.startswith("cuda") else "peak RSS"
    print(f"device {device}, {n} prompts, memory budget {args.budget_mb} MB, "
          f"in use before the claims {before:.0f} MB (libraries, models, prompt batches, "
          "warm-up)")
    print(f"{'claim':<12} {'prompts':>8} {'seconds':>9} {'prompts/s':>10} {what + ' MB':>22}")
    for r in rows:
        print(f"{r['claim']:<12} {r['prompts']:>8} {r['seconds']:>9.3f} "
              f"{r['prompts_per_second']:>10.1f} {r['peak_mb']:>22.0f}")
    growth = rows[-1]["peak_mb"] - before
    verdict = "within" if growth <= args.budget_mb else "OVER"
    print(f"{what} growth during the claims: {growth:.0f} MB, {verdict} the budget of "
          f"{args.budget_mb} MB; clean traces kept by the engine afterwards: {traces_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "budget_mb": args.budget_mb,
                                         "before_mb": before, "growth_mb": growth,
                                         "traces_mb": traces_mb,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
