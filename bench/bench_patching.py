"""Patching sweeps on GPT-2-small, Llama- and Pythia-shaped models: TransformerLens vs the engine.

Builds, offline, two random models of each kind (GPT-2 small: 12 layers, d_model 768, 12
heads, vocabulary 50257; Llama-shaped: 12 layers, d_model 768, 12 query heads sharing 4 KV
heads, d_mlp 2048, vocabulary 32000, RMSNorm, rotary; Pythia-shaped: 12 layers, d_model 768, 12
heads, d_mlp 3072, vocabulary 50304, parallel attention + MLP, rotary on a quarter of each
head; a tiny trained BPE tokenizer) and patches
the second model's activations into the first on one 8-token prompt (model -> model, as in the
seed analysis). For each sweep it prints TransformerLens's time, the engine's (its fast path for
the family) and the engine's general path (`PatchingEngine(path="general")`), their ratios,
the largest absolute differences of the patched logit diffs and peak memory.

    python bench/bench_patching.py [--device cuda] [--json out.json] [--sweeps z,resid_pre]
                                   [--models gpt2,llama,pythia]
                                   [--profile]   (the head sweep's matrix products vs its floor)
                                   [--floor-rounds 3]   (rounds of the head sweep against its floor)
    python bench/bench_patching.py --real-only [--real-dir DIR] [--prompts 4,64,256]
                                   [--real-layers 20] [--tl-budget-s 60] [--no-general]

`--real` adds, and `--real-only` runs only, the real-model rows: SmolLM2-135M-Instruct (30
layers, 9 query / 3 KV heads, d_model 576; a safetensors folder, `--real-dir`) on the IOI
prompts of specs/data/smollm2_ioi.jsonl (clean -> ABC corrupt), for 4, 64 and 256 prompts
(`--prompts`, alias `--real-prompts`): the z-over-[layer, head] sweep on the engine's fast
path, its general path (`--no-general` skips it), attribution patching and TransformerLens,
beside the arithmetic floor of head_sweep_ceiling.py for the same shape; then path patching of
every sender head to the final residual. The one-off setup (the clean traces) is printed apart.
`--real-layers` restricts every sweep (and the floor) to some layers, so that the big rows
fit a short run. TransformerLens patches one head per full forward of the batch (the same
cost in every layer), so it runs head by head (`generic_activation_patch` with
`get_act_patch_attn_head_out_all_pos`'s setter) until `--tl-budget-s` is spent: its time for
the row's layers is its mean time per head times their heads, printed with how many heads it
measured ("TL heads"), and its cells are compared with the engine's. Its tqdm bars are off.

Timing: the TransformerLens column is its patching function given a precomputed clean cache;
the engine column is `patch_sweep` on an engine whose clean runs are already traced (as in a
harness session, where all claims share them). Both one-off setups are printed separately, and
"cold" adds each side's setup to each sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.progress import quiet_libraries  # noqa: E402
from harness.testing import TINY_TEXTS  # noqa: E402
from harness.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer  # noqa: E402

PROMPT = "This movie was really"  # 8 tokens with BOS under the tiny tokenizer
SWEEPS = {  # name -> (TransformerLens function, engine site, engine over, TL axes -> ours)
    "z": ("get_act_patch_attn_head_out_all_pos", "z", ("layer", "head")),
    "resid_pre": ("get_act_patch_resid_pre", "resid_pre", ("layer", "pos")),
    "attn_out": ("get_act_patch_attn_out", "attn_out", ("layer", "pos")),
    "mlp_out": ("get_act_patch_mlp_out", "mlp_out", ("layer", "pos")),
}


def build_gpt2_small(directory: Path, seed: int) -> Path:
    """Random GPT-2-small-sized checkpoint with a tiny tokenizer (vocab_size stays 50257)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory


def build_llama(directory: Path, seed: int) -> Path:
    """Random Llama-shaped checkpoint: 12 layers, d_model 768, 12 query heads sharing 4 KV
    heads, gated MLP of 2048, vocabulary 32000, RMSNorm, rotary; the same tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory


def build_pythia(directory: Path, seed: int) -> Path:
    """Random Pythia-shaped checkpoint (GPT-NeoX: parallel attention + MLP, rotary_pct 0.25,
    LayerNorm): 12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50304; the same tiny
    tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12, rotary_pct=0.25,
                           use_parallel_residual=True, max_position_embeddings=2048,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    GPTNeoXForCausalLM(config).eval().save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory


