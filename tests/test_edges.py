"""Edge patching (harness/measure/edge_forward.py) against the models themselves: rebuilding
every receiver's input from all-clean edges gives the clean run, from all-ablated edges the
ablated run, and patching one edge equals hand-written PyTorch hooks on the Hugging Face model
(GPT-2, Llama with grouped-query attention, Pythia's parallel blocks, Gemma 2's post-norms and
OPT). The first two hold on every tiny architecture of harness.testing."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import assert_close, load_bridge
from transformers import AutoModelForCausalLM

from harness.measure.edge_forward import EdgeForward
from harness.testing import TINY_ARCHITECTURES, build_tiny_checkpoint

ATOL = 1e-4
SHARPEN = ("attn", "mlp", "attention", "fc1", "fc2")   # projections, scaled up: edges matter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            directory = build_tiny_checkpoint(arch, root / arch)
            hf = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
            with torch.no_grad():   # sharp attention, large outputs: single edges matter
                for name, p in hf.named_parameters():
                    if any(part in name for part in SHARPEN) and p.dim() == 2:
                        p.mul_(5.0)
            hf.save_pretrained(str(directory))
            cache[arch] = (load_bridge(directory), hf)
        return cache[arch]
    return get


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (3, 7), generator=gen), torch.randint(5, 300, (3, 7),
                                                                       generator=gen)


def edge_setup(bridge):
    clean, corrupt = prompts()
    ef = EdgeForward.for_bridge(bridge, clean)
    return ef, clean, corrupt, ef.outputs(ef.trace(clean)), ef.outputs(ef.trace(corrupt))


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_all_clean_edges_give_the_clean_run_and_all_ablated_the_ablated_run(models, arch):
    bridge, _ = models(arch)
    ef, clean, corrupt, out_clean, out_corrupt = edge_setup(bridge)
    weights = ef.ones(2)
    weights[1] = 0
    run = ef.run(out_clean, out_corrupt, weights)
    final_pos = torch.full((3,), clean.shape[1] - 1)
    logits = ef.final_logits(run.final, final_pos)
    with torch.no_grad():
        assert_close(logits[0], bridge(clean)[:, -1], atol=ATOL, rtol=0)
        assert_close(logits[1], bridge(corrupt)[:, -1], atol=ATOL, rtol=0)
    assert_close(run.final[0], ef.trace(clean)["final"], atol=ATOL, rtol=0)


def test_zero_weights_with_zero_outputs_leave_only_the_biases(models):
    """Every edge ablated to zero: each receiver reads the attention biases alone, so the
    logits are the same for any input."""
    bridge, _ = models("gpt2")
    ef, clean, corrupt, out_clean, _ = edge_setup(bridge)
    run = ef.run(out_clean, ef.zero_outputs(), ef.ones() * 0)
    final = run.final[0]
    assert_close(final, final[:1, :1].expand_as(final), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- hand-written hooks
# Each family's HF modules: decoder layers, the attention input norm, the q/k/v projection(s),
# the head output projection, the MLP input norm, the MLP, the final norm.

def hf_parts(arch: str, hf):
    if arch == "gpt2":
        return dict(layers=hf.transformer.h, final_norm=hf.transformer.ln_f,
                    attn_norm=lambda b: b.ln_1, mlp_norm=lambda b: b.ln_2, mlp=lambda b: b.mlp,
                    out_proj=lambda b: b.attn.c_proj, out_weight=lambda b: b.attn.c_proj.weight)
    if arch == "pythia":
        return dict(layers=hf.gpt_neox.layers, final_norm=hf.gpt_neox.final_layer_norm,
                    attn_norm=lambda b: b.input_layernorm,
                    mlp_norm=lambda b: b.post_attention_layernorm, mlp=lambda b: b.mlp,
                    out_proj=lambda b: b.attention.dense,
                    out_weight=lambda b: b.attention.dense.weight.T)
    if arch == "gemma2":   # a norm after attention and after the MLP: the MLP node ends with it
        return dict(layers=hf.model.layers, final_norm=hf.model.norm,
                    attn_norm=lambda b: b.input_layernorm,
                    mlp_norm=lambda b: b.pre_feedforward_layernorm,
                    mlp=lambda b: b.post_feedforward_layernorm,
                    out_proj=lambda b: b.self_attn.o_proj,
                    out_weight=lambda b: b.self_attn.o_proj.weight.T)
    if arch == "opt":   # no MLP module: fc1, activation, fc2 on [batch * pos, d] rows
        return dict(layers=hf.model.decoder.layers, final_norm=hf.model.decoder.final_layer_norm,
                    attn_norm=lambda b: b.self_attn_layer_norm,
                    mlp_norm=lambda b: b.final_layer_norm, mlp=lambda b: b.fc2,
                    out_proj=lambda b: b.self_attn.out_proj,
                    out_weight=lambda b: b.self_attn.out_proj.weight.T)
    return dict(layers=hf.model.layers, final_norm=hf.model.norm,
                attn_norm=lambda b: b.input_layernorm,
                mlp_norm=lambda b: b.post_attention_layernorm, mlp=lambda b: b.mlp,
                out_proj=lambda b: b.self_attn.o_proj,
                out_weight=lambda b: b.self_attn.o_proj.weight.T)


def sender_output(arch: str, hf, tokens: torch.Tensor, sender: str) -> torch.Tensor:
    """The sender's output in an unpatched HF run: the hidden state entering layer 0 (embed),
    a head's z times its rows of the output projection, or the MLP module's output. Gemma 2's
    heads then pass through the post-attention norm: times its weight (1 + w) over the RMS of
    the whole projection's output."""
    parts, got = hf_parts(arch, hf), {}
    if sender == "embed":
        module, capture = parts["layers"][0], "input"
    elif sender.startswith("mlp"):
        module, capture = parts["mlp"](parts["layers"][int(sender[3:])]), "output"
    else:
        layer, head = map(int, sender[1:].split("H"))
        module, capture = parts["out_proj"](parts["layers"][layer]), "input"

    def hook(mod, args, kwargs, output):
        got["x"] = (args[0] if args else kwargs["hidden_states"]) if capture == "input" \
            else (output[0] if isinstance(output, tuple) else output)
    handle = module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    if sender == "embed" or sender.startswith("mlp"):
        return got["x"].reshape(*tokens.shape, -1)
    block = parts["layers"][layer]
    d_head = got["x"].shape[-1] // hf.config.num_attention_heads
    rows = slice(head * d_head, (head + 1) * d_head)
    out = got["x"][..., rows] @ parts["out_weight"](block)[rows]
    if arch == "gemma2":
        norm = block.post_attention_layernorm
        with torch.no_grad():
            whole = parts["out_proj"](block)(got["x"])
        out = out * torch.rsqrt(whole.pow(2).mean(-1, keepdim=True) + norm.eps) * \
            (1 + norm.weight)
    return out


