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
- the logit lens and DLA (by component, by head): HF's own final RMSNorm and lm_head on the
  residual pieces HF hooks read (embeddings, o_proj inputs and outputs, MLP outputs);
- head scores: TransformerLens's own detection patterns and similarity score on HF's attention
  weights, on the same seeded repeated random tokens drawn here; loss: HF's cross-entropy;
- bfloat16 against float32 within BF16_ATOL; greedy generation equal to HF `generate`.

Elsewhere the harness side is a claim end to end: either a shipped spec's own claim
(`harness_run.shipped`: lens, head scores, loss, a patch, as `harness run -k` evaluates them),
or `harness.check` on a spec written here, so the values are the ones a spec reports. The
model is the zoo's `smollm2-135m` (conftest's `smollm2`: converted once per test run), loaded
once for both. Slow (a real model on CPU): two or three prompts (one for the sweeps).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import pytest
import torch

from harness.measure.circuits import resample_draw

ATOL = 1e-4
SPECS = Path(__file__).resolve().parents[1] / "specs"
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


@contextlib.contextmanager
def _zoo_cache(smollm2):
    """`$INTERP_HARNESS_CACHE` pointed at the test run's conversion (conftest's `smollm2`)
    while a call resolves `zoo: smollm2-135m`, restored after."""
    before = os.environ.get("INTERP_HARNESS_CACHE")
    os.environ["INTERP_HARNESS_CACHE"] = str(smollm2[0])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("INTERP_HARNESS_CACHE")
        else:
            os.environ["INTERP_HARNESS_CACHE"] = before


# the model as the shipped specs name it (float32); a run's other dtypes load the folder
ZOO_MODEL = {"zoo": "smollm2-135m"}


@pytest.fixture(scope="session")
def harness_run(smollm2, smollm2_dir):
    """`run(claims, prompt_sets=..., dtype=...)` -> the JSON report's claims, one session (the
    model loads once per dtype, and float32 is the shipped specs' `zoo: smollm2-135m`, so
    `run.shipped` shares it)."""
    import harness
    from harness.session import Session

    session = Session(device="cpu")

    def run(claims, prompt_sets=None, dtype="float32", extra_models=None):
        model = ZOO_MODEL if dtype == "float32" else {"path": str(smollm2_dir), "dtype": dtype}
        spec = {"models": {"lm": model, **(extra_models or {})},
                "prompts": IOI, "prompt_sets": prompt_sets or {},
                "defaults": {"prepend_bos": False}, "claims": claims}
        with _zoo_cache(smollm2):
            result = harness.check(spec, session=session)
        reported = result.report["specs"][0]["claims"]
        assert [c["status"] for c in reported] == ["passed"] * len(claims), reported
        return {c["id"]: c for c in reported}

    def shipped(spec_file, ids):
        """The claims `ids` of a shipped spec, end to end as `harness run -k` evaluates them
        (read, static and token checks, measure, judge, JSON report): id -> reported claim."""
        from harness import report
        from harness.runner import SpecResult, load_and_check, run_spec

        with _zoo_cache(smollm2):
            spec = load_and_check(SPECS / spec_file, session)
            result = run_spec(spec, session, select=lambda file, name, claim, measure="":
                              claim in ids)
        assert [v.claim_id for v in result.verdicts] == list(ids)
        data = json.loads(json.dumps(report.json_report([SpecResult(spec.file, spec, None,
                                                                    result.verdicts)],
                                                        session=session),
                                     default=report._default))
        return {c["id"]: c for c in data["specs"][0]["claims"]}

    run.session = session
    run.shipped = shipped
    return run


@pytest.fixture(scope="session")
def bridge(harness_run, smollm2):
    """The harness's own bridge of the model (the one its float32 claims ran on)."""
    from harness.spec import load_spec_text

    spec = load_spec_text("models: {lm: {zoo: smollm2-135m}}\nclaims: []\n", "x", "x.yaml")
    with _zoo_cache(smollm2):
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


# ----------------------------------------------------------------------------- readouts

FACTS = [{"text": "The Eiffel Tower is located in the city of", "answer": " Paris",
          "foil": " Rome"},
         {"text": "The Colosseum is located in the city of", "answer": " Rome",
          "foil": " Paris"}]


