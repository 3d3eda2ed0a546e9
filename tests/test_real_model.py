"""Numbers you can trust on a real model (issue 22.4): every measure kind the SmolLM2 specs use,
recomputed WITHOUT the harness's engine on SmolLM2-135M-Instruct for a few prompts, equals the
harness's value within 1e-4 (ATOL):

- patch sweeps (z over [layer, head]; resid_pre, attn_out, mlp_out over [layer, pos]):
  TransformerLens's own `patching.generic_activation_patch` on the same bridge, the setters of
  `get_act_patch_attn_head_out_all_pos` / `get_act_patch_resid_pre` / ..., on a few cells of
  one layer, against the harness's patching engine (the call a `patch_sweep` claim makes)
  restricted to that layer;
- path patching, attention, resample ablation and circuit faithfulness: plain PyTorch hooks on
  the Hugging Face model loaded on its own from the same folder;
- bfloat16 against float32 within BF16_ATOL; greedy generation equal to HF `generate`.

Elsewhere the harness side is `harness.check` on a spec written here, so the values are the
ones a spec reports. The model is the zoo's `smollm2-135m` (conftest's `smollm2`: converted once
per test run). Slow (a real model on CPU): two prompts (one for the sweeps), one session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.measure.circuits import resample_draw

ATOL = 1e-4
# logit diffs of ~3-6; measured max |bfloat16 - float32| 0.069 on these prompts (bfloat16's
# 8-bit mantissa over 30 layers), so twice that with room
BF16_ATOL = 0.15
# TransformerLens's reference patches these cells only: each is a forward through the bridge's
# hooks (~1-4 s on 2 busy cores). Layer 23 holds the top IOI heads; position 13 is the final one.
SWEEP_LAYERS = (23,)
SWEEP_HEADS = (0, 3, 4)
SWEEP_POSITIONS = (4, 13)

# Two rows of the IOI set with one template (equal lengths: no padding), ABC corrupt texts.
IOI = [
    {"text": "When Mark and Lisa went to the store, Lisa gave a drink to",
     "corrupt": "When John and Michael went to the store, Peter gave a drink to",
     "answer": " Mark", "foil": " Lisa"},
    {"text": "When Anna and Jack went to the store, Jack gave a drink to",
     "corrupt": "When Susan and Bob went to the store, Paul gave a drink to",
     "answer": " Anna", "foil": " Jack"},
]
SWEPT = IOI[:1]     # the sweeps' one prompt
ABC = [{"text": p["corrupt"], "answer": p["answer"], "foil": p["foil"]} for p in IOI]


@pytest.fixture(scope="session")
def smollm2_dir(smollm2) -> Path:
    """The SmolLM2-135M folder the zoo's `smollm2-135m` converts the packaged GGUF file into
    (conftest's `smollm2`: once per test run, shared with test_gguf_source.py)."""
    return smollm2[1]


@pytest.fixture(scope="session")
def harness_run(smollm2_dir):
    """`run(claims, prompt_sets=..., dtype=...)` -> the JSON report's claims, one session (the
    model loads once per dtype)."""
    import harness
    from harness.session import Session

    session = Session(device="cpu")

    def run(claims, prompt_sets=None, dtype="float32"):
        spec = {"models": {"lm": {"path": str(smollm2_dir), "dtype": dtype}},
                "prompts": IOI, "prompt_sets": prompt_sets or {},
                "defaults": {"prepend_bos": False}, "claims": claims}
        result = harness.check(spec, session=session)
        reported = result.report["specs"][0]["claims"]
        assert [c["status"] for c in reported] == ["passed"] * len(claims), reported
        return {c["id"]: c for c in reported}

    run.session = session
    return run


@pytest.fixture(scope="session")
def bridge(harness_run, smollm2_dir):
    """The harness's own bridge of the model (the one its claims ran on)."""
    from harness.spec import load_spec_text

    spec = load_spec_text(f"models: {{lm: {{path: '{smollm2_dir}'}}}}\nclaims: []\n",
                          "x", "x.yaml")
    return harness_run.session.model(spec, "lm").bridge


@pytest.fixture(scope="session")
def hf(smollm2_dir):
    """The plain Hugging Face model and tokenizer, loaded on their own (eager attention, so
    that attention weights come back)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def _ids(tokenizer, texts):
    return torch.tensor([tokenizer(t, add_special_tokens=False).input_ids for t in texts])


def _answers(tokenizer, prompts):
    one = [tokenizer(p["answer"], add_special_tokens=False).input_ids for p in prompts]
    two = [tokenizer(p["foil"], add_special_tokens=False).input_ids for p in prompts]
    return torch.tensor(one)[:, 0], torch.tensor(two)[:, 0]


def _logit_diff(logits, answer, foil):
    final = logits[:, -1]
    rows = torch.arange(final.shape[0])
    return final[rows, answer] - final[rows, foil]


# ----------------------------------------------------------------------------- patch sweeps

SWEEPS = {  # site -> (over, setter name, TransformerLens activation name)
    "z": (["layer", "head"], "layer_head_vector_patch_setter", "z"),
    "resid_pre": (["layer", "pos"], "layer_pos_patch_setter", "resid_pre"),
    "attn_out": (["layer", "pos"], "layer_pos_patch_setter", "attn_out"),
    "mlp_out": (["layer", "pos"], "layer_pos_patch_setter", "mlp_out"),
}


@pytest.fixture(scope="session")
def sweeps(bridge):
    """The four sweeps by the harness's patching engine (what a `patch_sweep` claim calls) on
    the harness's bridge, SWEPT's one prompt, clean -> corrupt, restricted to SWEEP_LAYERS: a
    sweep of all 30 layers is the bulk of a real-model spec's time, and the cells compared
    are those layers'. -> site -> raw grid [layer, head or pos] (patched logit diff)."""
    from harness.measure.patching import PatchingEngine, Run

    clean, corrupt = (bridge.to_tokens([p[k] for p in SWEPT], prepend_bos=False)
                      for k in ("text", "corrupt"))
    final = torch.full((len(SWEPT),), clean.shape[1] - 1)
    answer, foil = _answers(bridge.tokenizer, SWEPT)
    engine = PatchingEngine()
    return {site: engine.patch_sweep(Run("lm", bridge, clean, final),
                                     Run("lm", bridge, corrupt, final), answer, foil,
                                     site=site, over=tuple(over), layers=SWEEP_LAYERS).raw
            for site, (over, _, _) in SWEEPS.items()}


@pytest.mark.parametrize("site", list(SWEEPS))
def test_patch_sweep_equals_transformerlens(site, sweeps, bridge):
    import pandas as pd
    import transformer_lens.patching as tl

    over, setter, activation = SWEEPS[site]
    raw = sweeps[site]
    clean = bridge.to_tokens([p["text"] for p in SWEPT], prepend_bos=False)
    corrupt = bridge.to_tokens([p["corrupt"] for p in SWEPT], prepend_bos=False)
    answer, foil = _answers(bridge.tokenizer, SWEPT)
    _, cache = bridge.run_with_cache(clean)
    second = SWEEP_HEADS if site == "z" else SWEEP_POSITIONS
    index = pd.DataFrame([(layer, j) for layer in SWEEP_LAYERS for j in second],
                         columns=["layer", over[1]])
    with torch.no_grad():
        ref = tl.generic_activation_patch(
            bridge, corrupt, cache, lambda logits: _logit_diff(logits, answer, foil).mean(),
            getattr(tl, setter), activation, index_df=index)
    mine = torch.stack([raw[SWEEP_LAYERS.index(layer), j]
                        for layer, j in index.itertuples(index=False)])
    assert torch.allclose(mine, ref.float(), atol=ATOL), (mine - ref).abs().max()


# ----------------------------------------------------------------------------- HF hooks

def _o_proj(model, layer):
    return model.model.layers[layer].self_attn.o_proj


def _head_slices(model):
    return model.config.hidden_size // model.config.num_attention_heads


def _capture(model, tokens):
    """Each layer's o_proj input (the heads' z, concatenated), MLP output and q_proj output."""
    z, mlp, q, handles = {}, {}, {}, []
    for i, block in enumerate(model.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: z.__setitem__(i, args[0].detach().clone())))
        handles.append(block.mlp.register_forward_hook(
            lambda mod, args, out, i=i: mlp.__setitem__(i, out.detach().clone())))
        handles.append(block.self_attn.q_proj.register_forward_hook(
            lambda mod, args, out, i=i: q.__setitem__(i, out.detach().clone())))
    try:
        with torch.no_grad():
            logits = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits, z, mlp, q