def qkv_columns(arch: str, hf, which: str, head: int) -> slice:
    """Where a head's q, k or v sits in its projection's output."""
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if arch == "gpt2":   # c_attn: [q | k | v], each [head, d_head]
        start = "qkv".index(which) * cfg.hidden_size + head * d_head
    elif arch == "pythia":   # query_key_value: [head, (q, k, v), d_head]
        start = head * 3 * d_head + "qkv".index(which) * d_head
    else:   # separate q_proj / k_proj / v_proj
        start = head * d_head
    return slice(start, start + d_head)


def projection(arch: str, block, which: str):
    if arch == "gpt2":
        return block.attn.c_attn
    if arch == "pythia":
        return block.attention.query_key_value
    return getattr(block.self_attn, f"{which}_proj")


def hooked_logits(arch: str, hf, tokens: torch.Tensor, receiver: str, delta: torch.Tensor
                  ) -> torch.Tensor:
    """Last-position logits of `tokens` with `delta` added to one receiver's input only.

    MLP and logits: the norm before them reads resid + delta. A head's q/k/v: the layer's
    input is captured, the projection is recomputed on norm(input + delta), and only that
    head's q, k or v columns are replaced."""
    parts, handles, resid = hf_parts(arch, hf), [], {}

    def add_delta(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x + delta.reshape(x.shape)   # OPT's MLP norm reads [batch * pos, d] rows
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    if receiver == "logits":
        handles.append(parts["final_norm"].register_forward_pre_hook(add_delta,
                                                                     with_kwargs=True))
    elif receiver.startswith("mlp"):
        block = parts["layers"][int(receiver[3:])]
        handles.append(parts["mlp_norm"](block).register_forward_pre_hook(add_delta,
                                                                          with_kwargs=True))
    else:
        node, which = receiver.split(":")
        layer, head = map(int, node[1:].replace("KV", "H").split("H"))
        block = parts["layers"][layer]

        def keep_input(mod, args, kwargs):
            resid["x"] = args[0] if args else kwargs["hidden_states"]

        def splice(mod, args, output):
            if resid.get("inside"):   # the recomputation below
                return output
            cols = qkv_columns(arch, hf, which, head)
            resid["inside"] = True
            patched = mod(parts["attn_norm"](block)(resid["x"] + delta))
            resid["inside"] = False
            output = output.clone()
            output[..., cols] = patched[..., cols]
            return output
        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(projection(arch, block, which).register_forward_hook(splice))
    try:
        with torch.no_grad():
            return hf(tokens).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


EDGES = {
    "gpt2": ["L0H1 -> L1H2:k", "mlp0 -> L1H0:q", "embed -> L1H1:v", "L0H2 -> mlp0",
             "mlp0 -> logits", "L1H3 -> logits", "embed -> L0H0:k"],
    "llama-gqa": ["L0H1 -> L1KV0:k", "mlp0 -> L1KV1:v", "L0H3 -> L1H2:q", "L0H0 -> mlp0",
                  "embed -> logits", "L1H1 -> mlp1"],
    "pythia": ["L0H1 -> L1H2:k", "L0H2 -> mlp1", "embed -> mlp0", "mlp0 -> L1H0:v",
               "L1H3 -> logits", "embed -> L0H3:q"],
    "gemma2": ["L0H1 -> L1KV0:k", "mlp0 -> L1KV1:v", "L0H3 -> L1H2:q", "L0H0 -> mlp0",
               "embed -> logits", "L1H1 -> mlp1", "mlp1 -> logits"],
    "opt": ["L0H1 -> L1H2:k", "mlp0 -> L1H0:q", "embed -> L1H1:v", "L0H2 -> mlp0",
            "mlp0 -> logits", "L1H3 -> logits"],
}


@pytest.mark.parametrize("arch, edge", [(a, e) for a, edges in EDGES.items() for e in edges])
def test_one_patched_edge_equals_hand_written_hooks_on_the_hf_model(models, arch, edge):
    bridge, hf = models(arch)
    ef, clean, corrupt, out_clean, out_corrupt = edge_setup(bridge)
    e = ef.graph.edge(edge)
    weights = ef.ones()
    weights[0, ef.graph.sender_index[e.sender], ef.graph.receiver_index[e.receiver]] = 0
    run = ef.run(out_clean, out_corrupt, weights)
    ours = ef.final_logits(run.final, torch.full((3,), clean.shape[1] - 1))[0]
    sender, receiver = edge.split(" -> ")
    delta = sender_output(arch, hf, corrupt, sender) - sender_output(arch, hf, clean, sender)
    theirs = hooked_logits(arch, hf, clean, receiver, delta)
    with torch.no_grad():
        unpatched = hf(clean).logits[:, -1]
    assert (theirs - unpatched).abs().max() > 10 * ATOL, "the edge must matter for the test to bite"
    # compatibility mode centers the unembedding: logits agree up to a constant per prompt
    assert_close(centered(ours), centered(theirs), atol=ATOL, rtol=0)


def centered(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(-1, keepdim=True)


# ----------------------------------------------------------------------------- nodes as edges

# Not Gemma 2: a node circuit ablates heads before the post-attention norm, which then divides
# the mixed sum by its own RMS; edges carry each head's share of a normed output (the norm's
# factor of the head's own run), so that a receiver's input stays linear in the edge weights
# (EAP's premise). The two differ there by construction; the hooks test above pins the edges'.
@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "pythia", "opt"])
@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_a_node_circuit_written_as_edges_scores_the_same(models, arch, kind):
    """Keeping every edge out of the members (and the embeddings) is the node circuit: the edge
    forward and the bridge's hooks (circuits.py) must agree on every configuration."""
    from types import SimpleNamespace

    from harness.measure.circuits import (
        ablation_values,
        all_components,
        circuit_scores,
        component_hooks,
        parse_component,
        resample_draw,
    )
    from harness.measure.edge_circuits import ablated_outputs, edge_circuit_scores

    bridge, _ = models(arch)
    ef, clean, corrupt, out_clean, _ = edge_setup(bridge)
    cfg = bridge.cfg
    batch = SimpleNamespace(tokens=clean, final_pos=torch.full((3,), clean.shape[1] - 1),
                            answer_ids=torch.tensor([10, 20, 30]),
                            foil_ids=torch.tensor([40, 50, 60]))
    ref = dict(ref_tokens=corrupt, ref_final_pos=batch.final_pos,
               draw=resample_draw(3, 3, 0) if kind == "resample" else None)
    members = ["L0H1", "L1H2", "mlp0"]
    values = ablation_values(bridge, kind, component_hooks(cfg), clean, batch.final_pos,
                             **(ref if kind != "zero" else {}))
    nodes = circuit_scores(bridge, clean, batch.final_pos, batch.answer_ids, batch.foil_ids,
                           [parse_component(m, cfg) for m in members], values,
                           all_components(cfg))
    kept = {"embed", *members}
    edges = [e for e in ef.graph.edges if e.sender.label in kept]
    ablated = ablated_outputs(ef, kind, clean, **(ref if kind != "zero" else {}))
    scores = edge_circuit_scores(ef, out_clean, ablated, batch, edges)
    assert_close(scores.model, nodes.model, atol=ATOL, rtol=0)
    assert_close(scores.circuit, nodes.circuit, atol=ATOL, rtol=0)
    assert (scores.circuit - scores.model).abs().max() > 10 * ATOL   # the test can bite


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_per_head_projections_equal_the_generic_block_ops_way(models, arch):
    """Each receiver row through its own head's q/k/v columns (fast) gives what the family's
    whole `qkv_flat` gives on that row (any BlockOps)."""
    bridge, _ = models(arch)
    ef, clean, corrupt, out_clean, out_corrupt = edge_setup(bridge)
    assert ef._split is not None, "every fast path's projection is affine(norm(x))"
    weights = torch.rand(2, len(ef.graph.senders), len(ef.graph.receivers),
                         generator=torch.Generator().manual_seed(0))
    fast = ef.run(out_clean, out_corrupt, weights).final
    ef._split = None
    assert_close(ef.run(out_clean, out_corrupt, weights).final, fast, atol=ATOL, rtol=0)


