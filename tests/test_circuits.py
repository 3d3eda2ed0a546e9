"""Circuit claims: attention rules, head-detector scores, path patching, reference ablations
and circuit metrics. Each measure is checked against hooks written here on a tiny random
model (1e-4), and against ground truth: a model with planted heads and toy-induction."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _tiny_models import build_model_dir, load_bridge
from transformers import GPT2LMHeadModel

from harness.errors import MeasureError, SpecError
from harness.measure import attention as A
from harness.measure import circuits as C
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec
from harness.zoo import zoo_checkpoint

ATOL = 1e-4
TEXTS = ["This movie was really good. This movie was", "The acting was bad. The acting was"]


def _tiny_llama_gqa(directory: Path) -> Path:
    """A 3-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from harness.testing import TINY_TEXTS
    from harness.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)
    return directory


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("circ")
    build = _tiny_llama_gqa if request.param == "llama-gqa" else \
        lambda d: build_model_dir(d, n_layer=3)
    bridge = load_bridge(build(root / "m"))
    rows = [bridge.to_tokens(t, prepend_bos=True)[0].cpu() for t in TEXTS]
    width = min(len(r) for r in rows)
    tokens = torch.stack([r[:width] for r in rows])        # equal lengths: no padding needed
    final = torch.full((2,), width - 1)
    ids = bridge.to_tokens(" good", prepend_bos=False)[0, -1].cpu(), \
        bridge.to_tokens(" bad", prepend_bos=False)[0, -1].cpu()
    return bridge, tokens, final, ids[0].repeat(2), ids[1].repeat(2)


def _patterns(bridge, tokens):
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(bridge.cfg.n_layers)]
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[n].cpu() for n in names]


def _logit_diff(bridge, tokens, final, answer, foil, hooks=()):
    logits = bridge.run_with_hooks(tokens, fwd_hooks=list(hooks), return_type="logits").cpu()
    rows = torch.arange(len(tokens))
    return logits[rows, final, answer] - logits[rows, final, foil]


# ----------------------------------------------------------------------------- attention

def _sources(row: list[int], dest: int, rule) -> list[int]:
    if rule == "previous":
        return [dest - 1] if dest >= 1 else []
    if rule == "first":
        return [0]
    if rule == "self":
        return [dest]
    if rule == "duplicate":
        return [s for s in range(dest) if row[s] == row[dest]]
    if rule == "induction":
        return [s + 1 for s in range(dest) if row[s] == row[dest]]
    return [rule] if rule <= dest else []


@pytest.mark.parametrize("rule", ["previous", "first", "self", "duplicate", "induction", 2])
def test_attention_scores_match_hooks(tiny, rule):
    bridge, tokens, final, *_ = tiny
    got = A.attention_scores(bridge, tokens, final, rule)
    patterns = _patterns(bridge, tokens)
    for layer, pattern in enumerate(patterns):
        for b, row in enumerate(tokens.tolist()):
            per_dest = [pattern[b, :, d, _sources(row, d, rule)].sum(-1)
                        for d in range(len(row)) if _sources(row, d, rule)]
            expected = torch.stack(per_dest).mean(0)
            torch.testing.assert_close(got[layer, :, b], expected, atol=ATOL, rtol=0)


def test_attention_to_a_token_string_and_empty_rules(tiny):
    bridge, tokens, final, answer, _ = tiny
    movie = bridge.to_tokens(" movie", prepend_bos=False)[0, -1].item()
    got = A.attention_scores(bridge, tokens[:1], final[:1], "token", token_id=movie)
    pattern = _patterns(bridge, tokens[:1])[1][0]
    row = tokens[0].tolist()
    at = [s for s in range(len(row)) if row[s] == movie]
    expected = torch.stack([pattern[:, d, [s for s in at if s <= d]].sum(-1)
                            for d in range(len(row)) if any(s <= d for s in at)]).mean(0)
    torch.testing.assert_close(got[1, :, 0], expected, atol=ATOL, rtol=0)
    with pytest.raises(MeasureError, match="no position"):
        A.attention_scores(bridge, tokens[1:], final[1:], "token", token_id=movie,
                           texts=[TEXTS[1]])


