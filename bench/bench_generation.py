"""Generation speed on the toy models: the sampling workloads of specs/toy_negative_reviews.yaml
(9 family prompts x 4 samples x 12 tokens, temperature 1; the same while patching attn_out of
layers 2-3 from the RLHF model into the source), three ways, in one process:

- ours: `generate_texts` (HF generate, batched, KV cache, per-row seeds; patching by hooks);
- HF `generate` batched with its KV cache on the same weights (sampling, no patch: the floor);
- the previous token loop: one full bridge forward per token per sample (`generate_uncached`).

Ours and HF are run once to warm up, then timed `--repeats` times (best kept); the token
loop (after them, so warm) is timed once. Prints seconds and
ratios measured in this run; `--json FILE` writes them.

    .venv/bin/python bench/bench_generation.py [--repeats 3] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time


def best_of(fn, repeats: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    import torch

    from harness.progress import quiet_libraries

    quiet_libraries()  # third-party bars: HARNESS_LIBRARY_PROGRESS=1 shows them
    from harness.measure.generation import generate_texts, generate_uncached, patch_hooks
    from harness.models import load_model
    from harness.spec import ModelSource
    from harness.zoo import zoo_checkpoint

    torch.set_grad_enabled(False)
    source, rlhf = (load_model(name, ModelSource(zoo=name), str(zoo_checkpoint(name)),
                               args.device) for name in ("toy-reviews-source", "toy-reviews-rlhf"))
    texts = [f"This {noun} was {adv}" for noun in ("movie", "film", "show")
             for adv in ("really", "very", "quite")]
    samples, new_tokens = 4, 12
    prompts = [rlhf.bridge.to_tokens(t, prepend_bos=True)[0] for t in texts
               for _ in range(samples)]
    seeds = list(range(len(prompts)))
    patch = patch_hooks(rlhf, "attn_out", layers=[2, 3])

    def hf_generate(model):
        hf = model.plain_hf()
        batch = torch.stack(prompts).to(args.device)
        eos = model.tokenizer.eos_token_id
        return lambda: hf.generate(batch, attention_mask=torch.ones_like(batch),
                                   do_sample=True, temperature=1.0, top_k=0,
                                   max_new_tokens=new_tokens, pad_token_id=eos,
                                   eos_token_id=eos)

    workloads = {
        "sampling (rlhf)": (rlhf, None),
        "sampling while patching (source <- rlhf attn_out L2-3)": (source, patch),
    }
    rows = []
    for name, (model, p) in workloads.items():
        ours = best_of(lambda m=model, p=p: generate_texts(m, prompts, seeds, new_tokens, 1.0,
                                                           p), args.repeats)
        hf = best_of(hf_generate(model), args.repeats)
        start = time.perf_counter()            # the slow one: timed once, no warm-up
        loop_texts = [generate_uncached(model, t, new_tokens, 1.0, s, p)
                      for t, s in zip(prompts, seeds)]
        loop = time.perf_counter() - start
        same = generate_texts(model, prompts, seeds, new_tokens, 1.0, p) == loop_texts
        rows.append({"workload": name, "rows": len(prompts), "new_tokens": new_tokens,
                     "ours_s": ours, "hf_generate_s": hf, "token_loop_s": loop,
                     "ours_over_hf": ours / hf, "loop_over_ours": loop / ours,
                     "same_texts_as_loop": same})
    header = f"{'workload':<58}{'ours s':>9}{'HF gen s':>10}{'loop s':>9}{'ours/HF':>9}" \
             f"{'loop/ours':>11}  same texts"
    print(header)
    for r in rows:
        print(f"{r['workload']:<58}{r['ours_s']:>9.3f}{r['hf_generate_s']:>10.3f}"
              f"{r['token_loop_s']:>9.2f}{r['ours_over_hf']:>9.2f}{r['loop_over_ours']:>11.1f}"
              f"  {r['same_texts_as_loop']}")
    result = {"device": args.device, "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
