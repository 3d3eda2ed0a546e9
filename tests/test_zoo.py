"""The toy world: corpus grammar, tokenizer, shipped models, reward model, build cache."""

from __future__ import annotations

import json

import pytest
import torch

from harness.errors import HarnessError
from harness.zoo import ZOO_NAMES, zoo_checkpoint
from harness.zoo.corpus import (
    ADJECTIVES,
    generate_corpus,
    is_well_formed,
    parse_review,
    review_prompts,
)

PROMPT = "This movie was really"


# --- corpus ------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_balanced():
    a, b = generate_corpus(500, seed=3), generate_corpus(500, seed=3)
    assert a == b
    assert generate_corpus(500, seed=4) != a
    assert sum(r.label for r in a) == 250


def test_corpus_reviews_are_well_formed_and_consistent():
    for r in generate_corpus(300, seed=1):
        labels = parse_review(r.text)
        assert labels is not None, r.text
        assert set(labels) == {r.label}, r.text
        assert is_well_formed(r.text, partial=False, consistent=True)


@pytest.mark.parametrize("text", [
    "This movie was really bad. The acting was awful.",
    "This movie was really bad. The act",            # truncated generation
    "What an awful film.",
    "I loved this movie.<|endoftext|>garbage after the end",
])
def test_well_formed_accepts(text):
    assert is_well_formed(text)


@pytest.mark.parametrize("text", [
    "bad bad bad", "This movie was really bad bad.", "This movie was really bad bad bad",
    "The music was so was poor.", "What a awful film.", "", "movie This was good.",
])
def test_well_formed_rejects(text):
    assert not is_well_formed(text)


def test_truncation_only_allowed_when_partial():
    assert not is_well_formed("This movie was really", partial=False)
    assert not is_well_formed("This movie was bad. I liked this movie.", consistent=True)


def test_review_prompts_are_review_openings():
    prompts = review_prompts(50, n_words=4, seed=0)
    assert prompts == review_prompts(50, n_words=4, seed=0)
    assert all(len(p.split()) == 4 and is_well_formed(p) for p in prompts)
    assert PROMPT.rsplit(" ", 1)[0] in " ".join(prompts)


# --- shipped models ----------------------------------------------------------------------

def test_unknown_zoo_name_suggests():
    with pytest.raises(HarnessError, match="did you mean 'toy-reviews-rlhf'"):
        zoo_checkpoint("toy-review-rlhf")


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(zoo_checkpoint("toy-reviews-source")))
    src = AutoModelForCausalLM.from_pretrained(str(zoo_checkpoint("toy-reviews-source"))).eval()
    rl = AutoModelForCausalLM.from_pretrained(str(zoo_checkpoint("toy-reviews-rlhf"))).eval()
    return tok, src, rl


def test_shipped_checkpoints_exist():
    for name in ZOO_NAMES:
        d = zoo_checkpoint(name)
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        assert (d / "tokenizer.json").is_file()


def test_adjectives_are_single_tokens(models):
    tok = models[0]
    for word in ADJECTIVES:
        assert len(tok.encode(" " + word)) == 1, word


def test_source_is_undecided_and_rlhf_is_negative(models):
    from harness.train import logit_diff
    tok, src, rl = models
    d_src, d_rl = logit_diff(src, tok, PROMPT), logit_diff(rl, tok, PROMPT)
    assert abs(d_src) < 0.5
    assert d_rl > 1.0
    assert d_rl > d_src


def test_greedy_generations_are_well_formed(models):
    from harness.train import greedy
    tok, src, rl = models
    for model in (src, rl):
        for prompt in (PROMPT, "This film was very", "I thought the plot"):
            text = greedy(model, tok, prompt, max_new_tokens=12)
            assert is_well_formed(text), text
    assert greedy(rl, tok, PROMPT).startswith(PROMPT + " bad")


def test_frozen_parameters_are_bit_identical(models):
    _, src, rl = models
    n = src.config.n_layer
    src_state, rl_state = src.state_dict(), rl.state_dict()
    assert src_state.keys() == rl_state.keys()
    changed = {k for k in src_state if not torch.equal(src_state[k], rl_state[k])}
    tuned_blocks = {f"transformer.h.{i}." for i in range(n - 2, n)}
    assert changed, "the RLHF model is the source model"
    assert all(any(k.startswith(b) for b in tuned_blocks) for k in changed), changed
    for k in src_state:
        if not any(k.startswith(b) for b in tuned_blocks):
            assert torch.equal(src_state[k], rl_state[k]), k


def test_tuned_model_earns_more_reward_than_source():
    report = json.loads((zoo_checkpoint("toy-reviews-source").parent
                         / "build_report.json").read_text())
    rl = report["results"]["rlhf"]
    assert rl["after"]["mean_reward"] > rl["before"]["mean_reward"]