def _residuals(model, tokens):
    """HF hooks: resid_pre of every layer (the decoder layers' inputs), each layer's
    attention output (o_proj's output), its MLP output, the heads' z (o_proj's input) and the
    final residual (the final norm's input) -> dict of [batch, pos, ...] tensors."""
    seen = {"resid_pre": {}, "attn_out": {}, "mlp_out": {}, "z": {}}

    def into(kind, i):           # a pre-hook keeps the input, a forward hook the output
        def keep(mod, args, out=None):
            seen[kind][i] = (args[0] if out is None else out).detach().clone()
        return keep

    handles = [model.model.norm.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("final", args[0].detach().clone()))]
    for i, block in enumerate(model.model.layers):
        handles += [block.register_forward_pre_hook(into("resid_pre", i)),
                    block.self_attn.o_proj.register_forward_pre_hook(into("z", i)),
                    block.self_attn.o_proj.register_forward_hook(into("attn_out", i)),
                    block.mlp.register_forward_hook(into("mlp_out", i))]
    try:
        with torch.no_grad():
            seen["logits"] = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return seen


def _hf_readout(model, tokenizer, prompts):
    """Per prompt (one at a time: no padding): the final position's residual pieces, the
    final norm's scale there and the unembedding direction answer - foil."""
    norm, w_u = model.model.norm, model.lm_head.weight
    answer, foil = _answers(tokenizer, prompts)
    out = []
    for p, a, f in zip(prompts, answer, foil):
        seen = _residuals(model, _ids(tokenizer, [p["text"]]))
        at = {k: ({i: t[0, -1] for i, t in v.items()} if isinstance(v, dict) else v[0, -1])
              for k, v in seen.items()}
        scale = at["final"].pow(2).mean().add(norm.variance_epsilon).sqrt()   # RMSNorm
        out.append((at, scale, norm.weight * (w_u[a] - w_u[f]), a, f))
    return out


def test_logit_lens_claim_equals_hf_final_norm_and_unembedding(harness_run, hf):
    """The facts spec's lens claim, run as shipped (3 prompts): every layer's residual at the
    final position through HF's own final RMSNorm and lm_head, answer - foil."""
    model, tokenizer = hf
    got = harness_run.shipped("smollm2_facts.yaml", ["answer-appears-late"])
    got = got["answer-appears-late"]
    assert got["status"] == "passed", got
    grid = got["measured"]
    prompts = [{"text": p.text, "answer": p.answer, "foil": p.foil} for p in
               _shipped_spec("smollm2_facts.yaml").prompt_set(None)]
    n = model.config.num_hidden_layers
    assert grid["labels"] == [[f"resid_pre{i}" for i in range(n)] + ["final"]]
    rows = []
    for at, _, _, a, f in _hf_readout(model, tokenizer, prompts):
        stack = [at["resid_pre"][i] for i in range(n)] + [at["final"]]
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(torch.stack(stack)))
        rows.append(logits[:, a] - logits[:, f])
        assert torch.allclose(logits[-1], at["logits"], atol=ATOL)   # the lens ends at the model
    ref = torch.stack(rows).mean(0)
    mine = torch.tensor(grid["values"])
    assert ref.max() - ref.min() > 3          # a lens that moves: not a constant to agree on
    assert torch.allclose(mine, ref, atol=ATOL), (mine - ref).abs().max()


def _hf_dla(model, tokenizer, prompts, by: str):
    """DLA by component (embed, attn0, mlp0, ..., bias) or by head (L0H0, ..., rest) from HF
    hooks, mean over prompts: each piece of the final residual (embeddings, o_proj and MLP
    outputs, per-head o_proj columns) times the final norm's weight and the unembedding
    difference, divided by the norm's scale on that prompt (their sum: the logit diff)."""
    n, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    d_head = _head_slices(model)
    w_o = [_o_proj(model, i).weight for i in range(n)]                 # [d_model, H * d_head]
    rows = []
    for at, scale, direction, a, f in _hf_readout(model, tokenizer, prompts):
        if by == "component":
            pieces = [at["resid_pre"][0]] + [x for i in range(n)
                                             for x in (at["attn_out"][i], at["mlp_out"][i])]
        else:
            pieces = [at["z"][i][h * d_head:(h + 1) * d_head] @ w_o[i][:, h * d_head:
                                                                       (h + 1) * d_head].T
                      for i in range(n) for h in range(heads)]
            pieces.append(at["final"] - torch.stack(pieces).sum(0))
        with torch.no_grad():
            dla = torch.stack(pieces) @ direction / scale
        if by == "component":
            dla = torch.cat([dla, torch.zeros(1)])     # bias: lm_head and RMSNorm have none
        final = at["logits"]
        assert torch.allclose(dla.sum(), final[a] - final[f], atol=ATOL)
        rows.append(dla)
    labels = (["embed"] + [f"{part}{i}" for i in range(n) for part in ("attn", "mlp")] + ["bias"]
              if by == "component" else
              [f"L{i}H{h}" for i in range(n) for h in range(heads)] + ["rest"])
    return torch.stack(rows).mean(0), labels


