"""Cached, batched generation (HF `generate` with a KV cache) against the token-by-token
reference loop: greedy, sampled, and while patching from another model."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from harness.measure.generation import generate_texts, generate_uncached, patch_hooks
from harness.measure.hf_sites import site_map
from harness.models import load_hf_causal_lm, load_model
from harness.sites import SITE_TABLE
from harness.spec import ModelSource
from harness.testing import TINY_ARCHITECTURES, build_tiny_checkpoint

TEXTS = ["This movie was", "The acting was", "I thought the plot was", "This film was"]


@pytest.fixture(scope="module")
def models():
    """The toy world's source and RLHF models: trained, so greedy decoding has no near-ties
    (random tiny models do, and float noise then picks either token)."""
    from harness.zoo import zoo_checkpoint

    a, b = (load_model(name, ModelSource(zoo=name), str(zoo_checkpoint(name)), "cpu")
            for name in ("toy-reviews-source", "toy-reviews-rlhf"))
    return a, b


def _prompts(model):
    return [model.bridge.to_tokens(t, prepend_bos=True)[0] for t in TEXTS]


def test_cached_greedy_equals_the_token_loop(models):
    a, _ = models
    prompts = _prompts(a)
    cached = generate_texts(a, prompts, [0] * len(prompts), 12)
    loop = [generate_uncached(a, p, 12) for p in prompts]
    assert cached == loop
    assert len(set(cached)) > 1


def test_cached_sampling_equals_the_token_loop_seed_for_seed(models):
    a, _ = models
    prompts = [p for p in _prompts(a) for _ in range(3)]
    seeds = list(range(7, 7 + len(prompts)))
    cached = generate_texts(a, prompts, seeds, 10, temperature=1.0)
    loop = [generate_uncached(a, p, 10, 1.0, s)
            for p, s in zip(prompts, seeds)]
    assert cached == loop
    assert len(set(cached[:3])) > 1                       # seeds differ per sample
    # a sample depends on its seed only, not on the rows batched with it
    alone = generate_texts(a, prompts[4:5], seeds[4:5], 10, 1.0)
    assert alone == cached[4:5]
    tiny_chunks = generate_texts(a, prompts, seeds, 10, 1.0,
                                 memory_budget_mb=1e-6)   # one row per generate call
    assert tiny_chunks == cached


PATCHES = {
    "attn_out": dict(site="attn_out", layers=[2, 3]),
    "z-heads": dict(site="z", heads=[(2, h) for h in range(4)] + [(3, 0), (3, 3)]),
    "resid_pre-final-prompt-pos": dict(site="resid_pre", layers=[3], positions=[-1]),
    "resid_post-all": dict(site="resid_post", layers=[2]),
    "mlp_post-neurons": dict(site="mlp_post", layers=[2], neurons=list(range(0, 256, 2))),
    "resid_mid": dict(site="resid_mid", layers=[2]),
    "mlp_post-neurons-prompt-pos": dict(site="mlp_post", layers=[2, 3],
                                        neurons=list(range(0, 256, 2)), positions=[-2, -1]),
}


def test_pattern_uses_the_token_loop(models, monkeypatch):
    from harness.measure import generation

    a, b = models
    assert site_map(a, "pattern") is None
    calls = []
    monkeypatch.setattr(generation, "generate_uncached",
                        lambda *args, **kw: calls.append(args) or "x")
    patch = patch_hooks(b, "pattern", heads=[(2, 0)])
    assert generate_texts(a, _prompts(a)[:2], [0, 1], 4, patch=patch) == ["x", "x"]
    assert len(calls) == 2


@pytest.mark.parametrize("name", list(PATCHES))
def test_cached_generation_while_patching_equals_the_token_loop(models, name):
    a, b = models
    patch = patch_hooks(b, **PATCHES[name])
    prompts = _prompts(a)
    cached = generate_texts(a, prompts, [0] * len(prompts), 10,
                            patch=patch)
    loop = [generate_uncached(a, p, 10, patch=patch) for p in prompts]
    assert cached == loop
    sampled = generate_texts(a, prompts, [3, 4, 5, 6], 8, 1.0, patch)
    assert sampled == [generate_uncached(a, p, 8, 1.0, s, patch)
                       for p, s in zip(prompts, [3, 4, 5, 6])]
    plain = generate_texts(a, prompts, [0] * len(prompts), 10)
    plain_sampled = generate_texts(a, prompts, [3, 4, 5, 6], 8, 1.0)
    assert (cached, sampled) != (plain, plain_sampled)     # the patch does something


def test_patching_a_model_with_itself_changes_nothing(models):
    a, _ = models
    prompts = _prompts(a)
    patch = patch_hooks(a, "z", heads=[(0, 0), (1, 1)])
    assert generate_texts(a, prompts, [0] * 4, 8, patch=patch) == \
        generate_texts(a, prompts, [0] * 4, 8)


CLEAN = ["This movie was", "The acting was", "I thought the plot was", "This movie was really"]
CORRUPT = ["This film was", "The plot was", "I thought the film was", "This film was really"]
TRACES = {  # causal tracing: the clean prompt's activations into the corrupt prompt, one model
    "resid_post-all": dict(site="resid_post", layers=[1]),
    "z-heads": dict(site="z", heads=[(0, h) for h in range(4)] + [(1, 0), (1, 3)]),
    "resid_pre-final-prompt-pos": dict(site="resid_pre", layers=[3], positions=[-1]),
    "mlp_out": dict(site="mlp_out", layers=[0, 2]),
}


@pytest.mark.parametrize("name", list(TRACES))
def test_causal_tracing_in_generation_equals_the_token_loop(models, name, monkeypatch):
    """`patch: {from: {model: a, input: clean}}` on `input: corrupt`: the cached path (one run
    of the clean prompt, prompt positions patched, generated ones not) gives the token loop's
    texts token for token, greedy and sampled."""
    from harness.measure import generation

    a, _ = models
    clean, corrupt = ([a.bridge.to_tokens(t, prepend_bos=True)[0] for t in texts]
                      for texts in (CLEAN, CORRUPT))
    assert [len(t) for t in clean] == [len(t) for t in corrupt]
    patch = patch_hooks(a, **TRACES[name], from_prompts=clean)
    loop = [generate_uncached(a, p, 10, patch=patch.rows([i])) for i, p in enumerate(corrupt)]
    sampled_loop = [generate_uncached(a, p, 8, 1.0, s, patch.rows([i]))
                    for i, (p, s) in enumerate(zip(corrupt, [3, 4, 5, 6]))]
    monkeypatch.setattr(generation, "generate_uncached", _refuse)   # cached path or failure
    assert generate_texts(a, corrupt, [0] * 4, 10, patch=patch) == loop
    assert generate_texts(a, corrupt, [3, 4, 5, 6], 8, 1.0, patch) == sampled_loop
    plain = (generate_texts(a, corrupt, [0] * 4, 10),
             generate_texts(a, corrupt, [3, 4, 5, 6], 8, 1.0))
    assert (loop, sampled_loop) != plain                      # the patch does something


def test_causal_tracing_restores_the_next_token_and_leaves_generated_positions(models):
    """Ground truth: the clean residual after the last block at every prompt position gives
    the clean prompt's next token; generated positions are not patched, so what follows it is
    the corrupt prompt's model reading that token (the rule docs/spec-format.md states)."""
    a, _ = models
    clean, corrupt = ([a.bridge.to_tokens(t, prepend_bos=True)[0] for t in texts]
                      for texts in (CLEAN, CORRUPT))
    last = a.bridge.cfg.n_layers - 1
    restored = generate_texts(a, corrupt, [0] * 4, 6, patch=patch_hooks(
        a, "resid_post", layers=[last], from_prompts=clean))
    first = [generate_uncached(a, p, 1) for p in clean]       # clean prompt + its next token
    corrupt_first = [generate_uncached(a, p, 1) for p in corrupt]
    for text, c, cc, bad in zip(restored, first, CLEAN, CORRUPT):
        assert text.startswith(bad + c[len(cc):])
    assert [c[len(cc):] for c, cc in zip(first, CLEAN)] != \
        [c[len(bad):] for c, bad in zip(corrupt_first, CORRUPT)]   # the prompts disagree
    # the later tokens: the corrupt prompt followed by the restored token, unpatched
    for text, c, cc, p in zip(restored, first, CLEAN, corrupt):
        token = a.bridge.to_tokens(c[len(cc):], prepend_bos=False)[0]
        assert text == generate_uncached(a, torch.cat([p, token]), 5)