@pytest.mark.parametrize("role,tl_name", [("previous_token", "previous_token_head"),
                                          ("duplicate_token", "duplicate_token_head"),
                                          ("induction", "induction_head")])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_head_scores_match_transformer_lens_head_detector(tiny, role, tl_name, exclude_bos):
    from transformer_lens.head_detector import detect_head

    bridge = tiny[0]
    text = "good bad movie acting good bad movie acting"
    expected = detect_head(bridge, text, tl_name, exclude_bos=exclude_bos)
    tokens = bridge.to_tokens(text).cpu()
    got = A.head_detector_scores(bridge, tokens, role, exclude_bos=exclude_bos)
    torch.testing.assert_close(got[..., 0], expected.float().cpu(), atol=ATOL, rtol=0)


def test_repeated_random_tokens_are_seeded_and_repeat():
    vocab = torch.arange(10, 60)
    a = A.repeated_random_tokens(vocab, 7, 3, seed=1, bos=0)
    assert a.shape == (3, 15) and (a[:, 0] == 0).all()
    assert torch.equal(a[:, 1:8], a[:, 8:]) and torch.equal(a, A.repeated_random_tokens(
        vocab, 7, 3, seed=1, bos=0))
    assert not torch.equal(a, A.repeated_random_tokens(vocab, 7, 3, seed=2, bos=0))


# ----------------------------------------------------------------------------- path patching

def _manual_path_patch(bridge, clean, corrupt, final, answer, foil, sender, receiver, path):
    """Path patching written out with hooks: freeze everything at corrupt values except the
    sender (clean), record the receiver's input, patch only that into a normal corrupt run."""
    cfg = bridge.cfg
    names = [f"blocks.{i}.attn.hook_z" for i in range(cfg.n_layers)] + \
        [f"blocks.{i}.hook_mlp_out" for i in range(cfg.n_layers)]
    _, src = bridge.run_with_cache(clean, names_filter=lambda n: n in names)
    _, dst = bridge.run_with_cache(corrupt, names_filter=lambda n: n in names)
    (s_layer, s_head), (r_layer, r_head) = sender, receiver
    store = {}

    def freeze(act, hook):
        new = dst[hook.name].clone()
        if hook.name == f"blocks.{s_layer}.attn.hook_z":
            new[:, :, s_head] = src[hook.name][:, :, s_head]
        return new

    def record(act, hook):
        store["x"] = act.clone()
        return act

    rec_name = f"blocks.{r_layer}.attn.hook_{path}"
    hooks = [(n, freeze) for n in names] + [(rec_name, record)]
    bridge.run_with_hooks(corrupt, fwd_hooks=hooks)

    def patch(act, hook):
        act = act.clone()
        act[:, :, r_head] = store["x"][:, :, r_head]
        return act

    return _logit_diff(bridge, corrupt, final, answer, foil, [(rec_name, patch)])


@pytest.mark.parametrize("path", ["q", "k", "v"])
def test_path_patch_matches_hooks(tiny, path):
    bridge, clean, final, answer, foil = tiny
    corrupt = clean.flip(0)
    receiver = "L2KV1" if path in "kv" else "L2H1"
    got = C.path_patch(bridge, clean, corrupt, final, answer, foil,
                       [[C.Component(0, 2)], [C.Component(1, 3)]], path, [receiver])
    for row, sender in enumerate([(0, 2), (1, 3)]):
        expected = _manual_path_patch(bridge, clean, corrupt, final, answer, foil, sender,
                                      (2, 1), path)
        torch.testing.assert_close(got[row], expected, atol=ATOL, rtol=0)


def test_path_patch_to_resid_of_last_mlp_equals_patching_it(tiny):
    """The last MLP reaches the logits only through the final residual: both methods agree."""
    bridge, clean, final, answer, foil = tiny
    corrupt = clean.flip(0)
    last = bridge.cfg.n_layers - 1
    got = C.path_patch(bridge, clean, corrupt, final, answer, foil, [[C.Component(last)]],
                       "resid")
    name = f"blocks.{last}.hook_mlp_out"
    _, src = bridge.run_with_cache(clean, names_filter=lambda n: n == name)
    expected = _logit_diff(bridge, corrupt, final, answer, foil,
                           [(name, lambda act, hook: src[name])])
    torch.testing.assert_close(got[0], expected, atol=ATOL, rtol=0)


