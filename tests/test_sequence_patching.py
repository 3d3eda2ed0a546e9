"""patch / patch_sweep / ablate with `metric: loss | accuracy` agree with the same computation
written here with TransformerLens hooks on the bridge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import TEST_DEVICE, load_bridge

from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec

PROMPTS = """\
  - text: "This movie was really good. The acting was"
    corrupt: "This film was really bad. The story was"
  - text: "The plot was fun"
    corrupt: "The plot was boring"
"""


def write(tmp_path, checkpoints, claims: str):
    path = tmp_path / "seqpatch.yaml"
    path.write_text(f'models:\n  a: {{path: "{checkpoints["a"]}"}}\n'
                    f'  b: {{path: "{checkpoints["b"]}"}}\nprompts:\n{PROMPTS}claims:\n{claims}')
    return path


def evaluate(path):
    session = Session(verbose=False, device=TEST_DEVICE)
    result = run_spec_file(path, session)
    assert result.error is None, result.error
    spec = load_spec(path)
    batch = session.batch(spec, spec.prompt_set(None), session.model(spec, "a"), True)
    return {v.claim_id: v for v in result.verdicts}, batch


def scored_mean(logits, targets, mask, metric: str) -> torch.Tensor:
    """Per prompt: mean cross-entropy or argmax accuracy over the scored positions."""
    logits, targets, mask = logits.float().cpu(), targets.cpu(), mask.cpu()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:], reduction="none")
    hit = (logits[:, :-1].argmax(-1) == targets[:, 1:]).float()
    value = ce if metric == "loss" else hit
    m = mask[:, 1:].float()
    return (value * m).sum(1) / m.sum(1)


def all_positions(batch) -> torch.Tensor:
    pos = torch.arange(batch.tokens.shape[1])
    return (pos[None] >= 1) & (pos[None] <= batch.final_pos[:, None])


def second_half(batch) -> torch.Tensor:
    pos = torch.arange(batch.tokens.shape[1])
    n = batch.final_pos[:, None]              # text tokens: 1..final (BOS at 0)
    return (pos[None] >= 1 + n - n // 2) & (pos[None] <= n)


def replace(source, mask_fn):
    def hook(act, hook):
        mask = mask_fn(act).to(act.device)
        return torch.where(mask, source[hook.name].to(act.device), act)
    return hook


def test_patch_heads_with_loss_matches_hooks(tmp_path, tiny_checkpoints):
    path = write(tmp_path, tiny_checkpoints, """\
  - {id: heads, measure: patch, from: b, into: a, site: z, heads: [L0H1, L1H0], metric: loss,
     expect: {">": -1000}}
  - {id: false-claim, measure: patch, from: b, into: a, site: z, heads: [L0H1, L1H0],
     metric: loss, expect: {">": 5}}
""")
    verdicts, batch = evaluate(path)
    a, b = load_bridge(tiny_checkpoints["a"]), load_bridge(tiny_checkpoints["b"])
    tokens, mask = batch.tokens.to(TEST_DEVICE), all_positions(batch)
    with torch.no_grad():
        _, cache = b.run_with_cache(tokens)
        heads = {0: 1, 1: 0}

        def head_mask(layer):
            def fn(act):
                m = torch.zeros(act.shape, dtype=torch.bool)
                m[:, :, heads[layer]] = True
                return m
            return fn
        hooks = [(f"blocks.{lay}.attn.hook_z", replace(cache, head_mask(lay))) for lay in heads]
        patched = scored_mean(a.run_with_hooks(tokens, fwd_hooks=hooks), tokens, mask, "loss")
        from_value = scored_mean(b(tokens), tokens, mask, "loss")
        into_value = scored_mean(a(tokens), tokens, mask, "loss")
    v = verdicts["heads"]
    assert v.extras["per_prompt_raw"] == pytest.approx(patched.tolist(), abs=1e-5)
    assert v.extras["from"] == pytest.approx(float(from_value.mean()), abs=1e-5)
    assert v.extras["into"] == pytest.approx(float(into_value.mean()), abs=1e-5)
    normalized = (patched.mean() - into_value.mean()) / (from_value.mean() - into_value.mean())
    assert v.measured == pytest.approx(float(normalized), abs=1e-4)
    assert v.status == "passed"
    assert verdicts["false-claim"].status == "failed"


def test_clean_corrupt_sweep_with_loss_matches_hooks(tmp_path, tiny_checkpoints):
    path = write(tmp_path, tiny_checkpoints, """\
  - id: sweep
    measure: patch_sweep
    from: {model: a, input: clean}
    into: {model: a, input: corrupt}
    site: resid_pre
    over: [layer, pos]
    metric: loss
    span: second_half
    expect: {max: {">": -1000}}
