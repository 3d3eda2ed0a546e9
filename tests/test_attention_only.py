"""Attention-only models: TransformerLens-format checkpoint folders (no HF architecture) load
on the bridge's native model, and every claim kind that does not need an MLP runs on them.

Ground truth: the general path agrees cell by cell with TransformerLens's own `patching`
functions on the same bridge; restoring a whole run gives effect 1; DLA pieces sum to the
model's logit difference. A claim on an MLP site is a spec error before any weights load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny_models import TEST_DEVICE, assert_close, clean_and_corrupt

from harness.measure.attribution import dla, logit_lens
from harness.measure.patching import PatchingEngine, Run
from harness.models import load_model
from harness.prompts import PromptBatch
from harness.spec import ModelSource
from harness.testing import build_tiny_tl_checkpoint

tl_patching = pytest.importorskip("transformer_lens.patching")

PROMPTS = ["This movie was really", "The acting was"]
ANSWER, FOIL = [10, 20], [30, 40]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn-only")
    return {"a": build_tiny_tl_checkpoint(root / "a", seed=0),
            "b": build_tiny_tl_checkpoint(root / "b", seed=1, weights="pth"),
            "mlp": build_tiny_tl_checkpoint(root / "mlp", seed=2, attn_only=False)}


@pytest.fixture(scope="module")
def model(folders):
    return load_model("a", ModelSource(path=str(folders["a"])), str(folders["a"]), TEST_DEVICE)


def _setup(bridge):
    """Clean and corrupt tokens of equal length (column 1 changed), final positions, ids."""
    return clean_and_corrupt(bridge, PROMPTS, ANSWER, FOIL)


def test_loads_as_an_attention_only_bridge(folders, model):
    bridge = model.bridge
    assert bridge.cfg.attn_only and bridge.cfg.n_layers == 2 and bridge.cfg.n_heads == 4
    assert "blocks.0.hook_mlp_out" not in bridge.hook_dict
    assert not any(name.startswith("blocks.0.mlp.") for name in bridge.hook_dict)
    # the weights are the folder's, not boot_native's random ones: a second load agrees, and a
    # differently seeded folder (legacy .pth layout) gives other logits
    again = load_model("a2", ModelSource(path=str(folders["a"])), str(folders["a"]),
                       TEST_DEVICE).bridge
    other = load_model("b", ModelSource(path=str(folders["b"])), str(folders["b"]),
                       TEST_DEVICE).bridge
    tokens = _setup(bridge)[0]
    with torch.no_grad():
        assert_close(again(tokens), bridge(tokens), atol=0, rtol=0)
        assert (other(tokens) - bridge(tokens)).abs().max() > 1e-2
    assert model.plain_hf() is None     # no HF model: generation uses the bridge's loop


def test_general_path_matches_transformer_lens(model):
    bridge = model.bridge
    tokens, corrupt, final_pos, answer, foil = _setup(bridge)
    rows = torch.arange(len(tokens))

    def metric(logits):
        final = logits[rows, final_pos]
        return (final[rows, answer] - final[rows, foil]).mean()

    engine = PatchingEngine()
    clean, dirty = Run("a", bridge, tokens, final_pos), Run("a", bridge, corrupt, final_pos)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
    for fn_name, site, over in [("get_act_patch_resid_pre", "resid_pre", ("layer", "pos")),
                                ("get_act_patch_attn_out", "attn_out", ("layer", "pos")),
                                ("get_act_patch_attn_head_out_all_pos", "z", ("layer", "head")),
                                ("get_act_patch_attn_head_v_all_pos", "v", ("layer", "head")),
                                ("get_act_patch_attn_head_pattern_all_pos", "pattern",
                                 ("layer", "head"))]:
        with torch.no_grad():
            expected = getattr(tl_patching, fn_name)(bridge, corrupt, cache, metric).float()
        grid = engine.patch_sweep(clean, dirty, answer, foil, site=site, over=over)
        assert grid.extras["path"] == "general"
        assert_close(grid.raw, expected.cpu(), atol=1e-4, rtol=0)
    restored = engine.patch_sweep(clean, dirty, answer, foil, site="resid_pre", over=("layer",))
    assert_close(restored.values, torch.ones_like(restored.values), atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="mlp_out"):
        engine.patch_sweep(clean, dirty, answer, foil, site="mlp_out", over=("layer",))


def test_dla_sums_to_the_logit_diff(model):
    bridge = model.bridge
    tokens, _, final_pos, answer, foil = _setup(bridge)
    with torch.no_grad():
        final = bridge(tokens)[torch.arange(2), final_pos]
    expected = (final[torch.arange(2), answer] - final[torch.arange(2), foil]).float().cpu()
    batch = PromptBatch(texts=tuple(PROMPTS), tokens=tokens, final_pos=final_pos,
                        answer_ids=answer, foil_ids=foil)
    for by in ("component", "layer", "head"):
        assert_close(dla(bridge, batch, by=by).extras["per_prompt"].sum(0), expected,
                     atol=1e-4, rtol=1e-4)
    assert_close(logit_lens(bridge, batch).extras["per_prompt"][-1], expected, atol=1e-4,
                 rtol=1e-4)


SPEC = """\
    spec: attention-only
    models:
      a: {{path: "{a}"}}
      b: {{path: "{b}"}}
    prompts:
      - {{text: "This movie was really", corrupt: "This film was really", answer: " bad",
         foil: " good"}}
    claims:
      - {{id: logit_diff, measure: logit_diff, model: a, expect: {{">": -1000}}}}
      - {{id: top_k, measure: top_k, model: a, k: 3, expect: {{excludes: [" zzz"]}}}}
      - {{id: generate, measure: generate, model: a, max_new_tokens: 3,
         expect: {{contains: "This movie"}}}}
      - {{id: generate_patched, measure: generate, model: a, max_new_tokens: 3,
         patch: {{from: b, site: attn_out, layers: [1]}}, expect: {{contains: "This movie"}}}}
      - {{id: dla, measure: dla, model: a, by: head, expect: {{sum: {{">": -1000}}}}}}
      - {{id: lens, measure: logit_lens, models: [a, b], expect: {{max: {{">": -1000}}}}}}
      - {{id: restore, measure: patch, from: {{model: a, input: clean}},
         into: {{model: a, input: corrupt}}, site: resid_post, layers: [1],
         expect: {{between: [0.999, 1.001]}}}}
      - {{id: heads, measure: patch_sweep, from: b, into: a, site: z, over: [layer, head],
         expect: {{max: {{">": -1.0e+9}}}}}}
      - {{id: attribution, measure: patch_sweep, from: b, into: a, site: attn_out,
         over: [layer, pos], method: attribution, expect: {{max: {{">": -1.0e+9}}}}}}
      - {{id: ablate, measure: ablate, model: a, site: z, heads: [L0H0], kind: mean,
         expect: {{between: [-1.0e+9, 1.0e+9]}}}}
    """


def test_every_claim_kind_runs_through_a_spec(tmp_path, folders):
    from harness.runner import run_spec_file
    from harness.session import Session

    spec = tmp_path / "attn.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(a=folders["a"], b=folders["b"])))
    result = run_spec_file(spec, Session(verbose=False, device=TEST_DEVICE))
    assert result.error is None
    statuses = {v.claim_id: (v.status, v.message) for v in result.verdicts}
    assert len(statuses) == 10
    assert all(status == "passed" for status, _ in statuses.values()), statuses


def test_an_mlp_site_is_a_spec_error_before_loading(tmp_path, folders):
    """`harness validate` reads the TransformerLens config.json: mlp_out and neurons on an
    attention-only model are errors naming the line; the model with MLPs accepts them."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(textwrap.dedent(f"""\
        spec: bad
        models:
          a: {{path: "{folders['a']}"}}
          m: {{path: "{folders['mlp']}"}}
        prompts:
          - {{text: "This movie was really", answer: " bad", foil: " good"}}
        claims:
          - {{id: no-mlp, measure: ablate, model: a, site: mlp_out, layers: [0],
             expect: {{">": 0}}}}
          - {{id: has-mlp, measure: ablate, model: m, site: mlp_post, layers: [0],
             neurons: [3], expect: {{">": -1000}}}}
          - {{id: no-layer-5, measure: ablate, model: a, site: z, heads: [L5H0],
             expect: {{">": 0}}}}
        """))
    out = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(spec)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "Traceback" not in text
    assert "bad.yaml:8: claims[0].site" in text and "attention-only" in text
    assert "bad.yaml:12: claims[2].heads[0]: layer 5 is out of range" in text
    assert "bad.yaml:10" not in text      # the model with MLPs has mlp_post neuron 3


def test_config_and_weights_problems_are_clear(tmp_path, folders):
    from harness.errors import ModelUnavailable
    from harness.tl_checkpoints import load_bridge, read_config

    assert read_config(folders["a"])["attn_only"] is True
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((folders["a"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "n_heads": 2, "d_head": 16}))
    (broken / "model.safetensors").write_bytes((folders["a"] / "model.safetensors").read_bytes())
    with pytest.raises(ModelUnavailable, match="do not fit its config.json"):
        load_bridge(broken, None, "cpu", torch.float32)
    (broken / "model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(ModelUnavailable, match="cannot read"):
        load_bridge(broken, None, "cpu", torch.float32)