def test_path_patch_errors(tiny):
    bridge, clean, final, answer, foil = tiny
    with pytest.raises(MeasureError, match="L2KV1"):
        C.path_patch(bridge, clean, clean, final, answer, foil, [[C.Component(0, 0)]], "k",
                     ["L2H1"])
    with pytest.raises(MeasureError, match="needs `receivers:`"):
        C.path_patch(bridge, clean, clean, final, answer, foil, [[C.Component(0, 0)]], "q")
    with pytest.raises(MeasureError, match="equal token shape"):
        C.path_patch(bridge, clean, clean[:, :-1], final, answer, foil,
                     [[C.Component(0, 0)]], "resid")


# ----------------------------------------------------------------------------- circuits

def _manual_circuit(bridge, tokens, final, answer, foil, members, mean):
    """Logit diff with every head / MLP outside `members` replaced by its mean."""
    def hook(act, hook):
        layer = int(hook.name.split(".")[1])
        out = mean[hook.name].expand_as(act).clone()
        if hook.name.endswith("hook_z"):
            for h in range(bridge.cfg.n_heads):
                if f"L{layer}H{h}" in members:
                    out[:, :, h] = act[:, :, h]
        elif f"mlp{layer}" in members:
            out = act
        return out

    names = list(mean)
    return _logit_diff(bridge, tokens, final, answer, foil, [(n, hook) for n in names])


def test_circuit_scores_match_hooks(tiny):
    bridge, tokens, final, answer, foil = tiny
    ref = tokens.flip(1)
    names = C.component_hooks(bridge.cfg)
    _, cache = bridge.run_with_cache(ref, names_filter=lambda n: n in names)
    mean = {n: cache[n].mean((0, 1), keepdim=True).cpu() for n in names}
    members = ["L0H1", "L2H0", "mlp1"]
    values = C.ablation_values(bridge, "mean", names, tokens, final, ref, final)
    scores = C.circuit_scores(bridge, tokens, final, answer, foil,
                              [C.parse_component(m) for m in members], values,
                              C.all_components(bridge.cfg))
    model = _logit_diff(bridge, tokens, final, answer, foil)
    none = _manual_circuit(bridge, tokens, final, answer, foil, [], mean)
    circuit = _manual_circuit(bridge, tokens, final, answer, foil, members, mean)
    torch.testing.assert_close(scores.model, model, atol=ATOL, rtol=0)
    torch.testing.assert_close(scores.ablated, none, atol=ATOL, rtol=0)
    torch.testing.assert_close(scores.faithfulness(), (circuit - none) / (model - none),
                               atol=ATOL, rtol=1e-4)
    without = _manual_circuit(bridge, tokens, final, answer, foil, members[1:], mean)
    expected_drop = (circuit.mean() - without.mean()) / (model - none).mean()
    torch.testing.assert_close(scores.minimality()[0], expected_drop, atol=ATOL, rtol=0)


def test_resample_ablation_matches_hooks_and_needs_equal_lengths(tiny):
    bridge, tokens, final, answer, foil = tiny
    ref = torch.cat([tokens, tokens.flip(1)])
    draw = C.resample_draw(2, 4, seed=3)
    name = "blocks.1.attn.hook_z"
    values = C.ablation_values(bridge, "resample", [name], tokens, final, ref,
                               torch.full((4,), tokens.shape[1] - 1), draw)
    hooks = C.site_replacement_hooks(bridge.cfg, "z", values, final, heads=[(1, 2)],
                                     positions=[-1])
    got = C.logit_diffs(bridge, tokens, final, answer, foil, hooks)
    _, cache = bridge.run_with_cache(ref, names_filter=lambda n: n == name)

    def hook(act, hook):
        act = act.clone()
        for b in range(2):
            act[b, final[b], 2] = cache[name][draw[b], final[b], 2]
        return act

    expected = _logit_diff(bridge, tokens, final, answer, foil, [(name, hook)])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with pytest.raises(MeasureError, match="same token length"):
        C.ablation_values(bridge, "resample", [name], tokens, final, ref[:, :-1],
                          final - 1, draw)