TRACING_SPEC = """\
spec: tracing
models:
  a: {{zoo: toy-reviews-source}}
prompts:
{prompts}
prompt_sets:
  plain:
    - {{text: "This movie was", answer: " bad", foil: " good"}}
claims:
  - id: restored
    measure: generate
    model: a
    input: corrupt
    max_new_tokens: 6
    patch: {{from: {{model: a, input: clean}}, site: resid_post, layers: [3]}}
    expect: {{equals: {restored}}}
  - id: restored-is-the-corrupt-text
    measure: generate
    model: a
    input: corrupt
    max_new_tokens: 6
    patch: {{from: {{model: a, input: clean}}, site: resid_post, layers: [3]}}
    expect: {{equals: {unpatched}}}
{extra}"""


def _tracing_spec(tmp_path, models, extra: str = "") -> object:
    """One clean/corrupt pair whose next tokens differ; the expected texts from the token loop."""
    a, _ = models
    pair = next((c, b) for c, b in zip(CLEAN, CORRUPT)
                if generate_uncached(a, a.bridge.to_tokens(c, prepend_bos=True)[0], 1)[len(c):]
                != generate_uncached(a, a.bridge.to_tokens(b, prepend_bos=True)[0], 1)[len(b):])
    clean, corrupt = (a.bridge.to_tokens(t, prepend_bos=True)[0] for t in pair)
    restored = generate_uncached(a, corrupt, 6, patch=patch_hooks(
        a, "resid_post", layers=[3], from_prompts=[clean]))
    unpatched = generate_uncached(a, corrupt, 6)
    assert restored != unpatched
    path = tmp_path / "tracing.yaml"
    path.write_text(TRACING_SPEC.format(
        prompts=f"  - {{text: {json.dumps(pair[0])}, corrupt: {json.dumps(pair[1])}, "
                "answer: ' bad', foil: ' good'}",
        restored=json.dumps(restored), unpatched=json.dumps(unpatched), extra=extra))
    return path


