"""The invariant behind issue 20's wrong verdicts, as a property: for every measure and
expectation, a claim built to be false fails - on the mean and per prompt (all, any, a
fraction) - and it fails in every front end (`harness run`, pytest, `harness merge`).

Each measure is measured once on the tiny checkpoints; hypothesis (derandomized, as in
test_spec_fuzz.py) then builds false claims from those values and judges them in one session.
"""

from __future__ import annotations

import json

import pytest
from _review_prompts import PROMPTS
from _tiny_models import TEST_DEVICE
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.claims import evaluate_claim
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec

PROPERTY = settings(max_examples=80, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))

RUNS = "from: {model: a, input: clean}, into: {model: a, input: corrupt}"

# measures whose value is one number per prompt (per_prompt applies)
SCALAR_CLAIMS = {
    "logit_diff": "measure: logit_diff, model: a",
    "loss": "measure: loss, model: a",
    "accuracy": "measure: accuracy, model: a",
    "ablate": "measure: ablate, model: a, site: mlp_out, layers: [1]",
    "ablate-raw": "measure: ablate, model: a, site: mlp_out, layers: [1], metric: logit_diff",
    "ablate-loss": "measure: ablate, model: a, site: mlp_out, layers: [0], metric: loss",
    "patch": f"measure: patch, {RUNS}, site: resid_pre, layers: [1]",
    "patch-raw": f"measure: patch, {RUNS}, site: resid_pre, layers: [1], metric: logit_diff",
    "path_patch": f"measure: path_patch, {RUNS}, senders: [L0H0, L0H1], path: resid",
    "attention": "measure: attention, model: a, source: previous, heads: [L1H0]",
    "circuit": "measure: circuit, model: a, members: [L0H0, mlp0, mlp1], kind: zero",
    "feature": "measure: feature, model: a, sae: ident, feature: 1",
    "feature_diff": "measure: feature_diff, models: [a, b], sae: ident, feature: 2",
    "feature_intervention": "measure: feature_intervention, model: a, sae: ident, "
                            "ablate: [0, 1, 2, 3], metric: change",
}
# measures whose value is one grid for all prompts
GRID_CLAIMS = {
    "dla": "measure: dla, model: a, by: component",
    "logit_lens": "measure: logit_lens, models: [a, b]",
    "patch_sweep": f"measure: patch_sweep, {RUNS}, site: resid_pre, over: [layer]",
    "head_scores": "measure: head_scores, model: a, role: previous_token, "
                   "random_tokens: {length: 6, count: 4}",
    "attention-grid": "measure: attention, model: a, source: previous",
}
LIST_CLAIMS = {   # tokens, text, features
    "top_k": "measure: top_k, model: a, k: 3",
    "generate": "measure: generate, model: a, max_new_tokens: 2",
    "top_features": "measure: top_features, model: a, sae: ident, k: 3",
}
NEVER = "@never-said@"
TRUE_LIST = {"top_k": {"excludes": [NEVER]}, "generate": {"not_contains": NEVER},
             "top_features": {"excludes": [10_000]}}


def _identity_sae(folder):
    """An SAE that reconstructs exactly: features +-e_i, so its gate passes."""
    import torch
    from safetensors.torch import save_file

    n = 32
    dirs = torch.cat([torch.eye(n), -torch.eye(n)])
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": dirs.T.contiguous(), "b_enc": torch.zeros(2 * n),
               "W_dec": dirs.contiguous(), "b_dec": torch.zeros(n)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": n, "d_sae": 2 * n,
        "hook_name": "blocks.1.hook_resid_pre"}))
    return folder