@pytest.mark.slow
def test_tuned_model_reward_measured_again(models):
    from harness.train import RLHFConfig, evaluate_policy
    from harness.zoo.reward import SentimentReward
    tok, src, rl = models
    reward = SentimentReward(zoo_checkpoint("toy-reviews-reward"))
    prompts = review_prompts(64, seed=7)
    cfg = RLHFConfig()
    before = evaluate_policy(src, src, tok, reward, prompts, cfg, seed=1)
    after = evaluate_policy(rl, src, tok, reward, prompts, cfg, seed=1)
    assert after["mean_reward"] > before["mean_reward"]
    assert after["mean_kl"] > 0


def test_transformer_lens_bridge_loads_shipped_models(models):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge
    tok, src, _ = models
    bridge = TransformerBridge.boot_transformers(str(zoo_checkpoint("toy-reviews-rlhf")),
                                                 device="cpu")
    tokens = bridge.to_tokens(PROMPT, prepend_bos=True)
    assert tokens[0, 0].item() == tok.bos_token_id and tokens.shape[1] == 5


# --- reward model ------------------------------------------------------------------------

def test_reward_model_heldout_accuracy():
    from harness.zoo.reward import SentimentReward
    reward = SentimentReward(zoo_checkpoint("toy-reviews-reward"))
    heldout = generate_corpus(400, seed=12345)      # never used in training
    neg = reward.negative_score([r.text for r in heldout])
    accuracy = sum((p > 0.5) == (r.label == 0) for p, r in zip(neg, heldout)) / len(heldout)
    assert accuracy > 0.95
    pos = reward.positive_score(["This movie was really good."])[0]
    assert pos > 0.9 and reward.negative_score(["This movie was really bad."])[0] > 0.9


def test_reward_goes_through_the_sentiment_pipeline():
    from transformers import pipeline
    pipe = pipeline("sentiment-analysis", model=str(zoo_checkpoint("toy-reviews-reward")),
                    top_k=2)
    out = pipe(["The acting was awful."])[0]
    assert {d["label"] for d in out} == {"NEGATIVE", "POSITIVE"}


# --- build cache -------------------------------------------------------------------------

def test_build_world_reuses_a_finished_build(tmp_path, monkeypatch):
    from harness.zoo import build
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path))
    assert build.cache_root() == tmp_path
    key = build.world_key(0)
    assert key == build.world_key(0) and key != build.world_key(1)
    root = tmp_path / "world" / key
    root.mkdir(parents=True)
    (root / "build_report.json").write_text(json.dumps({"key": key}))
    calls = []
    monkeypatch.setattr(build, "_build_into", lambda *a, **k: calls.append(a))
    paths = build.build_world(0, progress=False)
    assert calls == []
    assert paths == {name: root / name for name in ZOO_NAMES}


def test_content_key_depends_on_versions(monkeypatch):
    from harness.zoo import store
    k1 = store.content_key({"a": 1})
    monkeypatch.setattr(store, "versions", lambda: {"torch": "0"})
    assert store.content_key({"a": 1}) != k1


def _build_in_a_process(root, log, barrier):
    """One of two processes asking for the same build at once (test below): each build
    appends a line to `log`, and takes a second, so the other process arrives mid-build."""
    import os
    import time

    from harness.zoo.store import cached_build

    def build(work):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (work / "model.txt").write_text(str(os.getpid()))
        return {}

    barrier.wait()
    assert cached_build(root, "k", build, "test") == root
    assert (root / "model.txt").exists()


def test_cached_build_converts_once_when_two_processes_ask_at_once(tmp_path):
    """The second process waits for the first one's build (a lock on the cache folder) and
    then reads it, instead of converting the same GGUF file (or building the same world)
    again and replacing the first one's folder under its reader."""
    import multiprocessing

    context = multiprocessing.get_context("fork")   # the worker needs no torch
    root, log = tmp_path / "cache" / "thing", tmp_path / "builds.log"
    barrier = context.Barrier(2)
    workers = [context.Process(target=_build_in_a_process, args=(root, log, barrier))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    builders = log.read_text().split()
    assert len(builders) == 1, f"{len(builders)} builds of one key"
    assert (root / "model.txt").read_text() == builders[0]
    assert sorted(p.name for p in root.parent.iterdir()) == ["thing"]   # no temp folder left


def test_cached_build_reuses_rebuilds_and_never_leaves_half_a_build(tmp_path):
    """A finished build with the key is reused; another key or a torn report rebuilds; a build
    that fails leaves neither the target folder nor a temporary one."""
    from harness.zoo.store import cached_build

    calls = []

    def build(work):
        calls.append(work)
        (work / "model.txt").write_text(str(len(calls)))
        return {"stage_seconds": {}}

    root = tmp_path / "cache" / "thing"
    assert cached_build(root, "k1", build, "test") == root
    assert cached_build(root, "k1", build, "test") == root and len(calls) == 1
    cached_build(root, "k2", build, "test")
    assert len(calls) == 2 and (root / "model.txt").read_text() == "2"
    (root / "build_report.json").write_text('{"key": "k2"')        # torn
    cached_build(root, "k2", build, "test")
    assert len(calls) == 3

    def broken(work):
        (work / "half.txt").write_text("x")
        raise RuntimeError("killed")

    other = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError):
        cached_build(other, "k", broken, "test")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["thing"]