def test_causal_tracing_claim_in_a_spec(tmp_path, models):
    """Through a spec: the clean run's last residual into the corrupt prompt gives the token
    loop's text; the claim that it changes nothing fails."""
    from harness.runner import run_spec_file
    from harness.session import Session

    result = run_spec_file(_tracing_spec(tmp_path, models), Session(verbose=False))
    assert result.error is None, result.error
    status = {v.claim_id: (v.status, v.message) for v in result.verdicts}
    assert status["restored"][0] == "passed", status
    assert status["restored-is-the-corrupt-text"][0] == "failed", status


@pytest.mark.parametrize("extra,message", [
    ("  - {id: x, measure: generate, model: a, input: corrupt, prompts: plain, "
     "patch: {from: {model: a, input: clean}, site: z, heads: [L0H0]}, "
     "expect: {contains: a}}\n", "prompt set 'plain' has none"),
    ("  - {id: x, measure: generate, model: a, input: corrupt, "
     "patch: {from: {model: a, input: corrupt}, site: z, heads: [L0H0]}, "
     "expect: {contains: a}}\n", "changes nothing"),
    ("  - {id: x, measure: generate, model: a, "
     "patch: {from: {model: a, input: dirty}, site: z, heads: [L0H0]}, "
     "expect: {contains: a}}\n", "patch.from.input"),
])
def test_causal_tracing_spec_errors(tmp_path, models, extra, message):
    from harness.errors import SpecError
    from harness.spec import load_spec

    with pytest.raises(SpecError) as info:
        load_spec(_tracing_spec(tmp_path, models, extra))
    assert message in str(info.value) and "tracing.yaml" in str(info.value)


SAMPLING_SPEC = """\
spec: sampling
models:
  a: {{path: "{model}"}}
prompts:
  - text: "This movie was"
    answer: " bad"
    foil: " good"
  - text: "The acting was"
    answer: " bad"
    foil: " good"
claims:
  - id: samples-{i}
    measure: generate
    model: a
    temperature: 1.0
    samples: 5
    seed: {seed}
    max_new_tokens: 6
    expect: {{rate: {{contains: "was", ">=": 0.5}}}}
"""


def _samples(report_path) -> dict:
    report = json.loads(report_path.read_text())
    return {c["id"]: c["measured"] for s in report["specs"] for c in s["claims"]}