def _run_with(model, tokens, z_fill=None, mlp_fill=None, q_fill=None):
    """Forward with layer i's o_proj input / MLP output / q_proj output replaced by
    `fill[i](current)`."""
    handles = []
    for i, block in enumerate(model.model.layers):
        if z_fill and i in z_fill:
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, args, i=i: (z_fill[i](args[0]),)))
        if mlp_fill and i in mlp_fill:
            handles.append(block.mlp.register_forward_hook(
                lambda mod, args, out, i=i: mlp_fill[i](out)))
        if q_fill and i in q_fill:
            handles.append(block.self_attn.q_proj.register_forward_hook(
                lambda mod, args, out, i=i: q_fill[i](out)))
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        for h in handles:
            h.remove()


def _with_head(base, other, head, d_head):
    out = base.clone()
    out[..., head * d_head:(head + 1) * d_head] = other[..., head * d_head:(head + 1) * d_head]
    return out


def _hf_path_patch(model, clean, corrupt, sender, path, receiver=None):
    """The IOI paper's path patching with hooks: step 1 runs the corrupt input with every
    head and MLP frozen at their corrupt values except the sender head, which takes its clean
    value; `resid` reads step 1's logits, `q` records the receiver's query there and runs the
    corrupt input with only that query replaced."""
    d_head = _head_slices(model)
    _, z_clean, _, _ = _capture(model, clean)
    _, z_corrupt, mlp_corrupt, _ = _capture(model, corrupt)
    layer, head = sender
    z_fill = {i: (lambda cur, i=i: _with_head(z_corrupt[i], z_clean[i], head, d_head)
                  if i == layer else z_corrupt[i]) for i in z_corrupt}
    mlp_fill = {i: (lambda cur, i=i: mlp_corrupt[i]) for i in mlp_corrupt}
    if path == "resid":
        return _run_with(model, corrupt, z_fill, mlp_fill)
    recorded = {}
    r_layer, r_head = receiver
    handle = model.model.layers[r_layer].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: recorded.__setitem__("q", out.detach().clone()))
    try:
        _run_with(model, corrupt, z_fill, mlp_fill)
    finally:
        handle.remove()
    return _run_with(model, corrupt, q_fill={
        r_layer: lambda cur: _with_head(cur, recorded["q"], r_head, d_head)})