def spec_text(checkpoints, sae, claims: list[tuple[str, str, dict]], name: str) -> str:
    """A spec with the given (id, claim body, extra fields) claims."""
    lines = []
    for claim_id, body, extra in claims:
        fields = "".join(f", {k}: {json.dumps(v)}" for k, v in extra.items())
        lines.append(f"  - {{id: {claim_id}, {body}{fields}}}\n")
    return (f"spec: {name}\nmodels:\n  a: {{path: \"{checkpoints['a']}\"}}\n"
            f"  b: {{path: \"{checkpoints['b']}\"}}\nsaes:\n  ident: {{path: \"{sae}\"}}\n"
            f"prompts:\n{PROMPTS}claims:\n" + "".join(lines))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoints):
    """Every measure measured once (an always-true claim), and the session that did it."""
    root = tmp_path_factory.mktemp("false")
    sae = _identity_sae(root / "sae")
    probes = [(k, v, {"expect": {"approx": 0, "atol": 1e9}}) for k, v in SCALAR_CLAIMS.items()]
    probes += [(k, v, {"expect": {"max": {"<": 1e9}}}) for k, v in GRID_CLAIMS.items()]
    probes += [(k, v, {"expect": TRUE_LIST[k]}) for k, v in LIST_CLAIMS.items()]
    path = root / "probe.yaml"
    path.write_text(spec_text(tiny_checkpoints, sae, probes, "probe"))
    session = Session(verbose=False, device=TEST_DEVICE)
    result = run_spec_file(path, session)
    assert result.error is None, result.error
    measured = {}
    for v in result.verdicts:
        assert v.status == "passed", (v.claim_id, v.message)
        measured[v.claim_id] = v
    return {"root": root, "sae": sae, "session": session, "measured": measured,
            "checkpoints": tiny_checkpoints}


def _gap(x: float, extra: float) -> float:
    """A step past x that survives float rounding, plus `extra`."""
    return 1e-6 * (1 + abs(x)) + extra


def false_scalar_expect(op: str, values: list[float], extra: float) -> dict | None:
    """An expectation that each of `values` fails, or None when `op` cannot say that."""
    top, bottom = max(values), min(values)
    if op in (">", ">="):
        return {op: top + _gap(top, extra)}
    if op in ("<", "<="):
        return {op: bottom - _gap(bottom, extra)}
    if op == "between":
        low = top + _gap(top, extra)
        return {"between": [low, low + 1 + extra]}
    if op == "approx":
        atol = extra
        return {"approx": top + atol + _gap(top, 1.0), "atol": atol}
    if op == "sign":
        if all(v > 0 for v in values):
            return {"sign": "negative"}
        if all(v < 0 for v in values):
            return {"sign": "positive"}
    return None


def build_false_claim(world, measure: str, op: str, mode: str, prompt: int, extra: float,
                      fraction: float) -> tuple[dict, str] | None:
    """(the claim's extra fields, why it is false) for a scalar measure."""
    v = world["measured"][measure]
    per_prompt = v.extras["per_prompt"]
    if mode == "mean":        # the value the claim reports
        targets, fields = [v.measured], {}
    elif mode == "mean-all":  # false on the mean, so false on some prompt
        targets, fields = [v.measured], {"per_prompt": "all"}
    elif mode == "all":       # one prompt that fails is enough
        targets, fields = [per_prompt[prompt % len(per_prompt)]], {"per_prompt": "all"}
    elif mode == "any":       # every prompt fails
        targets, fields = per_prompt, {"per_prompt": "any"}
    else:                     # every prompt fails, so no positive fraction holds
        targets, fields = per_prompt, {"per_prompt": {"fraction": f">= {fraction}"}}
    expect = false_scalar_expect(op, targets, extra)
    if expect is None:
        return None
    return {**fields, "expect": expect}, f"{measure} {mode} {expect}"


def judge(world, claim_id: str, body: str, fields: dict):
    """The verdict of one claim, judged in the world's session (models already loaded)."""
    path = world["root"] / "one.yaml"
    path.write_text(spec_text(world["checkpoints"], world["sae"], [(claim_id, body, fields)],
                              "one"))
    return evaluate_claim(load_spec(path), 0, world["session"])


@PROPERTY
@given(measure=st.sampled_from(sorted(SCALAR_CLAIMS)),
       op=st.sampled_from([">", ">=", "<", "<=", "between", "approx", "sign"]),
       mode=st.sampled_from(["mean", "mean-all", "all", "any", "fraction"]),
       prompt=st.integers(0, 2), extra=st.floats(0, 10),
       fraction=st.floats(0.01, 1.0))
def test_a_false_claim_about_numbers_fails(world, measure, op, mode, prompt, extra, fraction):
    built = build_false_claim(world, measure, op, mode, prompt, extra, round(fraction, 3))
    assume(built is not None)
    fields, why = built
    verdict = judge(world, "claim", SCALAR_CLAIMS[measure], fields)
    assert verdict.status == "failed", (why, verdict.status, verdict.message)