@pytest.mark.parametrize("by", ["component", "head"])
def test_dla_claim_equals_hf_pieces_over_the_final_norm_scale(by, harness_run, hf):
    model, tokenizer = hf
    got = harness_run([{"id": "dla", "measure": "dla", "model": "lm", "prompts": "facts",
                        "by": by, "expect": {"max": {">": -1000}}}],
                      prompt_sets={"facts": FACTS})["dla"]["measured"]
    ref, labels = _hf_dla(model, tokenizer, FACTS, by)
    assert got["labels"] == [labels]
    mine = torch.tensor(got["values"])
    assert ref.abs().max() > 1 and (ref.abs() > 0.1).sum() > 5   # several pieces matter
    assert torch.allclose(mine, ref, atol=ATOL), (mine - ref).abs().max()


@pytest.fixture(scope="session")
def edited_model(smollm2_dir, tmp_path_factory):
    """SmolLM2 with its last two blocks changed as the RLHF recipe changes them (only blocks
    28 and 29 unfrozen): block 29's MLP output scaled by 1.5, block 28's attention output by
    0.5. Saved as a folder of its own, loaded on its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[29].mlp.down_proj.weight.mul_(1.5)
        _o_proj(model, 28).weight.mul_(0.5)
    out = tmp_path_factory.mktemp("smollm2-edited")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    return out, edited


@pytest.mark.parametrize("by", ["component", "head"])
def test_two_model_dla_equals_the_difference_of_hf_pieces(by, harness_run, hf, edited_model):
    """`dla` with `models: [a, b]` (the seed's tuned-minus-base DLA) is b's DLA minus a's, each
    over its own final-norm scale: here the base model and a copy with blocks 28-29 edited.
    The change sits in the edited blocks; the frozen blocks' pieces move only through the
    final norm's scale."""
    model, tokenizer = hf
    folder, edited = edited_model
    got = harness_run([{"id": "dla", "measure": "dla", "models": ["lm", "edited"],
                        "prompts": "facts", "by": by, "expect": {"max": {">": -1000}}}],
                      prompt_sets={"facts": FACTS},
                      extra_models={"edited": {"path": str(folder)}})["dla"]["measured"]
    base, labels = _hf_dla(model, tokenizer, FACTS, by)
    after, _ = _hf_dla(edited, tokenizer, FACTS, by)
    ref = after - base
    assert got["labels"] == [labels]
    mine = torch.tensor(got["values"])
    top = labels[int(ref.abs().argmax())]
    assert top in (("mlp29", "attn28") if by == "component" else ("rest",) +
                   tuple(f"L28H{h}" for h in range(9))), (top, ref)
    assert ref.abs().max() > 0.2          # the edit moves the logit diff
    assert torch.allclose(mine, ref, atol=ATOL), (mine - ref).abs().max()


# ----------------------------------------------------------------------------- head scores, loss

@functools.cache
def _shipped_spec(spec_file):
    """A shipped spec as the harness reads it (prompts resolved): its prompts and claims."""
    from harness.spec import load_spec

    return load_spec(SPECS / spec_file)


def test_head_score_claims_equal_transformerlens_detector_on_hf_attention(harness_run, hf):
    """The induction spec's two head-score claims, run as shipped: the same seeded repeated
    random tokens drawn here, HF's attention weights, and TransformerLens's own detection
    patterns and `compute_head_attention_similarity_score` (error measure "mul"), averaged
    over the sequences, for all 270 heads."""
    import transformer_lens.head_detector as tl

    model, tokenizer = hf
    ids = ["induction-heads", "previous-token-heads"]
    got = harness_run.shipped("smollm2_induction.yaml", ids)
    claims = {c.id: c for c in _shipped_spec("smollm2_induction.yaml").claims}
    draw = claims["induction-heads"].random_tokens
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(min(len(tokenizer), model.config.vocab_size))
                          if i not in special])
    seq = vocab[torch.randint(len(vocab), (draw.count, draw.length),
                              generator=torch.Generator().manual_seed(draw.seed))]
    tokens = torch.cat([seq, seq], 1)                         # no BOS: the spec's default
    with torch.no_grad():
        attentions = model(tokens, output_attentions=True).attentions   # layer: [b, h, q, k]
    detectors = {"induction-heads": tl.get_induction_head_detection_pattern,
                 "previous-token-heads": tl.get_previous_token_head_detection_pattern}
    for claim_id in ids:
        assert got[claim_id]["status"] == "passed", got[claim_id]
        ref = torch.tensor([[[tl.compute_head_attention_similarity_score(
            pattern[b, h], detectors[claim_id](tokens[b:b + 1]), exclude_bos=False,
            exclude_current_token=False, error_measure="mul") for b in range(len(tokens))]
            for h in range(pattern.shape[1])] for pattern in attentions]).mean(-1)
        mine = torch.tensor(got[claim_id]["measured"]["values"])
        assert mine.shape == ref.shape == (30, 9)
        assert ref.max() > 0.3 and ref.median() < 0.2           # a few heads stand out
        assert torch.allclose(mine, ref, atol=ATOL), (claim_id, (mine - ref).abs().max())