@pytest.mark.parametrize("sender,path,receivers", [
    ("L23H3", "resid", None), ("L20H0", "q", ["L23H3"]), ("L17H4", "q", ["L23H0"])])
def test_path_patch_equals_hf_hooks(sender, path, receivers, harness_run, hf):
    model, tokenizer = hf
    claim = {"id": "pp", "measure": "path_patch", "from": {"model": "lm", "input": "clean"},
             "into": {"model": "lm", "input": "corrupt"}, "senders": [sender], "path": path,
             "expect": {">": -1000}}
    if receivers:
        claim["receivers"] = receivers
    got = torch.tensor(harness_run([claim])["pp"]["per_prompt_raw"])
    clean, corrupt = (_ids(tokenizer, [p[k] for p in IOI]) for k in ("text", "corrupt"))
    answer, foil = _answers(tokenizer, IOI)
    parse = lambda label: tuple(int(x) for x in label[1:].split("H"))  # noqa: E731
    logits = _hf_path_patch(model, clean, corrupt, parse(sender), path,
                            parse(receivers[0]) if receivers else None)
    ref = _logit_diff(logits, answer, foil)
    assert torch.allclose(got, ref, atol=ATOL), (got, ref)


MARY = [{"text": "When Mary and John went to the store, John gave a drink to",
         "answer": " Mary", "foil": " John"},
        {"text": "When John and Mary went to the park, John gave a ball to",
         "answer": " Mary", "foil": " John"}]


def test_attention_equals_hf_attention_weights(harness_run, hf):
    model, tokenizer = hf
    got = harness_run([{"id": "att", "measure": "attention", "model": "lm", "prompts": "mary",
                        "source": {"token": " Mary"}, "heads": ["L23H0"],
                        "expect": {">": -1}}],
                      prompt_sets={"mary": MARY})["att"]["per_prompt"]
    mary = tokenizer(" Mary", add_special_tokens=False).input_ids[0]
    ref = []
    for p in MARY:
        ids = _ids(tokenizer, [p["text"]])
        with torch.no_grad():
            pattern = model(ids, output_attentions=True).attentions[23][0, 0]   # [dest, src]
        is_mary = ids[0] == mary
        first = int(is_mary.nonzero()[0])
        ref.append(pattern[first:, is_mary].sum(-1).mean())   # destinations from Mary on
    assert torch.allclose(torch.tensor(got), torch.stack(ref), atol=ATOL)