def test_the_autograd_path_equals_the_buffered_one_and_gives_eap_terms(models):
    """With weights that require grad the forward keeps one tensor per block (autograd);
    without, one buffer filled in place. Same numbers; and the weights' gradient at w = 1 is
    Σ (out_u − abl_u) · ∂metric/∂input_v, checked on one edge against a finite difference."""
    bridge, _ = models("llama-gqa")
    ef, clean, corrupt, out_clean, out_corrupt = edge_setup(bridge)
    final_pos = torch.full((3,), clean.shape[1] - 1)
    answer, foil = torch.tensor([10, 20, 30]), torch.tensor([40, 50, 60])
    with torch.no_grad():
        buffered = ef.run(out_clean, out_corrupt, ef.ones()).final
    weights = ef.ones().requires_grad_()
    run = ef.run(out_clean, out_corrupt, weights)
    assert_close(run.final, buffered, atol=ATOL, rtol=0)
    metric = ef.logit_diff(run.final, final_pos, answer, foil).sum()
    grad, = torch.autograd.grad(metric, weights)
    g = ef.graph
    e = g.edge("L0H1 -> L1KV0:k")
    s, r = g.sender_index[e.sender], g.receiver_index[e.receiver]
    eps = 1e-2
    with torch.no_grad():
        w = ef.ones()
        w[0, s, r] = 1 - eps
        lower = ef.logit_diff(ef.run(out_clean, out_corrupt, w).final, final_pos, answer,
                              foil).sum()
    assert float(grad[0, s, r]) == pytest.approx(float(metric - lower) / eps, rel=0.05,
                                                 abs=1e-4)
    assert grad[0, s].abs().sum() > 0 and float(grad[0, :, 0].abs().sum()) > 0