def test_loss_claims_equal_hf_cross_entropy(harness_run, hf):
    """The induction spec's loss claims, run as shipped: HF's logits, cross-entropy of each
    next token on the first 12 tokens (tokens 1-11 scored: the first has no prediction) and
    on the repeat (the last 12 of 24), per prompt."""
    model, tokenizer = hf
    got = harness_run.shipped("smollm2_induction.yaml", ["first-half-loss", "repeat-loss"])
    texts = [p.text for p in _shipped_spec("smollm2_induction.yaml").prompt_set("repeated")]
    spans = {"first-half-loss": lambda n: range(1, 12), "repeat-loss": lambda n: range(n // 2, n)}
    for claim_id, span in spans.items():
        ref = []
        for text in texts:
            ids = _ids(tokenizer, [text])[0]
            with torch.no_grad():
                logits = model(ids[None]).logits[0]
            scored = torch.tensor(list(span(len(ids))))
            ref.append(torch.nn.functional.cross_entropy(logits[scored - 1], ids[scored]))
        ref = torch.stack(ref)
        mine = torch.tensor(got[claim_id]["per_prompt"])
        assert got[claim_id]["status"] == "passed", got[claim_id]
        assert torch.allclose(mine, ref, atol=ATOL), (claim_id, mine, ref)
    first = torch.tensor(got["first-half-loss"]["per_prompt"])
    repeat = torch.tensor(got["repeat-loss"]["per_prompt"])
    assert (first - repeat).mean() > 2       # the two spans differ: the repeat is easier


# ----------------------------------------------------------------------------- a shipped patch

def test_shipped_patch_claim_equals_hf_hooks(harness_run, hf):
    """The facts spec's `subject-restores-the-fact-mid-layers`, run as shipped: the corrupt
    prompt with layer 12's input (resid_pre12) at the subject's tokens 1-3 taken from the
    clean run (HF hooks); its number is the normalized effect (mean patched - mean corrupt) /
    (mean clean - mean corrupt) of the logit diffs."""
    model, tokenizer = hf
    got = harness_run.shipped("smollm2_facts.yaml", ["subject-restores-the-fact-mid-layers"])
    got = got["subject-restores-the-fact-mid-layers"]
    assert got["status"] == "passed", got
    prompts = _shipped_spec("smollm2_facts.yaml").prompt_set(None)
    clean = _ids(tokenizer, [p.text for p in prompts])
    corrupt = _ids(tokenizer, [p.corrupt for p in prompts])
    answer, foil = _answers(tokenizer, [{"answer": p.answer, "foil": p.foil} for p in prompts])
    seen = _residuals(model, clean)
    layer, positions = 12, [1, 2, 3]

    def restore(mod, args):
        resid = args[0].clone()
        resid[:, positions] = seen["resid_pre"][layer][:, positions]
        return (resid, *args[1:])

    handle = model.model.layers[layer].register_forward_pre_hook(restore)
    try:
        with torch.no_grad():
            patched = _logit_diff(model(corrupt).logits, answer, foil)
    finally:
        handle.remove()
    clean_ld = _logit_diff(seen["logits"], answer, foil)
    corrupt_ld = _logit_diff(_run_with(model, corrupt), answer, foil)
    ref = (patched.mean() - corrupt_ld.mean()) / (clean_ld.mean() - corrupt_ld.mean())
    assert (clean_ld - corrupt_ld).min() > 1      # the corruption changes the answer
    assert torch.allclose(torch.tensor(got["per_prompt_raw"]), patched, atol=ATOL)
    assert abs(got["measured"] - ref) < ATOL, (got["measured"], ref)