@PROPERTY
@given(measure=st.sampled_from(sorted(GRID_CLAIMS)),
       op=st.sampled_from(["max", "min", "sum", "approx"]),
       compare=st.sampled_from([">", ">=", "<", "<=", "between"]), extra=st.floats(0, 10))
def test_a_false_claim_about_a_grid_fails(world, measure, op, compare, extra):
    import torch

    values = torch.tensor(world["measured"][measure].measured["values"]).flatten().tolist()
    if op == "approx":
        shifted = [x + extra + 1 for x in values]
        expect = {"approx": shifted, "atol": extra / 2}
    else:
        reduced = {"max": max, "min": min, "sum": sum}[op](values)
        expect = {op: false_scalar_expect(compare, [reduced], extra)}
    verdict = judge(world, "claim", GRID_CLAIMS[measure], {"expect": expect})
    assert verdict.status == "failed", (measure, expect, verdict.message)


@pytest.mark.parametrize("measure", sorted(LIST_CLAIMS))
@pytest.mark.parametrize("mode", ["mean", "all", "any"])
def test_a_false_claim_about_tokens_text_or_features_fails(world, measure, mode):
    if measure == "top_features":
        if mode != "mean":
            pytest.skip("one list for all prompts: per_prompt is a spec error")
        absent = next(i for i in range(64) if i not in world["measured"][measure].measured)
        fields = {"expect": {"includes": [absent]}}
    else:
        op = "includes" if measure == "top_k" else "contains"
        fields = {"expect": {op: [NEVER] if op == "includes" else NEVER}, "per_prompt": mode}
    verdict = judge(world, "claim", LIST_CLAIMS[measure], fields)
    assert verdict.status == "failed", (measure, mode, verdict.message)


# ----------------------------------------------------------------------------- front ends

def _false_suite(world) -> list[tuple[str, str, dict]]:
    """One false claim per measure and per_prompt mode (mean and all), fixed."""
    claims = []
    for measure, body in SCALAR_CLAIMS.items():
        for mode in ("mean", "mean-all", "all"):
            fields, _ = build_false_claim(world, measure, ">", mode, 1, 0.5, 1.0)
            claims.append((f"{measure}-{mode}", body, fields))
    for measure, body in GRID_CLAIMS.items():
        values = world["measured"][measure].measured["values"]
        top = max(_flat(values))
        claims.append((f"{measure}-max", body, {"expect": {"max": {">": top + 1}}}))
    claims.append(("top_k-all", LIST_CLAIMS["top_k"], {"expect": {"includes": [NEVER]}}))
    claims.append(("generate-all", LIST_CLAIMS["generate"], {"expect": {"contains": NEVER}}))
    return claims


def _flat(values) -> list[float]:
    return [x for v in values for x in _flat(v)] if isinstance(values, list) else [values]


def test_false_claims_fail_in_every_front_end(world, pytester):
    from harness.cli import main as harness_main

    claims = _false_suite(world)
    specs = pytester.mkdir("specs")
    pytester.mkdir("checks")
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n")
    spec = specs / "false-claims.yaml"
    spec.write_text(spec_text(world["checkpoints"], world["sae"], claims, "false-claims"))
    ids = {c[0] for c in claims}

    def statuses(report) -> dict:
        data = json.loads(report.read_text())
        return {c["id"]: c["status"] for s in data["specs"] for c in s["claims"]}

    parts = []   # harness run, in two shards: every claim once
    for k in (1, 2):
        parts.append(pytester.path / f"part{k}.json")
        assert harness_main(["run", str(spec), "-q", "--shard", f"{k}/2", "--report-json",
                             str(parts[-1])]) == 1
        assert set(statuses(parts[-1]).values()) == {"failed"}
    merged = pytester.path / "merged.json"
    assert harness_main(["merge", *map(str, parts), "--report-json", str(merged)]) == 1
    assert statuses(merged) == dict.fromkeys(ids, "failed")

    plugin = pytester.path / "plugin.json"
    result = pytester.runpytest("checks", f"--harness-report-json={plugin}")
    result.assert_outcomes(failed=len(ids))
    assert statuses(plugin) == dict.fromkeys(ids, "failed")
    assert harness_main(["merge", str(plugin)]) == 1