# ----------------------------------------------------------------------------- ground truth

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Untrained: only the planted heads (L0H0 previous-token, L1H0 induction) by construction."""
    from harness.zoo import induction

    cfg = induction.InductionConfig()
    tokenizer = induction.build_tokenizer()
    torch.manual_seed(0)
    from transformers import GPT2Config

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions,
                                       n_embd=cfg.n_embd, n_layer=2, n_head=4))
    induction.plant(model, cfg, torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("planted")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    bridge = load_bridge(out)
    vocab = induction.word_ids(tokenizer)
    return bridge, A.repeated_random_tokens(vocab, 12, 8, seed=0, bos=tokenizer.bos_token_id)


def test_planted_heads_score_highest(planted):
    bridge, tokens = planted
    previous = A.head_detector_scores(bridge, tokens, "previous_token").mean(-1)
    induction = A.head_detector_scores(bridge, tokens, "induction").mean(-1)
    assert previous.argmax() == 0 and previous[0, 0] > 0.8           # L0H0
    assert induction.argmax() == 4 and induction[1, 0] > 0.2         # L1H0
    assert induction[1, 1:].max() < 0.1 and previous[0, 1:].max() < 0.3


@pytest.fixture(scope="module")
def toy():
    spec = load_spec(Path(__file__).parents[1] / "specs" / "induction.yaml")
    session = Session(verbose=False)
    model = session.model(spec, "induct")
    batch = session.batch(spec, spec.prompt_set(None), model, True)
    ref = session.batch(spec, spec.prompt_set("random"), model, True)
    return model.bridge, batch, ref


def test_toy_induction_path_through_keys_recovers_the_senders_effect(toy):
    bridge, batch, _ = toy
    args = (batch.final_pos, batch.answer_ids, batch.foil_ids)
    clean, corrupt = batch.tokens, batch.corrupt_tokens
    name = "blocks.0.attn.hook_z"
    _, src = bridge.run_with_cache(clean, names_filter=lambda n: n == name)

    def patch_sender(act, hook):
        act = act.clone()
        act[:, :, 0] = src[name][:, :, 0]
        return act

    into = C.logit_diffs(bridge, corrupt, *args).mean()
    total = C.logit_diffs(bridge, corrupt, *args, [(name, patch_sender)]).mean() - into
    sender = [[C.Component(0, 0)]]
    through = {path: C.path_patch(bridge, clean, corrupt, *args, sender, path,
                                  [] if path == "resid" else
                                  ["L1KV0" if path in "kv" else "L1H0"]).mean() - into
               for path in ("q", "k", "v", "resid")}
    assert total > 3
    assert abs(through["k"] - total) < 0.15 * total            # the effect goes through k
    assert max(abs(through[p]) for p in ("q", "v", "resid")) < 0.05 * total


def test_toy_induction_circuit_faithful_minimal_and_a_wrong_one_is_not(toy):
    bridge, batch, ref = toy
    names = C.component_hooks(bridge.cfg)
    draw = C.resample_draw(len(batch.texts), len(ref.texts), 0)
    values = C.ablation_values(bridge, "resample", names, batch.tokens, batch.final_pos,
                               ref.tokens, ref.final_pos, draw)
    universe = C.all_components(bridge.cfg)

    def score(members):
        return C.circuit_scores(bridge, batch.tokens, batch.final_pos, batch.answer_ids,
                                batch.foil_ids, [C.parse_component(m) for m in members],
                                values, universe)

    right = score(["L0H0", "L1H0", "mlp0", "mlp1"])
    assert right.faithfulness().mean() > 0.9
    assert right.minimality().min() > 0.02                     # removing any member hurts
    assert right.minimality()[1] > 0.5                         # L1H0 above all
    assert score(["L0H1", "L1H2", "mlp0", "mlp1"]).faithfulness().mean() < 0.2


FALSE_CLAIMS = """\
spec: false-claims
models:
  induct: {zoo: toy-induction}
prompts:
  - text: "violin quartz stamp sugar rabbit engine feather violin quartz stamp sugar"
    corrupt: "violin quartz stamp apple rabbit engine feather violin quartz stamp sugar"
    answer: " rabbit"
    foil: " feather"
prompt_sets:
  random:
    - text: "jacket spider planet sugar sponge meadow tiger needle quartz pencil window"
      answer: " apple"
      foil: " river"
