"""Cached, batched generation (HF `generate` with a KV cache) against the token-by-token
reference loop: greedy, sampled, and while patching from another model."""

from __future__ import annotations

import json

import pytest

from harness.measure.generation import generate_texts, generate_uncached, patch_hooks
from harness.models import load_model
from harness.spec import ModelSource

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
}


def test_sites_without_a_cached_path_use_the_token_loop(models, monkeypatch):
    from harness.measure import generation

    a, b = models
    for site in ("v", "pattern", "resid_mid"):
        assert generation.hf_sites(a.plain_hf(), site) is None
    calls = []
    monkeypatch.setattr(generation, "generate_uncached",
                        lambda *args, **kw: calls.append(args) or "x")
    patch = patch_hooks(b, "v", heads=[(2, 0)])
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