""")
    verdicts, batch = evaluate(path)
    a = load_bridge(tiny_checkpoints["a"])
    clean, corrupt = batch.tokens.to(TEST_DEVICE), batch.corrupt_tokens.to(TEST_DEVICE)
    mask = second_half(batch)
    grid = verdicts["sweep"].measured
    values, raw = torch.tensor(grid["values"]), torch.tensor(grid["raw"])
    n_layers, n_pos = a.cfg.n_layers, clean.shape[1]
    assert values.shape == (n_layers, n_pos)
    with torch.no_grad():
        _, cache = a.run_with_cache(clean)
        from_value = scored_mean(a(clean), clean, mask, "loss").mean()
        into_value = scored_mean(a(corrupt), clean, mask, "loss").mean()
        for layer in range(n_layers):
            for pos in range(n_pos):
                def at(act, pos=pos):
                    m = torch.zeros(act.shape, dtype=torch.bool)
                    m[:, pos] = True
                    return m
                hook = (f"blocks.{layer}.hook_resid_pre", replace(cache, at))
                patched = scored_mean(a.run_with_hooks(corrupt, fwd_hooks=[hook]), clean, mask,
                                      "loss").mean()
                assert float(raw[layer, pos]) == pytest.approx(float(patched), abs=1e-5)
                effect = (patched - into_value) / (from_value - into_value)
                assert float(values[layer, pos]) == pytest.approx(float(effect), abs=1e-4)


def test_ablations_with_loss_and_accuracy_match_hooks(tmp_path, tiny_checkpoints):
    path = write(tmp_path, tiny_checkpoints, """\
  - {id: zero-mlp, measure: ablate, model: a, site: mlp_out, layers: [0], metric: loss,
     reference: b, expect: {">": -1000}}
  - {id: zero-mlp-acc, measure: ablate, model: a, site: mlp_out, layers: [0],
     metric: accuracy, expect: {">": -1000}}
  - {id: mean-head, measure: ablate, model: a, site: z, heads: [L1H2], kind: mean,
     metric: loss, span: second_half, expect: {">": -1000}}
""")
    verdicts, batch = evaluate(path)
    a = load_bridge(tiny_checkpoints["a"])
    tokens = batch.tokens.to(TEST_DEVICE)
    with torch.no_grad():
        def zero(act, hook):
            return torch.zeros_like(act)
        mask = all_positions(batch)
        logits = a.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", zero)])
        ablated = scored_mean(logits, tokens, mask, "loss")
        clean = scored_mean(a(tokens), tokens, mask, "loss")
        reference = scored_mean(load_bridge(tiny_checkpoints["b"])(tokens), tokens, mask, "loss")
        v = verdicts["zero-mlp"]
        assert v.extras["per_prompt_raw"] == pytest.approx(ablated.tolist(), abs=1e-5)
        expected = (ablated.mean() - clean.mean()) / (reference.mean() - clean.mean())
        assert v.measured == pytest.approx(float(expected), abs=1e-4)
        accuracy = scored_mean(logits, tokens, mask, "accuracy")
        assert verdicts["zero-mlp-acc"].extras["per_prompt_raw"] == pytest.approx(accuracy.tolist())

        mask = second_half(batch)
        _, cache = a.run_with_cache(tokens)
        z = cache["blocks.1.attn.hook_z"][:, :, 2]          # [batch, pos, d_head]
        real = all_positions(batch).clone()
        real[:, 0] = True                                    # BOS is a real position
        mean = z[real.to(z.device)].mean(0)

        def mean_head(act, hook):
            act = act.clone()
            act[:, :, 2] = mean
            return act
        clean = scored_mean(a(tokens), tokens, mask, "loss")
        ablated = scored_mean(a.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z",
                                                                   mean_head)]),
                              tokens, mask, "loss")
        v = verdicts["mean-head"]
        assert v.extras["per_prompt_raw"] == pytest.approx(ablated.tolist(), abs=1e-5)
        reference = math.log(a.cfg.d_vocab)
        expected = (ablated.mean() - clean.mean()) / (reference - clean.mean())
        assert v.measured == pytest.approx(float(expected), abs=1e-4)


def test_results_do_not_depend_on_the_memory_budget(tiny_checkpoints):
    """One prompt and one variant per forward, or everything at once: the same grid."""
    from harness.measure import sequence_patching as sp

    a, b = load_bridge(tiny_checkpoints["a"]), load_bridge(tiny_checkpoints["b"])
    tokens = torch.tensor([[0, 5, 9, 12, 7, 3], [0, 8, 4, 6, 2, 2]])
    final = torch.tensor([5, 4])
    pos = torch.arange(6)
    score = (pos[None] >= 1) & (pos[None] <= final[:, None])
    grids = [sp.patch_sweep(b, tokens, a, tokens, tokens, score, "loss", site="z",
                            over=("layer", "head"), memory_budget_mb=budget)
             for budget in (1e-4, 2048)]
    torch.testing.assert_close(grids[0].raw, grids[1].raw)
    effects = [sp.patch(b, tokens, a, tokens, final, tokens, score, "accuracy", site="resid_pre",
                        layers=[1], positions=[-1], memory_budget_mb=budget).patched
               for budget in (1e-4, 2048)]
    torch.testing.assert_close(effects[0], effects[1])