@pytest.mark.slow
def test_sampled_texts_are_identical_across_runs_and_under_xdist(pytester, tiny_checkpoints):
    from harness.cli import main

    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    specs = pytester.mkdir("specs")
    pytester.mkdir("checks")
    for i, seed in enumerate((0, 100)):
        (specs / f"s{i}.yaml").write_text(SAMPLING_SPEC.format(
            model=tiny_checkpoints["a"], i=i, seed=seed).replace("spec: sampling",
                                                                  f"spec: sampling{i}"))
    runs = []
    for n in range(2):
        out = pytester.path / f"cli{n}.json"
        assert main(["run", str(specs), "-q", "--report-json", str(out)]) in (0, 1)
        runs.append(_samples(out))
    assert runs[0] == runs[1]
    assert runs[0]["samples-0"]["seeds"] == list(range(10))
    assert runs[0]["samples-1"]["seeds"] == list(range(100, 110))
    out = pytester.path / "xdist.json"
    result = pytester.runpytest_subprocess("checks", "-n", "2", "-p", "no:randomly",
                                           f"--harness-report-json={out}")
    assert result.ret in (0, 1), result.stdout.str()
    assert _samples(out) == runs[0]


# ----------------------------------------------------------------------------- every architecture

ARCH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v",
              "mlp_post")


def _arch_patches(model) -> dict[str, dict]:
    """One patch per site the model has (tiny models: 2 layers, 4 query heads), plus one at a
    prompt position only: big enough that greedy text changes, some heads left unpatched."""
    from harness.sites import n_heads_of, sites_for

    cfg = model.bridge.cfg
    patches = {}
    for site in (s for s in ARCH_SITES if s in sites_for(cfg)):
        if SITE_TABLE[site].heads:
            last = n_heads_of(site, cfg) - 1
            heads = sorted({(0, 0), (1, last), (1, max(0, last - 1))})
            patches[site] = dict(site=site, heads=heads)
        elif site == "mlp_post":
            patches[site] = dict(site=site, layers=[0, 1], neurons=list(range(0, 64, 2)))
        else:
            patches[site] = dict(site=site, layers=[0, 1])
    patches["resid_post-final-prompt-pos"] = dict(site="resid_post", layers=[0], positions=[-1])
    return patches


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    """Per architecture: the generating model (seed 0) and the `from` model (seed 1)."""
    root = tmp_path_factory.mktemp("gen-archs")
    loaded: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in loaded:
            dirs = [build_tiny_checkpoint(arch, root / f"{arch}-{seed}", seed=seed)
                    for seed in (0, 1)]
            loaded[arch] = tuple(load_model(f"{arch}-{seed}", ModelSource(path=str(d)), str(d),
                                            "cpu") for seed, d in zip((0, 1), dirs))
        return loaded[arch]
    return get


def _refuse(*args, **kwargs):
    raise AssertionError("the token loop ran where the cached path should have")


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_cached_patching_equals_the_token_loop_on_every_architecture(arch_models, arch,
                                                                     monkeypatch):
    from harness.measure import generation

    a, b = arch_models(arch)
    prompts = [a.bridge.to_tokens(t, prepend_bos=True)[0] for t in TEXTS[:2]]
    patches = {name: patch_hooks(b, **kw) for name, kw in _arch_patches(a).items()}
    loop = {name: [generate_uncached(a, p, 5, patch=patch) for p in prompts]
            for name, patch in patches.items()}
    sampled_loop = generate_uncached(a, prompts[0], 5, 1.0, 11, patches["z"])
    monkeypatch.setattr(generation, "generate_uncached", _refuse)   # cached path or failure
    for name, patch in patches.items():
        assert site_map(a, patch.site) is not None and site_map(b, patch.site) is not None
        assert generate_texts(a, prompts, [0, 0], 5, patch=patch) == loop[name], name
    sampled = [generate_texts(a, prompts[:1], [11], 5, 1.0, patches["z"]) for _ in range(2)]
    assert sampled[0] == sampled[1] == [sampled_loop]


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_patched_logits_equal_the_bridge_on_every_architecture(arch_models, arch):
    """One forward of the HF copy under the generation hooks against the bridge under the
    token loop's hooks: the same next-token distributions at every position (a continuous
    check, free of greedy near-ties), and different from the unpatched ones (the patch acts)."""
    a, b = arch_models(arch)
    for name, kw in _arch_patches(a).items():
        hf, bridge, plain = _patched_logprobs(a, patch_hooks(b, **kw), TEXTS[2])
        torch.testing.assert_close(hf, bridge, atol=2e-5, rtol=0, msg=lambda m, name=name:
                                   f"{name}: {m}")           # measured: within 1e-6
        assert (hf - plain).abs().max() > 1e-4, name     # measured: 2.7e-4 (Gemma q) and up


