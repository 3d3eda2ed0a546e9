"""Feature claims on ground truth: a planted SAE whose feature 0 is a known residual direction.

The planted model is a tiny GPT-2 whose block 1 writes nothing and whose final LayerNorm has
no bias, so its logit difference is exactly (x . u_c) / std(x) for the residual x entering
block 1 and u_c the centred (answer - foil) unembedding direction (LayerNorm weight folded in).
Block 0's MLP output bias adds c * d with d = u_c / |u_c|: the model's preference for the
answer lives in direction d. The planted SAE's features are +-q_i for an orthonormal basis
whose first vector is d, so it reconstructs exactly and feature 0 reads relu(x . d).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, GPT2LMHeadModel

from harness.measure.features import hook_activations
from harness.models import load_model
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import ModelSource
from harness.testing import build_tiny_gpt2

HOOK = "blocks.1.hook_resid_pre"


def _planted_model(directory, c: float):
    path = build_tiny_gpt2(directory, n_layer=2, seed=0)
    model = GPT2LMHeadModel.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    answer, foil = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" bad", " good"))
    with torch.no_grad():
        block = model.transformer.h[1]
        for p in (block.attn.c_proj.weight, block.attn.c_proj.bias, block.mlp.c_proj.weight,
                  block.mlp.c_proj.bias, model.transformer.ln_f.bias):
            p.zero_()
        w_u = model.transformer.wte.weight
        u = model.transformer.ln_f.weight * (w_u[answer] - w_u[foil])
        d = u - u.mean()
        d = d / d.norm()
        model.transformer.h[0].mlp.c_proj.bias += c * d
    model.save_pretrained(str(path))
    return path, d


def _planted_sae(directory, d: torch.Tensor):
    n = d.numel()
    q, _ = torch.linalg.qr(torch.cat([d[:, None], torch.randn(n, n - 1,
                                      generator=torch.Generator().manual_seed(0))], 1))
    q = q * torch.sign(q[:, :1].T @ d)[0] if float(q[:, 0] @ d) < 0 else q
    assert torch.allclose(q[:, 0], d, atol=1e-5)
    dirs = torch.stack([s * q[:, i] for i in range(n) for s in (1.0, -1.0)])   # [2n, n]
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": dirs.T.contiguous(), "b_enc": torch.zeros(2 * n),
               "W_dec": dirs.contiguous(), "b_dec": torch.zeros(n)},
              str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(
        f'{{"architecture": "standard", "d_in": {n}, "d_sae": {2 * n}, "hook_name": "{HOOK}"}}')
    return directory


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    pos, d = _planted_model(root / "pos", 3.0)
    neg, _ = _planted_model(root / "neg", -3.0)
    return {"pos": pos, "neg": neg, "sae": _planted_sae(root / "sae", d), "root": root}


def _spec(planted, claims: str, gate: str = "") -> str:
    return textwrap.dedent(f"""\
        models:
          pos: {{path: "{planted['pos']}"}}
          neg: {{path: "{planted['neg']}"}}
        saes:
          planted: {{path: "{planted['sae']}"{gate}}}
        prompts:
          - text: "This movie was really"
            answer: " bad"
            foil: " good"
          - text: "The acting was"
            answer: " bad"
            foil: " good"
        claims:
        """) + textwrap.indent(textwrap.dedent(claims), "  ")


def _run(planted, claims: str, name: str = "spec", gate: str = ""):
    path = planted["root"] / f"{name}.yaml"
    path.write_text(_spec(planted, claims, gate))
    result = run_spec_file(path, Session(device="cpu", verbose=False))
    assert result.error is None, result.error
    return {v.claim_id: v for v in result.verdicts}


def test_feature_reads_the_planted_direction(planted):
    verdicts = _run(planted, """\
        - id: reads-d
          measure: feature
          model: pos
          sae: planted
          feature: 0
          expect: {">": 1.0}
        - id: opposite-is-silent
          measure: feature
          model: pos
          sae: planted
          feature: 1
          position: all
          expect: {"<": 1.0e-6}
        - id: false-claim-fails
          measure: feature
          model: pos
          sae: planted
          feature: 0
          expect: {"<": 0.5}
        """, "reads")
    assert verdicts["reads-d"].status == "passed", verdicts["reads-d"].message
    assert verdicts["opposite-is-silent"].status == "passed"
    assert verdicts["false-claim-fails"].status == "failed"
    # the measured value is relu(x . d) at each prompt's final token, computed directly
    source = ModelSource(path=str(planted["pos"]))
    model = load_model("pos", source, str(planted["pos"]), "cpu")
    direction = torch.tensor(_direction(planted))
    for text, got in zip(("This movie was really", "The acting was"),
                         verdicts["reads-d"].extras["per_prompt"]):
        tokens = model.bridge.to_tokens(text, prepend_bos=True)
        x = hook_activations(model.bridge, tokens, HOOK)[0, -1]
        assert got == pytest.approx(max(float(x @ direction), 0.0), abs=1e-4)
    gate = verdicts["reads-d"].extras["sae_gate"]["pos"]
    assert gate["variance_explained"] == pytest.approx(1.0, abs=1e-4)
    assert abs(gate["loss_increase"]) < 1e-3


def _direction(planted) -> list[float]:
    from safetensors.torch import load_file

    return load_file(str(planted["sae"] / "sae_weights.safetensors"))["W_dec"][0].tolist()


def test_ablating_the_feature_removes_the_behaviour(planted):
    verdicts = _run(planted, """\
        - id: clean-prefers-answer
          measure: logit_diff
          model: pos
          expect: {">": 0.5}
        - id: ablated-is-indifferent
          measure: feature_intervention
          model: pos
          sae: planted
          ablate: [0]
          expect: {between: [-1.0e-3, 1.0e-3]}
        - id: ablation-keeps-the-preference
          description: a false claim, must fail
          measure: feature_intervention
          model: pos
          sae: planted
          ablate: [0]
          expect: {">": 0.5}
        - id: ablating-another-feature-keeps-it
          measure: feature_intervention
          model: pos
          sae: planted
          ablate: [2, 4]
          expect: {">": 0.5}
        - id: steering-against-flips-it
          measure: feature_intervention
          model: pos
          sae: planted
          steer: {feature: 1, alpha: 20.0}
          expect: {"<": -0.5}
        - id: patching-the-feature-from-neg
          measure: feature_intervention
          model: pos
          sae: planted
          patch: {from: neg, features: [0, 1]}
          metric: change
          expect: {"<": -1.0}
        """, "ablate")
    for claim_id, verdict in verdicts.items():
        expected = "failed" if claim_id == "ablation-keeps-the-preference" else "passed"
        assert verdict.status == expected, (claim_id, verdict.message)
    ablated = verdicts["ablated-is-indifferent"]
    assert ablated.extras["clean"] > 0.5 and abs(ablated.extras["intervened"]) < 1e-3


def test_top_features_and_feature_diff_on_two_planted_models(planted):
    verdicts = _run(planted, """\
        - id: d-is-most-active
          measure: top_features
          model: pos
          sae: planted
          k: 1
          expect: {equals: [0]}
        - id: neg-reads-minus-d
          measure: top_features
          model: neg
          sae: planted
          k: 3
          expect: {includes: [1], excludes: [0]}
        - id: what-changed
          measure: feature_diff
          models: [pos, neg]
          sae: planted
          k: 2
          expect: {includes: [0, 1]}
        - id: feature-0-went-down
          measure: feature_diff
          models: [pos, neg]
          sae: planted
          feature: 0
          per_prompt: all
          expect: {"<": -1.0}   # relu(x . d) is about 3 in pos and 0 in neg
        """, "top")
    for claim_id, verdict in verdicts.items():
        assert verdict.status == "passed", (claim_id, verdict.message)


def test_unknown_sae_and_out_of_range_feature(planted):
    from harness.errors import SpecError
    from harness.spec import load_spec

    path = planted["root"] / "bad.yaml"
    path.write_text(_spec(planted, """\
        - id: typo
          measure: feature
          model: pos
          sae: plantd
          feature: 0
          expect: {">": 0}
        """))
    with pytest.raises(SpecError, match="unknown SAE 'plantd'; did you mean 'planted'"):
        load_spec(path)
    verdicts = _run(planted, """\
        - id: out-of-range
          measure: feature
          model: pos
          sae: planted
          feature: 999
          expect: {">": 0}
        """, "range")
    assert verdicts["out-of-range"].status == "error"
    assert "feature 999 is out of range" in verdicts["out-of-range"].message


def test_gate_turns_a_poor_reconstruction_into_an_error(planted, tmp_path):
    """An SAE with only the +-d features cannot reconstruct the residual stream."""
    from safetensors.torch import load_file

    from harness.errors import SpecError
    from harness.spec import load_spec

    w = load_file(str(planted["sae"] / "sae_weights.safetensors"))
    folder = tmp_path / "poor"
    folder.mkdir()
    save_file({"W_enc": w["W_enc"][:, :2].contiguous(), "b_enc": w["b_enc"][:2].contiguous(),
               "W_dec": w["W_dec"][:2].contiguous(), "b_dec": w["b_dec"]},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(f'{{"architecture": "standard", "hook_name": "{HOOK}"}}')
    claim = """\
        - id: gated
          measure: feature
          model: pos
          sae: planted
          feature: 0
          expect: {">": 0}
        """
    poor = dict(planted, sae=folder)
    verdict = _run(poor, claim, "poor")["gated"]
    assert verdict.status == "error"
    assert "variance explained" in verdict.message and "min_variance_explained" in \
        verdict.message
    lenient = _run(poor, claim, "lenient",
                   gate=", gate: {min_variance_explained: -10.0, max_loss_increase: 100.0}")
    assert lenient["gated"].status == "passed", lenient["gated"].message
    path = planted["root"] / "bad_gate.yaml"
    path.write_text(_spec(planted, claim, gate=", gate: {min_variance_explained: 1.5}"))
    with pytest.raises(SpecError, match="min_variance_explained"):
        load_spec(path)


def test_gate_fails_a_claim_whose_sae_was_trained_at_another_hook(tmp_path):
    """toy-reviews-sae reads blocks.3.hook_resid_pre; read at blocks.1 it must not pass."""
    path = tmp_path / "hook.yaml"
    path.write_text(textwrap.dedent("""\
        models:
          source: {zoo: toy-reviews-source}
        saes:
          right: {zoo: toy-reviews-sae}
          wrong: {zoo: toy-reviews-sae, hook: blocks.1.hook_resid_pre}
        prompts:
          - text: "This movie was really bad. The acting was"
            answer: " bad"
            foil: " good"
        claims:
          - id: right-hook
            measure: feature
            model: source
            sae: right
            feature: 0
            expect: {">": 0}
          - id: wrong-hook
            measure: feature
            model: source
            sae: wrong
            feature: 0
            expect: {">": 0}
        """))
    result = run_spec_file(path, Session(device="cpu", verbose=False))
    assert result.error is None, result.error
    right, wrong = result.verdicts
    assert right.status == "passed", right.message
    assert wrong.status == "error"
    assert "fails its reconstruction gate" in wrong.message and "blocks.1.hook_resid_pre" in \
        wrong.message


@pytest.mark.parametrize("architecture", ["pythia", "llama-gqa", "gemma2", "opt"])
def test_feature_claims_work_on_other_architectures(architecture, tmp_path):
    """A basis SAE (features +-q_i) reconstructs exactly, so on any architecture the gate must
    read variance explained 1 and no loss increase, and feature 0 must be relu(x . q_0) of the
    activation `run_with_cache` returns at the hook."""
    from harness.testing import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(architecture, tmp_path / architecture)
    source = ModelSource(path=str(model_dir))
    model = load_model("m", source, str(model_dir), "cpu")
    n = model.bridge.cfg.d_model
    q0 = torch.randn(n, generator=torch.Generator().manual_seed(5))
    _planted_sae(tmp_path / "sae", q0 / q0.norm())
    path = tmp_path / "arch.yaml"
    path.write_text(textwrap.dedent(f"""\
        models:
          m: {{path: "{model_dir}"}}
        saes:
          basis: {{path: "{tmp_path / 'sae'}", hook: blocks.1.hook_resid_pre}}
        prompts:
          - text: "This movie was really"
            answer: " bad"
            foil: " good"
        claims:
          - id: f0
            measure: feature
            model: m
            sae: basis
            feature: 0
            position: all
            reduce: mean
            expect: {{">=": 0}}
          - id: clean
            measure: logit_diff
            model: m
            expect: {{">": -1000}}
          - id: no-op-steer
            measure: feature_intervention
            model: m
            sae: basis
            steer: {{feature: 0, alpha: 0.0}}
            expect: {{">": -1000}}
        """))
    result = run_spec_file(path, Session(device="cpu", verbose=False))
    assert result.error is None, result.error
    f0, clean, steer = result.verdicts
    assert all(v.status == "passed" for v in result.verdicts), [v.message for v in
                                                                result.verdicts]
    gate = f0.extras["sae_gate"]["m"]
    assert gate["variance_explained"] == pytest.approx(1.0, abs=1e-4)
    assert abs(gate["loss_increase"]) < 1e-4
    tokens = model.bridge.to_tokens("This movie was really", prepend_bos=True)
    x = hook_activations(model.bridge, tokens, HOOK)[0, 1:]
    direction = torch.tensor(_direction({"sae": tmp_path / "sae"}))
    assert f0.measured == pytest.approx(float(torch.relu(x @ direction).mean()), abs=1e-4)
    assert steer.measured == pytest.approx(clean.measured, abs=1e-4)


def test_generation_with_feature_interventions_on_the_toy_models(tmp_path):
    """The source's greedy review of "I thought the plot" is positive; steering with the
    negative-sentiment feature, or patching it from the RLHF run, makes it negative."""
    path = tmp_path / "gen.yaml"
    path.write_text(textwrap.dedent("""\
        models:
          source: {zoo: toy-reviews-source}
          rlhf: {zoo: toy-reviews-rlhf}
        saes:
          reviews: {zoo: toy-reviews-sae}
        prompts:
          - text: "I thought the plot"
            answer: " bad"
            foil: " good"
        claims:
          - {id: plain, measure: generate, model: source, max_new_tokens: 6,
             expect: {contains: " good", not_contains: " bad"}}
          - {id: steered, measure: generate, model: source, max_new_tokens: 6,
             intervene: {sae: reviews, steer: {feature: 0, alpha: 30.0}},
             expect: {contains: " bad", not_contains: " good"}}
          - {id: patched, measure: generate, model: source, max_new_tokens: 6,
             intervene: {sae: reviews, patch: {from: rlhf, features: [0]}},
             expect: {contains: " bad", not_contains: " good"}}
          - {id: false-claim, measure: generate, model: source, max_new_tokens: 6,
             intervene: {sae: reviews, steer: {feature: 0, alpha: 30.0}},
             expect: {contains: " good"}}
        """))
    result = run_spec_file(path, Session(device="cpu", verbose=False))
    assert result.error is None, result.error
    status = {v.claim_id: (v.status, v.message) for v in result.verdicts}
    assert status["plain"][0] == "passed", status
    assert status["steered"][0] == "passed", status
    assert status["patched"][0] == "passed", status
    assert status["false-claim"][0] == "failed", status
    assert result.verdicts[2].models == ("source", "rlhf")
    assert set(result.verdicts[2].extras["sae_gate"]) == {"source", "rlhf"}


def test_token_position_rule(planted):
    verdicts = _run(planted, """\
        - id: at-was
          measure: feature
          model: pos
          sae: planted
          feature: 0
          position: {token: " was"}
          expect: {">": 0}
        - id: at-movie
          measure: feature
          model: pos
          sae: planted
          feature: 0
          position: {token: " movie"}
          expect: {">": 0}
        """, "token")
    assert verdicts["at-was"].status == "passed", verdicts["at-was"].message
    source = ModelSource(path=str(planted["pos"]))
    model = load_model("pos", source, str(planted["pos"]), "cpu")
    direction = torch.tensor(_direction(planted))
    for text, got in zip(("This movie was really", "The acting was"),
                         verdicts["at-was"].extras["per_prompt"]):
        tokens = model.bridge.to_tokens(text, prepend_bos=True)[0]
        was = model.tokenizer(" was", add_special_tokens=False)["input_ids"][0]
        where = int((tokens == was).nonzero()[-1])
        x = hook_activations(model.bridge, tokens[None], HOOK)[0, where]
        assert got == pytest.approx(max(float(x @ direction), 0.0), abs=1e-4)
    missing = verdicts["at-movie"]
    assert missing.status == "error"
    assert "does not occur in prompt 'The acting was'" in missing.message


def test_hub_sae_fails_fast_offline(planted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = planted["root"] / "hub.yaml"
    spec = _spec(planted, """\
        - id: hub
          measure: feature
          model: pos
          sae: planted
          feature: 0
          expect: {">": 0}
        """).replace(f'{{path: "{planted["sae"]}"}}',
                     '{hf: nobody/no-such-saes, folder: blocks.1.hook_resid_pre}')
    path.write_text(spec)
    result = run_spec_file(path, Session(device="cpu", verbose=False))
    assert result.error is None, result.error
    (verdict,) = result.verdicts
    assert verdict.status == "error"
    assert "nobody/no-such-saes" in verdict.message and "local HF cache" in verdict.message


def test_sae_of_another_width_is_an_error_that_says_so(planted, tmp_path):
    folder = _planted_sae(tmp_path / "narrow", torch.ones(16) / 4.0)
    verdicts = _run(dict(planted, sae=folder), """\
        - id: narrow
          measure: feature
          model: pos
          sae: planted
          feature: 0
          expect: {">": 0}
        """, "narrow")
    assert verdicts["narrow"].status == "error"
    assert "reads 16-dimensional activations" in verdicts["narrow"].message


def test_shipped_sae_and_its_cache(tmp_path, monkeypatch):
    import json

    from harness.saes import load_sae
    from harness.zoo import sae as zoo_sae_module
    from harness.zoo import zoo_checkpoint

    folder = zoo_sae_module.zoo_sae("toy-reviews-sae")
    sae = load_sae(folder)
    assert (sae.hook, sae.architecture, sae.layout) == ("blocks.3.hook_resid_pre", "standard",
                                                        "saelens")
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-4)
    assert (folder / "sae_weights.safetensors").stat().st_size < 300_000   # shipped small
    report = json.loads((folder / "build_report.json").read_text())
    assert report["results"]["heldout"]["variance_explained"] > 0.95
    assert report["results"]["feature0_mean_negative"] > 10 * \
        report["results"]["feature0_mean_positive"]
    # a finished build with the same content key is reused, not retrained
    source = zoo_checkpoint("toy-reviews-source")
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path))
    root = tmp_path / "sae" / zoo_sae_module.sae_key(source)
    root.mkdir(parents=True)
    (root / "build_report.json").write_text(json.dumps({"key": root.name}))
    monkeypatch.setattr(zoo_sae_module, "_build_into", lambda *a, **k: pytest.fail("rebuilt"))
    assert zoo_sae_module.build_sae(source, progress=False) == root
    with pytest.raises(Exception, match="unknown zoo SAE 'toy-reviews-sea'; did you mean"):
        zoo_sae_module.zoo_sae("toy-reviews-sea")


def test_planted_feature_against_the_other_features_of_its_sae(planted):
    """`against: random` on a feature: every other feature of the SAE (63, fewer than the
    100 asked: each measured once), and the planted one fires above them all; a silent
    feature is not significant."""
    verdicts = _run(planted, """\
        - id: planted-beats-chance
          measure: feature
          model: pos
          sae: planted
          feature: 0
          against: {random: 100}
          expect: {">": 1.0, significant: 0.05}
        - id: silent-does-not
          measure: feature
          model: pos
          sae: planted
          feature: 1
          against: {random: 100}
          expect: {significant: 0.05}
        """, "chance")
    beats, silent = verdicts["planted-beats-chance"], verdicts["silent-does-not"]
    assert beats.status == "passed", beats.message
    assert beats.extras["trust"]["p_value"] == 1 / 64 and beats.extras["trust"]["random"] == 63
    assert silent.status == "failed" and silent.extras["trust"]["p_value"] > 0.5