def test_resample_ablation_equals_hf_hooks(harness_run, hf):
    model, tokenizer = hf
    heads = ["L23H3", "L23H0"]
    got = harness_run([{"id": "abl", "measure": "ablate", "model": "lm", "site": "z",
                        "heads": heads, "kind": "resample", "reference": {"prompts": "abc"},
                        "seed": 3, "expect": {">": -1000}}],
                      prompt_sets={"abc": ABC})["abl"]["per_prompt_raw"]
    clean = _ids(tokenizer, [p["text"] for p in IOI])
    reference = _ids(tokenizer, [p["text"] for p in ABC])
    answer, foil = _answers(tokenizer, IOI)
    draw = resample_draw(len(IOI), len(ABC), 3)   # the seeded choice of reference prompts
    _, z_ref, _, _ = _capture(model, reference[draw])
    d_head = _head_slices(model)

    def fill(cur):
        out = cur
        for h in (0, 3):
            out = _with_head(out, z_ref[23], h, d_head)
        return out

    ref = _logit_diff(_run_with(model, clean, z_fill={23: fill}), answer, foil)
    assert torch.allclose(torch.tensor(got), ref, atol=ATOL), (got, ref)


def test_circuit_faithfulness_equals_hf_hooks(harness_run, hf):
    model, tokenizer = hf
    members = ["L23H3", "L23H0", "L29H1"] + [f"mlp{i}" for i in range(30)]
    got = harness_run([{"id": "circ", "measure": "circuit", "model": "lm", "members": members,
                        "kind": "mean", "reference": "abc", "expect": {">": -1000}}],
                      prompt_sets={"abc": ABC})["circ"]["per_prompt"]
    clean = _ids(tokenizer, [p["text"] for p in IOI])
    answer, foil = _answers(tokenizer, IOI)
    _, z_ref, mlp_ref, _ = _capture(model, _ids(tokenizer, [p["text"] for p in ABC]))
    z_mean = {i: z.mean((0, 1)) for i, z in z_ref.items()}      # equal lengths: no padding
    mlp_mean = {i: m.mean((0, 1)) for i, m in mlp_ref.items()}
    d_head = _head_slices(model)
    kept = {(23, 3), (23, 0), (29, 1)}

    def heads_fill(keep):
        def make(i):
            def fill(cur):
                out = z_mean[i].expand_as(cur).clone()
                for layer, h in keep:
                    if layer == i:
                        out = _with_head(out, cur, h, d_head)
                return out
            return fill
        return {i: make(i) for i in z_mean}

    all_mlps = {i: (lambda cur, i=i: mlp_mean[i].expand_as(cur)) for i in mlp_mean}
    f_model = _logit_diff(_run_with(model, clean), answer, foil)
    f_ablated = _logit_diff(_run_with(model, clean, heads_fill(set()), all_mlps), answer, foil)
    f_circuit = _logit_diff(_run_with(model, clean, heads_fill(kept)), answer, foil)
    ref = (f_circuit - f_ablated) / (f_model - f_ablated)
    assert torch.allclose(torch.tensor(got), ref, atol=ATOL), (got, ref)


# ----------------------------------------------------------------------------- dtype, generation

def test_bfloat16_close_to_float32(harness_run):
    claim = [{"id": "ld", "measure": "logit_diff", "model": "lm", "expect": {">": -1000}}]
    f32 = torch.tensor(harness_run(claim)["ld"]["per_prompt"])
    bf16 = torch.tensor(harness_run(claim, dtype="bfloat16")["ld"]["per_prompt"])
    assert (f32 > 1).all()                      # the behaviour is there to compare
    print(f"\nbfloat16 - float32 logit diffs: max |difference| {(bf16 - f32).abs().max():.4f}")
    assert torch.allclose(bf16, f32, atol=BF16_ATOL), (bf16, f32)


def test_greedy_generation_equals_hf_generate(harness_run, hf):
    model, tokenizer = hf
    got = harness_run([{"id": "gen", "measure": "generate", "model": "lm",
                        "max_new_tokens": 5, "expect": {"contains": "to"}}])["gen"]["measured"]
    ref = []
    for p in IOI:
        ids = _ids(tokenizer, [p["text"]])
        out = model.generate(ids, max_new_tokens=5, do_sample=False,
                             attention_mask=torch.ones_like(ids),
                             pad_token_id=tokenizer.pad_token_id)
        ref.append(tokenizer.decode(out[0]))
    assert got == ref