class PeakMemory:
    """Peak extra memory of a section: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: str):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        self.base = self.max_rss = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.max_rss = max(self.max_rss, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak_mb = (max(self.max_rss, _rss()) - self.base) / 2**20


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so that RSS growth shows a section's own peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the peak is then a lower bound
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, device: str, memory: bool = True):
    """(fn's result, its seconds, its peak extra memory in MB). On CPU the memory is sampled
    by a thread after returning freed pages to the OS, which costs the timed call page faults
    and a sharer of the cores: repeats that only time pass memory=False (peak 0)."""
    if not memory:
        return (*_seconds(fn, device), 0.0)
    with PeakMemory(device) as mem:
        out, seconds = _seconds(fn, device)
    return out, seconds, mem.peak_mb


def _seconds(fn, device: str):
    """(fn's result, its wall-clock seconds, the GPU's queue drained on both sides)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


MODELS = {"gpt2": build_gpt2_small, "llama": build_llama, "pythia": build_pythia}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    parser.add_argument("--models", default=",".join(MODELS),
                        help="which random models to bench: gpt2 (GPT-2 small), llama "
                             "(Llama-shaped, grouped-query attention), pythia (Pythia-shaped, "
                             "parallel blocks, partial rotary)")
    parser.add_argument("--real", action="store_true",
                        help="also bench the real model (SmolLM2-135M) on IOI prompts")
    parser.add_argument("--real-only", action="store_true",
                        help="only the real-model rows")
    parser.add_argument("--real-dir", type=Path, default=None,
                        help="a SmolLM2-135M safetensors folder (default: the zoo's "
                             "`smollm2-135m`, converted into the harness cache once)")
    parser.add_argument("--prompts", "--real-prompts", dest="real_prompts", default="4,64,256",
                        help="the real-model rows' prompt counts")
    parser.add_argument("--real-layers", default=None,
                        help="the real-model sweeps' layers, e.g. 20 or 0,15,29 (default all)")
    parser.add_argument("--tl-budget-s", type=float, default=60.0,
                        help="TransformerLens's seconds per real-model row: heads are patched "
                             "one at a time until this is spent (at least one; 0 skips it), "
                             "its time for the row's layers scaled from the mean per head")
    parser.add_argument("--no-general", action="store_true",
                        help="skip the engine's general path in the real-model rows")
    parser.add_argument("--profile", action="store_true",
                        help="profile one head sweep: its matrix products against the floor")
    parser.add_argument("--floor-rounds", type=int, default=3,
                        help="rounds of the head sweep against its floor (each measures both)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="engine timing = best of this many calls (the first call also "
                             "pays one-off kernel and allocator warm-up, reported apart)")
    args = parser.parse_args(argv)
    quiet_libraries(transformer_lens_patching=True)  # HARNESS_LIBRARY_PROGRESS=1: show them
    torch.set_grad_enabled(False)
    results = {"machine": _machine(args.device), "models": {}}
    print(f"device {results['machine']}")
    if not args.real_only:
        for model in args.models.split(","):
            results["models"][model] = bench_model(model, args)
    if args.real or args.real_only:
        results["real"] = bench_real(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def bench_model(model: str, args) -> dict:
    """Every sweep on one model: TransformerLens, the engine's fast path and its general path."""
    import transformer_lens.patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    from harness.measure.patching import PatchingEngine, Run

    with tempfile.TemporaryDirectory() as tmp:
        bridges = []
        for name, seed in (("into", 0), ("from", 1)):
            directory = MODELS[model](Path(tmp) / name, seed)
            bridge = TransformerBridge.boot_transformers(str(directory), device=args.device)
            bridge.enable_compatibility_mode()
            bridges.append(bridge)
    into_bridge, from_bridge = bridges
    tokens = into_bridge.to_tokens(PROMPT).to(args.device)
    final_pos = torch.tensor([tokens.shape[1] - 1])
    answer, foil = torch.tensor([101]), torch.tensor([202])  # random weights: any two tokens
    rows = torch.arange(1)

    def metric(logits):
        final = logits[rows, final_pos]
        return (final[rows, answer] - final[rows, foil]).mean()

    (_, cache), tl_setup, _ = timed(lambda: from_bridge.run_with_cache(tokens), args.device)
    engines = {"fast": PatchingEngine(), "general": PatchingEngine(path="general")}
    from_run = Run("from", from_bridge, tokens, final_pos)
    into_run = Run("into", into_bridge, tokens, final_pos)
    setup = {}
    for kind, engine in engines.items():
        def setup_engine(engine=engine):
            engine.logit_diff(from_run, answer, foil)
            engine.logit_diff(into_run, answer, foil)

        setup[kind] = timed(setup_engine, args.device)[1]
    fast_path = engines["fast"].path_of(into_run)
    results = {"tokens": int(tokens.shape[1]), "fast_path": fast_path,
               "setup_s": {"transformer_lens": tl_setup, "engine": setup["fast"],
                           "general": setup["general"]}, "sweeps": {}}
    cfg = into_bridge.cfg
    print(f"\n{model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
          f"({getattr(cfg, 'n_key_value_heads', None) or cfg.n_heads} KV), d_mlp {cfg.d_mlp}, "
          f"vocab {cfg.d_vocab}; fast path {fast_path!r}; prompt {tokens.shape[1]} tokens; "
          f"one-off setup: TransformerLens clean cache {tl_setup:.2f} s, engine clean traces "
          f"{setup['fast']:.2f} s (general path {setup['general']:.2f} s)")
    header = (f"{'sweep':<32}{'cells':>6}{'TL s':>8}{'engine s':>10}{'1st call':>10}"
              f"{'ratio':>8}{'1st ratio':>10}{'cold ratio':>11}{'max |diff|':>11}"
              f"{'TL MB':>7}{'engine MB':>10}{'general s':>10}{'gen ratio':>10}"
              f"{'gen |diff|':>11}")
    print(header)
    floor_line = ""
    for name in args.sweeps.split(","):
        fn_name, site, over = SWEEPS[name]
        fn = getattr(tl_patching, fn_name)
        ref, tl_s, tl_mb = timed(partial(fn, into_bridge, tokens, cache, metric), args.device)
        ref = ref.float().cpu()
        timings = {}
        for kind, engine in engines.items():
            sweep = partial(engine.patch_sweep, from_run, into_run, answer, foil, site=site,
                            over=over)
            grid, first_s, mb = timed(sweep, args.device)
            best = min([first_s] + [timed(sweep, args.device, memory=False)[1]
                                    for _ in range(args.repeat - 1)])
            timings[kind] = (grid, first_s, best, mb, (grid.raw - ref).abs().max().item())
        grid, first_s, eng_s, eng_mb, diff = timings["fast"]
        _, _, gen_s, _, gen_diff = timings["general"]
        row = {"sweep": f"{site} over {list(over)}", "cells": grid.raw.numel(), "tl_s": tl_s,
               "engine_s": eng_s, "engine_first_call_s": first_s, "ratio": tl_s / eng_s,
               "first_call_ratio": tl_s / first_s,
               "cold_ratio": (tl_s + tl_setup) / (first_s + setup["fast"]),
               "max_abs_diff": diff, "tl_peak_mb": tl_mb, "engine_peak_mb": eng_mb,
               "general_s": gen_s, "general_ratio": tl_s / gen_s, "general_max_abs_diff": gen_diff}
        results["sweeps"][name] = row
        if site == "z":   # the head sweep beside its arithmetic floor (issue 26, item 3)
            sweep = partial(engines["fast"].patch_sweep, from_run, into_run, answer, foil,
                            site=site, over=over)
            row.update(_against_floor(sweep, cfg, tokens.shape[1], args))
            low, high = row["shape_floor_ratio_range"]
            floor_line = (f"  (head sweep against its floors, medians of {args.floor_rounds} "
                          f"rounds: engine {row['floor_sweep_s']:.3f} s = "
                          f"{row['shape_floor_ratio']:.2f}x the shape floor "
                          f"{row['shape_floor_s']:.3f} s (rounds {low:.2f}-{high:.2f}x), "
                          f"{row['floor_ratio']:.2f}x the flat floor {row['floor_s']:.3f} s; "
                          f"with plain products (HARNESS_FUSED_LINEAR=0) {row['plain_s']:.3f} s "
                          f"= {row['plain_shape_floor_ratio']:.2f}x the shape floor)\n"
                          f"  (timed alternately with its products run back to back, "
                          f"{row['sequence_floor_s']:.3f} s: median "
                          f"{row['sequence_ratio']:.2f}x over "
                          f"{args.floor_rounds * args.repeat} pairs, "
                          f"{row['sequence_ratio_range'][0]:.2f}-"
                          f"{row['sequence_ratio_range'][1]:.2f}x)")
            if args.profile:
                products, total = _matmul_share(partial(
                    engines["fast"].patch_sweep, from_run, into_run, answer, foil,
                    site=site, over=over))
                row["matmul_s"], row["profiled_s"] = products, total
                floor_line += (f"\n  (profiled: matrix products {products:.3f} s of "
                               f"{total:.3f} s = {products / row['shape_floor_s']:.2f}x the "
                               f"shape floor; "
                               f"everything else {total - products:.3f} s, of which the "
                               f"norms, adds, attention and activations it cannot skip take "
                               f"{row['kernels_floor_s']:.3f} s at their own shapes' best)")
        print(f"{row['sweep']:<32}{row['cells']:>6}{tl_s:>8.2f}{eng_s:>10.3f}{first_s:>10.3f}"
              f"{row['ratio']:>7.1f}x{row['first_call_ratio']:>9.1f}x{row['cold_ratio']:>10.1f}x"
              f"{diff:>11.2e}{tl_mb:>7.0f}{eng_mb:>10.0f}{gen_s:>10.3f}"
              f"{row['general_ratio']:>9.1f}x{gen_diff:>11.2e}", flush=True)
    if floor_line:
        print(floor_line, flush=True)
    return results


def _against_floor(sweep, cfg, rows: int, args) -> dict:
    """The head sweep against both floors of head_sweep_ceiling.py (flat: every product at
    the best rate of any shape; by shape: each at its own shape's best rate; beside them the
    eager norms, adds, attention and activations an exact sweep cannot skip), in rounds that
    measure the floors, the sweep and the sweep with plain products (the oneDNN fusion off)
    each time, so that the machine's drift over a run (a floor's rate moves by 10-20% between
    processes) meets all of them alike: medians of each and of the per-round ratios. In each
    round the sweep is also timed alternately with its products run back to back
    (`sequence_floor`), `--repeat` pairs: the steadiest of these ratios."""
    from head_sweep_ceiling import (
        head_sweep_products,
        sequence_floor,
        shape_floor_s,
        shape_kernels_s,
    )

    rounds: list[tuple[float, float, float, float, float]] = []
    pairs: list[tuple[float, float]] = []   # (sequence floor, sweep), timed one after another
    shape = _sweep_shape(cfg)
    products = head_sweep_products(*shape, rows=rows)
    sequence = sequence_floor(products)
    rotary = getattr(cfg, "positional_embedding_type", None) == "rotary"
    before = os.environ.get("HARNESS_FUSED_LINEAR")
    try:
        for _ in range(args.floor_rounds):
            flat = _head_sweep_floor_s(cfg, rows)
            by_shape = shape_floor_s(products)
            kernels = sum(shape_kernels_s(shape, rows=rows, rotary=rotary).values())
            os.environ["HARNESS_FUSED_LINEAR"] = "1"
            sequence(), sweep()
            for _ in range(args.repeat):
                pairs.append(tuple(timed(call, args.device, memory=False)[1]
                                   for call in (sequence, sweep)))
            times = []
            for switch in ("1", "0"):
                os.environ["HARNESS_FUSED_LINEAR"] = switch
                sweep()
                times.append(min(timed(sweep, args.device, memory=False)[1]
                                 for _ in range(args.repeat)))
            rounds.append((flat, by_shape, kernels, *times))
    finally:   # the caller's own setting back
        os.environ.pop("HARNESS_FUSED_LINEAR")
        if before is not None:
            os.environ["HARNESS_FUSED_LINEAR"] = before
    flat, by_shape, kernels, fused, plain = (list(column) for column in zip(*rounds))
    shape_ratios = [t / f for t, f in zip(fused, by_shape)]

    def median_ratio(times, floors):
        return statistics.median(t / f for t, f in zip(times, floors))
    return {"floor_s": statistics.median(flat), "shape_floor_s": statistics.median(by_shape),
            "kernels_floor_s": statistics.median(kernels),
            "floor_sweep_s": statistics.median(fused), "plain_s": statistics.median(plain),
            "floor_ratio": median_ratio(fused, flat),
            "shape_floor_ratio": statistics.median(shape_ratios),
            "shape_floor_ratio_range": (min(shape_ratios), max(shape_ratios)),
            "plain_shape_floor_ratio": median_ratio(plain, by_shape),
            "sequence_floor_s": statistics.median(f for f, _ in pairs),
            "sequence_ratio": statistics.median(t / f for f, t in pairs),
            "sequence_ratio_range": (min(t / f for f, t in pairs), max(t / f for f, t in pairs))}


def _head_sweep_floor_s(cfg, rows: int, prompts: int = 1, layers=None,
                        gflops: float | None = None) -> float:
    """head_sweep_ceiling.py's floor for this model's shape (`prompts` prompts of `rows`
    tokens, the sweep's `layers`): its multiply-adds at the best float32 matrix product
    (`gflops`, measured now in this process when not given)."""
    from head_sweep_ceiling import best_matmul_gflops, head_sweep_flop

    flop = prompts * head_sweep_flop(*_sweep_shape(cfg), rows=rows, layers=layers)
    return flop / 1e9 / (gflops or best_matmul_gflops(cfg.d_model, cfg.d_mlp))


def _sweep_shape(cfg) -> tuple[int, ...]:
    """head_sweep_ceiling's shape of a model: d_model, layers, query heads, KV heads, d_head,
    d_mlp, MLP matrices."""
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    mlp_mats = 3 if getattr(cfg, "gated_mlp", False) else 2
    return cfg.d_model, cfg.n_layers, cfg.n_heads, n_kv, cfg.d_head, cfg.d_mlp, mlp_mats


def _matmul_share(sweep) -> tuple[float, float]:
    """(seconds in matrix products, seconds in all operators) of one call of `sweep`, by
    torch.profiler: how much of the head sweep the floor's arithmetic covers."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sweep()
    times = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    products = sum(v for k, v in times.items()
                   if k in ("aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm",
                            "aten::baddbmm", "aten::baddbmm_", "mkldnn::_linear_pointwise"))
    return products, sum(times.values())


def _ioi_prompts(n: int) -> list[dict]:
    """The first n IOI rows of one template (equal token lengths), cycled to n prompts."""
    rows = [json.loads(line) for line in
            (Path(__file__).resolve().parents[1] / "specs/data/smollm2_ioi.jsonl").open()]
    store = [r for r in rows if "went to the store" in r["text"]]
    return [store[i % len(store)] for i in range(n)]


def _zoo_smollm2() -> Path:
    """The folder `zoo: smollm2-135m` loads: the packaged GGUF file, converted once."""
    from harness.gguf_files import converted_folder
    from harness.zoo.store import packaged_gguf

    return converted_folder(packaged_gguf("smollm2-135m"), "float32")


def bench_real(args) -> dict:
    """The IOI head sweep and path patching on SmolLM2-135M for several prompt counts."""
    import transformer_lens.patching as tl_patching
    from head_sweep_ceiling import best_matmul_gflops
    from transformer_lens.model_bridge import TransformerBridge

    from harness.measure import circuits as C
    from harness.measure.patching import PatchingEngine, Run

    # one bar per patched cell would fill the table's output: TransformerLens's bars off
    tl_patching.tqdm = partial(tl_patching.tqdm, disable=True)
    folder = args.real_dir or _zoo_smollm2()
    bridge = TransformerBridge.boot_transformers(str(folder), device=args.device)
    bridge.enable_compatibility_mode()
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    layers = (tuple(range(cfg.n_layers)) if args.real_layers is None
              else tuple(int(x) for x in args.real_layers.split(",")))
    gflops = best_matmul_gflops(cfg.d_model, cfg.d_mlp)
    senders = [[C.Component(layer, h)] for layer in range(cfg.n_layers)
               for h in range(cfg.n_heads)]
    print(f"\nSmolLM2-135M: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
          f"({n_kv} KV), d_mlp {cfg.d_mlp}; IOI clean -> ABC; best float32 matmul "
          f"{gflops:.0f} GFLOP/s; sweeps over layers "
          f"{'all' if args.real_layers is None else ','.join(map(str, layers))} "
          f"({len(layers) * cfg.n_heads} heads)")
    print(f"{'prompts':>8}{'tokens':>7}{'setup s':>9}{'engine s':>10}{'general s':>10}"
          f"{'attrib s':>10}{'TL s':>9}{'TL heads':>9}{'floor s':>9}{'TL/engine':>10}"
          f"{'max |diff|':>11}{'path->resid s':>14}")
    out = {}

    def one(n: int) -> None:
        prompts = _ioi_prompts(n)
        tok = bridge.tokenizer
        ids = lambda key: torch.tensor([tok(p[key], add_special_tokens=False).input_ids  # noqa: E731
                                        for p in prompts]).to(args.device)
        clean, corrupt = ids("text"), ids("corrupt")
        answer = torch.tensor([tok(p["answer"], add_special_tokens=False).input_ids[0]
                               for p in prompts])
        foil = torch.tensor([tok(p["foil"], add_special_tokens=False).input_ids[0]
                             for p in prompts])
        final_pos = torch.full((n,), clean.shape[1] - 1)
        from_run = Run("m", bridge, clean, final_pos)
        into_run = Run("m", bridge, corrupt, final_pos)
        row = {"tokens": int(clean.shape[1]), "layers": list(layers)}
        engines = {"engine": PatchingEngine()}
        if not args.no_general:
            engines["general"] = PatchingEngine(path="general")

        def setup():
            for engine in engines.values():
                engine.logit_diff(from_run, answer, foil)
                engine.logit_diff(into_run, answer, foil)
        row["setup_s"] = timed(setup, args.device)[1]
        grids, row["general_s"] = {}, None
        for kind, engine in engines.items():
            grids[kind], row[f"{kind}_s"], _ = timed(partial(
                engine.patch_sweep, from_run, into_run, answer, foil, site="z",
                over=("layer", "head"), layers=layers), args.device)
        row["attribution_s"] = timed(partial(
            engines["engine"].patch_sweep, from_run, into_run, answer, foil, site="z",
            over=("layer", "head"), method="attribution", layers=layers), args.device)[1]
        row.update(_tl_heads(bridge, tl_patching, clean, corrupt, answer, foil, final_pos,
                             layers, cfg.n_heads, grids["engine"].raw, args.tl_budget_s))
        row["floor_s"] = _head_sweep_floor_s(cfg, clean.shape[1], n, layers, gflops)
        row["path_resid_s"] = timed(partial(engines["engine"].path_patch, from_run, into_run,
                                            answer, foil, senders, "resid"), args.device)[1]
        out[n] = row
        cell = lambda value, fmt, width: (f"{value:>{width}{fmt}}" if value is not None  # noqa: E731
                                          else f"{'-':>{width}}")
        ratio = (f"{row['tl_s'] / row['engine_s']:>9.1f}x" if row["tl_s"] is not None
                 else f"{'-':>10}")
        heads = f"{row['tl_heads']}/{len(layers) * cfg.n_heads}" if row["tl_s"] else "-"
        print(f"{n:>8}{row['tokens']:>7}{row['setup_s']:>9.2f}{row['engine_s']:>10.2f}"
              f"{cell(row['general_s'], '.2f', 10)}{row['attribution_s']:>10.2f}"
              f"{cell(row['tl_s'], '.2f', 9)}{heads:>9}{row['floor_s']:>9.2f}{ratio}"
              f"{cell(row['max_abs_diff'], '.2e', 11)}{row['path_resid_s']:>14.2f}", flush=True)

    for n in (int(x) for x in args.real_prompts.split(",")):
        one(n)
    return out


def _tl_heads(bridge, tl_patching, clean, corrupt, answer, foil, final_pos, layers, n_heads,
              engine_raw, budget_s: float) -> dict:
    """TransformerLens's head sweep over `layers`, one head per call until `budget_s` is spent
    (at least one head): each head is one full forward of the corrupt batch with that head's z
    from the clean cache, the same cost in any layer, so its time for all the layers' heads is
    the mean per head times their number. -> tl_s (scaled), tl_heads (measured), tl_measured_s,
    max_abs_diff (measured cells against the engine's raw grid)."""
    import pandas as pd

    if budget_s <= 0:
        return {"tl_s": None, "tl_heads": 0, "tl_measured_s": 0.0, "max_abs_diff": None}
    rows = torch.arange(clean.shape[0])

    def metric(logits):
        final = logits[rows, final_pos]
        return (final[rows, answer] - final[rows, foil]).mean()

    _, cache = bridge.run_with_cache(clean)
    cells = [(layer, head) for layer in layers for head in range(n_heads)]
    spent, diff, done = 0.0, 0.0, 0
    for layer, head in cells:
        index = pd.DataFrame([(layer, head)], columns=["layer", "head"])
        start = time.perf_counter()
        ref = tl_patching.generic_activation_patch(
            bridge, corrupt, cache, metric, tl_patching.layer_head_vector_patch_setter, "z",
            index_df=index)
        spent += time.perf_counter() - start
        done += 1
        mine = engine_raw[layers.index(layer), head]
        diff = max(diff, (mine - ref.float().cpu().reshape(())).abs().item())
        if spent >= budget_s:
            break
    del cache
    return {"tl_s": spent / done * len(cells), "tl_heads": done, "tl_measured_s": spent,
            "max_abs_diff": diff}


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