def _patched_logprobs(model, patch, text: str):
    """Next-token log-probabilities at every position of `text`: the HF copy under the
    generation hooks, the bridge under the token loop's hooks, and the HF copy unpatched."""
    from harness.measure.generation import _bridge_hooks, _patching

    tokens = model.bridge.to_tokens(text, prepend_bos=True)
    n = tokens.shape[1]
    with torch.inference_mode():
        plain = model.plain_hf()(input_ids=tokens).logits[0].log_softmax(-1)
        with _patching(model, patch, n):
            hf = model.plain_hf()(input_ids=tokens).logits[0].log_softmax(-1)
        bridge = model.bridge.run_with_hooks(tokens, return_type="logits",
                                             fwd_hooks=_bridge_hooks(patch, tokens, n, 0))
    return hf, bridge[0].log_softmax(-1), plain


TOY_HEAD_PATCHES = {   # too weak to flip the toy model's greedy text: compared as logits
    "q": dict(site="q", heads=[(2, 1), (3, 2)]),
    "k": dict(site="k", heads=[(2, 0), (3, 3)], positions=[-3, -1]),
    "v": dict(site="v", heads=[(layer, h) for layer in (2, 3) for h in range(4)],
              positions=[-2, -1]),
}


@pytest.mark.parametrize("name", list(TOY_HEAD_PATCHES))
def test_patched_logits_equal_the_bridge_on_the_toy_model(models, name):
    a, b = models
    hf, bridge, plain = _patched_logprobs(a, patch_hooks(b, **TOY_HEAD_PATCHES[name]), TEXTS[2])
    torch.testing.assert_close(hf, bridge, atol=5e-5, rtol=0)   # measured: within 1e-5
    assert (hf - plain).abs().max() > 1e-2


EXPECTED_LOCATIONS = {   # (arch, site) -> (HF module of layer 1, input/output, fused layout)
    ("gpt2", "z"): ("transformer.h.1.attn.c_proj", "input", None),
    ("gpt2", "q"): ("transformer.h.1.attn.c_attn", "output", "concatenated"),
    ("pythia", "k"): ("gpt_neox.layers.1.attention.query_key_value", "output", "interleaved"),
    ("phi3", "v"): ("model.layers.1.self_attn.qkv_proj", "output", "concatenated"),
    ("phi3", "mlp_post"): ("model.layers.1.mlp.down_proj", "input", None),
    ("llama-gqa", "k"): ("model.layers.1.self_attn.k_proj", "output", None),
    ("gemma2", "attn_out"): ("model.layers.1.post_attention_layernorm", "output", None),
    ("gemma2", "mlp_out"): ("model.layers.1.post_feedforward_layernorm", "output", None),
    ("opt", "mlp_post"): ("model.decoder.layers.1.fc2", "input", None),
    ("opt", "mlp_out"): ("model.decoder.layers.1.fc2", "output", None),
    ("qwen2", "resid_mid"): ("model.layers.1.self_attn", "output", None),
    ("mistral", "resid_post"): ("model.layers.1", "output", None),
}


@pytest.mark.parametrize("arch,site", list(EXPECTED_LOCATIONS))
def test_sites_are_located_from_the_bridge(arch_models, arch, site):
    a, _ = arch_models(arch)
    smap = site_map(a, site)
    path, where, layout = EXPECTED_LOCATIONS[arch, site]
    assert smap is not None
    location = smap.where[1]
    assert (location.path, location.where) == (path, where)
    assert (location.fused[0] if location.fused else None) == layout