@pytest.mark.parametrize("arch", ["gemma2", "opt"])
def test_eap_scores_are_the_edge_weights_gradient(models, arch):
    """EAP (one backward pass through every receiver's input) equals -∂metric/∂w at w = 1
    taken by autograd through the edge weights, on the families that joined the edge graph
    last (Gemma 2's heads through the post-attention norm, OPT's ReLU MLP)."""
    from harness.measure import edge_attribution as EA

    bridge, _ = models(arch)
    ef, clean, corrupt, out_clean, out_corrupt = edge_setup(bridge)
    prompts = EA.Prompts(clean, corrupt, torch.full((3,), clean.shape[1] - 1),
                         torch.tensor([10, 20, 30]), torch.tensor([40, 50, 60]))
    scores = EA.attribution_scores(ef, prompts, "eap")
    weights = ef.ones().requires_grad_(True)
    with torch.enable_grad():
        run = ef.run(out_clean, out_corrupt, weights)
        metric = ef.logit_diff(run.final, prompts.final_pos, prompts.answer_ids,
                               prompts.foil_ids).mean(1).sum()
        (grad,) = torch.autograd.grad(metric, weights)
    assert_close(scores, -grad[0] * EA.upstream_mask(ef.graph), atol=1e-5, rtol=1e-4)
    assert scores.abs().max() > 1e-2
