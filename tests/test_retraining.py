"""Regression after retraining, end to end: rebuild the toy world with another seed, check the
spec's behavior claims still hold, and see what moved through baselines and `harness diff`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from harness.baselines import baseline_path
from harness.cli import main as harness_main
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec

REPO = Path(__file__).parent.parent
TOY_SPEC = REPO / "specs" / "toy_negative_reviews.yaml"
BEHAVIOR = ("logit_diff", "top_k", "generate")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def retrained_world(tmp_path_factory) -> dict[str, Path]:
    """The whole toy world rebuilt from scratch with seed 1 (corpus to RLHF)."""
    from harness.zoo import build_world

    return build_world(seed=1, out_dir=tmp_path_factory.mktemp("world") / "seed1",
                       progress=False)


def spec_on(world: dict[str, Path] | None, directory: Path, name: str) -> Path:
    """A copy of the toy spec whose zoo models point at `world`'s checkpoints."""
    text = TOY_SPEC.read_text()
    if world is not None:
        for zoo_name, path in world.items():
            text = text.replace(f"{{zoo: {zoo_name}}}", f'{{path: "{path}"}}')
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def behavior_ids(spec_file: Path) -> list[str]:
    spec = load_spec(spec_file)
    return [c.id for c in spec.claims
            if c.measure in BEHAVIOR and not getattr(c, "patch", None)
            and not getattr(c, "intervene", None)    # SAE claims: the SAE is seed 0's
            and c.id not in SEED_COIN_FLIPS]


# Claims that restate one pretraining seed's coin flip, not a behaviour retraining keeps: the
# source is undecided between " good" and " bad" (`source-is-undecided`: logit diff within
# ±1), so which one its greedy review of the plot picks is the seed's. Measured with
# transformers 5.25: seed 1's source writes "I thought the plot was bad. I thought the".
SEED_COIN_FLIPS = ("source-review-of-the-plot-is-positive",)


def test_behavior_claims_survive_retraining(retrained_world, tmp_path):
    assert all(p.is_dir() for p in retrained_world.values())
    spec_file = spec_on(retrained_world, tmp_path, "retrained")
    models = load_spec(spec_file).models
    assert all(m.path for m in models.values())   # every model really is the retrained one
    ids = behavior_ids(spec_file)
    assert len(ids) >= 10
    verdicts = {v.claim_id: v for v in run_spec_file(spec_file, Session(verbose=False)).verdicts}
    failed = {i: verdicts[i].message for i in ids if verdicts[i].status != "passed"}
    assert not failed, failed


def test_frozen_blocks_of_the_retrained_pair_are_identical(retrained_world, tmp_path):
    spec_file = spec_on(retrained_world, tmp_path, "retrained_lens")
    verdicts = {v.claim_id: v for v in run_spec_file(spec_file, Session(verbose=False)).verdicts}
    assert verdicts["frozen-blocks-identical"].status == "passed"


def test_baselines_and_drift_after_retraining(retrained_world, tmp_path, capsys):
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    before_spec = spec_on(None, tmp_path / "before", "toy")
    after_spec = spec_on(retrained_world, tmp_path / "after", "toy")
    for spec_file in (before_spec, after_spec):
        spec_file.write_text(spec_file.read_text().replace(
            "defaults:\n", "defaults:\n  baseline: true\n", 1))

    # baselines from the shipped models (seed 0)
    assert harness_main(["run", str(before_spec), "-q", "--update-baselines",
                         "--report-json", str(tmp_path / "before.json")]) == 0
    stored = json.loads(baseline_path(before_spec).read_text())["claims"]
    assert "rlhf-prefers-bad" in stored

    # the retrained models checked against them: values moved, so baseline claims fail
    shutil.copy(baseline_path(before_spec), baseline_path(after_spec))
    assert harness_main(["run", str(after_spec), "-q", "--report-json",
                         str(tmp_path / "after.json")]) == 1
    after = json.loads((tmp_path / "after.json").read_text())
    claims = {c["id"]: c for c in after["specs"][0]["claims"]}
    moved = claims["rlhf-prefers-bad"]
    assert moved["status"] == "failed" and moved["baseline"]["drift"] > 1e-3
    capsys.readouterr()

    # the drift table shows what moved
    assert harness_main(["diff", str(tmp_path / "before.json"),
                         str(tmp_path / "after.json")]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if " rlhf-prefers-bad " in line)
    assert re.search(r"passed\s+failed", row)
    print(table)   # shown with -s; the resolution note quotes it


def test_train_source_builds_through_the_recipe(tmp_path, monkeypatch):
    """A `train:` model in a spec: trained by the recipe (a few steps), cached, measurable,
    and its frozen blocks are identical to its base's."""
    monkeypatch.setenv("INTERP_HARNESS_CACHE", str(tmp_path / "cache"))
    spec_file = tmp_path / "trained.yaml"
    spec_file.write_text("""\
models:
  source: {zoo: toy-reviews-source}
  tuned:
    train: {recipe: rlhf-sentiment, base: source, target: negative, unfrozen_layers: 2,
            steps: 3, seed: 5, batch_size: 8, num_generations: 4}
prompts:
  - text: "This movie was really"
    answer: " bad"
    foil: " good"
claims:
  - id: tuned-measurable
    measure: logit_diff
    model: tuned
    expect: {between: [-20, 20]}
  - id: frozen-blocks-identical
    measure: logit_lens
    models: [source, tuned]
    expect: {same_below: 2, atol: 0}
""")
    verdicts = run_spec_file(spec_file, Session(verbose=False)).verdicts
    assert [v.status for v in verdicts] == ["passed", "passed"], [v.message for v in verdicts]
    built = list((tmp_path / "cache" / "rlhf").iterdir())
    assert len(built) == 1 and (built[0] / "recipe_key.txt").is_file()


def test_recipe_runs_in_two_processes(tmp_path):
    """TRL's multi-process path (what `accelerate launch --multi_gpu` starts), on two CPU
    processes with gloo via torchrun: one checkpoint, written once."""
    import os
    import subprocess
    import sys

    config = tmp_path / "rlhf.json"
    config.write_text(json.dumps({"steps": 2, "batch_size": 8, "num_generations": 4,
                                  "eval_prompts": 0, "n_prompts": 64, "seed": 3,
                                  "device": "cpu"}))
    env = dict(os.environ, INTERP_HARNESS_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                          "2", "-m", "harness.train", str(config)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (built,) = (tmp_path / "cache" / "rlhf").iterdir()
    assert run.stdout.strip().splitlines()[-1] == str(built)
    report = json.loads((built / "rlhf_report.json").read_text())
    assert report["processes"] == 2 and (built / "model.safetensors").is_file()