def test_value_bias_offsets_are_measured_where_the_bridge_folds_them(arch_models):
    """z and v of a LayerNorm model differ from the HF ones by the value bias the bridge folds
    into b_O: b_V plus the LayerNorm bias through W_V, i.e. the value part of
    c_attn(ln_1.bias); q has no offset (its bias stays), nor the residual stream (compared
    without its mean). GPT-2: its plain copy keeps the HF weights (taken before the bridge
    processed them), where a shared-weight copy (OPT) would have nothing to offset."""
    a, _ = arch_models("gpt2")
    layer = a.plain_hf().transformer.h[1]
    d_model = a.plain_hf().config.n_embd
    with torch.no_grad():
        b_v = layer.attn.c_attn(layer.ln_1.bias)[2 * d_model:]
    assert b_v.abs().max() > 1e-3          # the random checkpoint has a value bias to fold
    n_heads = a.plain_hf().config.n_head
    offset = site_map(a, "v").offsets[1]
    torch.testing.assert_close(offset, -b_v.unflatten(0, (n_heads, -1)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(site_map(a, "z").offsets[1], offset)
    assert site_map(a, "q").offsets[1] is None
    assert site_map(a, "resid_post").offsets[1] is None


def test_a_shared_weight_copy_needs_no_value_bias_offset(arch_models):
    """OPT's plain copy is the bridge's own modules (weights shared, biases already folded),
    so its z and v equal the bridge's with no offset."""
    a, _ = arch_models("opt")
    assert site_map(a, "v").offsets[1] is None
    assert site_map(a, "z").offsets[1] is None


def test_a_site_that_does_not_reproduce_the_bridge_uses_the_token_loop(tmp_path, monkeypatch):
    """A plain HF copy that differs from the bridge's weights fails the check: token loop."""
    from harness.measure import generation

    dirs = [build_tiny_checkpoint("llama", tmp_path / str(s), seed=s) for s in (0, 1)]
    a, b = (load_model(f"m{s}", ModelSource(path=str(d)), str(d), "cpu")
            for s, d in zip((0, 1), dirs))
    a._plain = load_hf_causal_lm(str(dirs[0]), ModelSource(path=str(dirs[0])))  # its own
    with torch.no_grad():                     # weights (the usual copy shares the bridge's)
        a.plain_hf().model.layers[1].self_attn.o_proj.weight.mul_(1.5)
    assert site_map(a, "attn_out") is None
    assert site_map(a, "z") is not None       # o_proj's input is unaffected
    calls = []
    monkeypatch.setattr(generation, "generate_uncached",
                        lambda *args, **kw: calls.append(args) or "x")
    patch = patch_hooks(b, "attn_out", layers=[1])
    prompts = [a.bridge.to_tokens(TEXTS[0], prepend_bos=True)[0]]
    assert generate_texts(a, prompts, [0], 3, patch=patch) == ["x"]
    assert len(calls) == 1


def test_heads_and_positions_select_their_outer_product():
    """Both lists apply: every chosen head at every chosen position (plain advanced indexing
    would pair them up, or fail when their lengths differ)."""
    patch = patch_hooks(None, "v", heads=[(0, 0), (0, 2)], positions=[1, -1])
    act = torch.zeros(1, 5, 4, 3)
    act[patch.select(act, [0, 2], prompt_len=4, first=0)] = 1
    assert act.sum((0, 3)).nonzero().tolist() == [[1, 0], [1, 2], [3, 0], [3, 2]]
    assert act.sum() == 4 * 3


def test_causal_tracing_needs_equal_token_lengths_before_anything_runs(tmp_path):
    """Clean and corrupt prompts of a generate claim patched across inputs pair positions one
    to one: unequal token lengths are a spec error of the token checks (run and validate)."""
    from harness.cli import main
    from harness.runner import run_spec_file
    from harness.session import Session

    path = tmp_path / "uneven.yaml"
    path.write_text(textwrap.dedent("""\
        spec: uneven
        models:
          a: {zoo: toy-reviews-source}
        prompts:
          - {text: "This movie was", corrupt: "This film was really"}
        claims:
          - {id: x, measure: generate, model: a, input: corrupt, max_new_tokens: 2,
             patch: {from: {model: a, input: clean}, site: z, heads: [L0H0]},
             expect: {contains: a}}
        """))
    result = run_spec_file(path, Session(verbose=False))
    assert result.error is not None and "claims[0]" in str(result.error)
    assert main(["validate", str(path)]) == 2