claims:
  - {id: wrong-previous-head, measure: attention, model: induct, source: previous,
     expect: {argmax: L0H1}}
  - {id: wrong-induction-head, measure: head_scores, model: induct, role: induction,
     expect: {argmax: L1H3}}
  - {id: through-queries, measure: path_patch, from: {model: induct},
     into: {model: induct, input: corrupt}, senders: [L0H0], path: q, receivers: [L1H0],
     expect: {">": 0.5}}
  - {id: wrong-circuit, measure: circuit, model: induct, members: [L0H1, L1H2],
     kind: resample, reference: random, expect: {">": 0.5}}
"""


def test_false_claims_fail(tmp_path):
    path = tmp_path / "false.yaml"
    path.write_text(FALSE_CLAIMS)
    verdicts = run_spec_file(path, Session(verbose=False)).verdicts
    assert {v.claim_id: v.status for v in verdicts} == {
        "wrong-previous-head": "failed", "wrong-induction-head": "failed",
        "through-queries": "failed", "wrong-circuit": "failed"}


def test_toy_induction_checkpoint_is_shipped():
    assert (zoo_checkpoint("toy-induction") / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- spec errors

BASE = """\
spec: s
models:
  m: {path: /nowhere}
prompts:
  - {text: "a b", answer: " c", foil: " d"}
prompt_sets:
  ref:
    - {text: "e f", answer: " c", foil: " d"}
claims:
"""


@pytest.mark.parametrize("claim,message", [
    ("{id: x, measure: attention, model: m, source: prev, expect: {'>': 0}}",
     "did you mean 'previous'"),
    ("{id: x, measure: attention, model: m, source: previous, heads: [L0KV1], expect: {'>': 0}}",
     "write L0H1"),
    ("{id: x, measure: path_patch, from: m, into: {model: m}, senders: [L0H0], path: k, "
     "receivers: [L1H0], expect: {'>': 0}}", "write L1KV0"),
    ("{id: x, measure: path_patch, from: m, into: m, senders: [L0H0], path: resid, "
     "receivers: [L1H0], expect: {'>': 0}}", "drop `receivers`"),
    ("{id: x, measure: path_patch, from: m, into: m, senders: [head1], path: resid, "
     "expect: {'>': 0}}", "not a component"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], kind: mean, expect: {'>': 0}}",
     "needs `reference:`"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], expect: {'>': 0}}",
     "missing required field 'kind'"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], kind: mean, reference: refs, "
     "expect: {'>': 0}}", "did you mean 'ref'"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], kind: mean, reference: ref, "
     "metric: minimality, ci: 0.9, expect: {min: {'>': 0}}}", "`ci` applies"),
    ("{id: x, measure: circuit, model: m, members: [L0H0], kind: mean, reference: ref, "
     "metric: minimality, expect: {'>': 0}}", "does not apply"),
    ("{id: x, measure: ablate, model: m, site: z, heads: [L0H0], kind: resample, "
     "expect: {'>': 0}}", "needs `reference: {prompts: SET}`"),
    ("{id: x, measure: ablate, model: m, site: z, heads: [L0H0], kind: mean, metric: loss, "
     "reference: {prompts: ref}, expect: {'>': 0}}", "read the logit difference"),
    ("{id: x, measure: head_scores, model: m, role: induction_head, expect: {argmax: L0H0}}",
     "role"),
    ("{id: x, measure: head_scores, model: m, role: previos, expect: {argmax: L0H0}}",
     "unknown head role 'previos'; did you mean 'previous'?"),
    ("{id: x, measure: head_scores, model: m, role: first, expect: {argmax: L0H0}}",
     "use `measure: attention` with `source: first`"),
    ("{id: x, measure: attention, model: m, source: previous_tokn, expect: {argmax: L0H0}}",
     "did you mean 'previous_token'"),
])
def test_spec_errors_name_the_field(tmp_path, claim, message):
    path = tmp_path / "s.yaml"
    path.write_text(BASE + "  - " + claim + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value) + "".join(str(o) for o in getattr(info.value, "others", []))
    assert message in text and "s.yaml" in text and ":10" in text


@pytest.mark.parametrize("kind,field", [("attention", "source"), ("head_scores", "role")])
@pytest.mark.parametrize("name,canonical", [("previous", "previous"),
                                            ("previous_token", "previous"),
                                            ("duplicate", "duplicate"),
                                            ("duplicate_token", "duplicate"),
                                            ("induction", "induction")])
def test_both_kinds_take_the_same_role_names(tmp_path, kind, field, name, canonical):
    """`attention`'s `source:` and `head_scores`' `role:` share one vocabulary (harness.roles),
    TransformerLens's names accepted as aliases; claims hold the harness's name."""
    path = tmp_path / "s.yaml"
    path.write_text(BASE + f"  - {{id: x, measure: {kind}, model: m, {field}: {name}, "
                           "expect: {argmax: L0H0}}\n")
    assert getattr(load_spec(path).claims[-1], field) == canonical


def test_head_scores_need_no_prompts(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        spec: s
        models:
          m: {path: /nowhere}
        claims:
          - {id: x, measure: head_scores, model: m, role: induction, expect: {argmax: L1H0}}
        """))
    assert load_spec(path).claims[0].random_tokens.count == 16


def test_variant_chunks_do_not_change_results(tiny):
    """A tiny memory budget runs one variant per forward pass: same numbers."""
    bridge, clean, final, answer, foil = tiny
    senders = [[C.Component(layer, h)] for layer in range(2) for h in range(4)]
    args = (bridge, clean, clean.flip(0), final, answer, foil, senders, "v", ["L2KV0"])
    torch.testing.assert_close(C.path_patch(*args, memory_budget_mb=2048),
                               C.path_patch(*args, memory_budget_mb=0.01), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- architectures

def _arch_spec(model_dir: Path, n_layers: int, n_heads: int) -> str:
    everything = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)] + \
        [f"mlp{layer}" for layer in range(n_layers)]
    last = n_layers - 1
    return textwrap.dedent(f"""\
        spec: arch-circuits
        models:
          a: {{path: "{model_dir}"}}
        prompts:
          - text: "This movie was really"
            corrupt: "This film was really"
            answer: " bad"
            foil: " good"
        prompt_sets:
          ref:
            - {{text: "This film was really", answer: " bad", foil: " good"}}
        claims:
          - {{id: attention, measure: attention, model: a, source: previous,
              expect: {{min: {{">=": 0}}, max: {{"<=": 1.0001}}}}}}
          - {{id: head_scores, measure: head_scores, model: a, role: induction,
              random_tokens: {{length: 6, count: 2}}, expect: {{min: {{">=": 0}},
              max: {{"<=": 1.0001}}}}}}
          - {{id: all_senders_direct, measure: path_patch, from: {{model: a, input: clean}},
              into: {{model: a, input: corrupt}}, senders: {everything}, path: resid,
              expect: {{between: [0.999, 1.001]}}}}
          - {{id: path_k_sweep, measure: path_patch, from: {{model: a, input: clean}},
              into: {{model: a, input: corrupt}}, path: k, receivers: [L{last}KV0],
              expect: {{max: {{">": -1.0e+9}}}}}}
          - {{id: whole_model_circuit, measure: circuit, model: a, members: {everything},
              kind: mean, reference: ref, expect: {{approx: 1.0, atol: 1.0e-3}}}}
          - {{id: minimality, measure: circuit, model: a, members: [L0H1, mlp{last}],
              kind: resample, reference: ref, metric: minimality,
              expect: {{max: {{">": -1.0e+9}}}}}}
          - {{id: ablate_resample, measure: ablate, model: a, site: z, heads: [L{last}H0],
              kind: resample, reference: {{prompts: ref}}, expect: {{between: [-1.0e+9, 1.0e+9]}}}}
        """)


@pytest.mark.parametrize("arch", ["pythia", "llama-gqa", "gemma", "gemma2", "phi3", "opt"])
def test_circuit_claims_run_on_every_architecture(tmp_path, arch):
    """Exact identities on every family: all components as senders through the final residual
    restore the `from` run (1); the whole model as a circuit is fully faithful (1)."""
    from harness.testing import TINY_ARCHITECTURES, build_tiny_checkpoint

    cfg = TINY_ARCHITECTURES[arch][1]
    n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    n_heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    model_dir = build_tiny_checkpoint(arch, tmp_path / "m", seed=0)
    spec = tmp_path / "arch.yaml"
    spec.write_text(_arch_spec(model_dir, n_layers, n_heads))
    verdicts = run_spec_file(spec, Session(verbose=False)).verdicts
    failed = {v.claim_id: v.message for v in verdicts if v.status != "passed"}
    assert not failed and len(verdicts) == 7, failed
