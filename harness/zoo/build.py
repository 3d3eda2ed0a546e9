"""Build the toy world from scratch, cache it by content, and (re)write the shipped artifacts.

`build_world(seed)` runs corpus -> tokenizer -> source LM -> reward model -> RLHF into
`<cache root>/world/<key>`, where the key hashes the recipe configs, the seed and the versions
of torch / transformers / trl / harness (names, artifacts and the cache: `harness.zoo.store`).
`python -m harness.zoo.build --write-artifacts` rewrites harness/zoo/artifacts/ from
`build_world(seed=0)`, then retrains `toy-reviews-sae` on the new source (harness/zoo/sae.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from harness.zoo.store import (  # noqa: F401  (ZOO_NAMES, zoo_checkpoint: public here too)
    ARTIFACTS,
    ZOO_NAMES,
    cache_root,
    cached_build,
    content_key,
    versions,
    zoo_checkpoint,
)

log = logging.getLogger(__name__)


def world_configs(seed: int) -> dict:
    from harness.train import RLHFConfig
    from harness.zoo.induction import InductionConfig
    from harness.zoo.pretrain import RewardConfig, SourceConfig, TokenizerConfig

    return {"tokenizer": TokenizerConfig(), "source": SourceConfig(), "reward": RewardConfig(),
            "rlhf": RLHFConfig(seed=seed), "induction": InductionConfig()}


def world_key(seed: int) -> str:
    cfgs = world_configs(seed)
    return content_key({"seed": seed, **{k: asdict(v) for k, v in cfgs.items()}})


def build_world(seed: int = 0, out_dir: Path | None = None, progress: bool = True
                ) -> dict[str, Path]:
    """Build (or reuse) the three zoo models; returns {zoo name: checkpoint dir}.

    `out_dir=None` -> `<cache root>/world/<key>`. A dir that already holds a finished build
    with the same key is returned at once. Stage timings go to `build_report.json`.
    """
    key = world_key(seed)
    root = Path(out_dir) if out_dir is not None else cache_root() / "world" / key
    cached_build(root, key, lambda work: _build_into(work, seed, key, progress), "world")
    return {name: root / name for name in ZOO_NAMES}


def _build_into(work: Path, seed: int, key: str, progress: bool) -> dict:
    from dataclasses import replace

    from harness.train import run_rlhf
    from harness.zoo.pretrain import build_tokenizer, train_reward, train_source

    cfgs = world_configs(seed)
    stages: dict[str, float] = {}
    results: dict[str, dict] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = round(time.time() - t0, 2)
        msg = f"[build_world] {name}: {stages[name]:.1f} s"
        log.info(msg)
        if progress:
            print(msg, file=sys.stderr)

    t_all = time.time()
    t0 = time.time()
    tok_dir = work / "tokenizer"
    tokenizer = build_tokenizer(cfgs["tokenizer"], seed, tok_dir)
    stage("tokenizer", t0)

    t0 = time.time()
    source = work / "toy-reviews-source"
    results["source"] = train_source(cfgs["source"], tokenizer, seed, source, progress)
    stage("source", t0)

    t0 = time.time()
    reward = work / "toy-reviews-reward"
    results["reward"] = train_reward(cfgs["reward"], tokenizer, seed, reward, progress)
    stage("reward", t0)

    t0 = time.time()
    rlhf = work / "toy-reviews-rlhf"
    rcfg = replace(cfgs["rlhf"], base=str(source), reward=str(reward))
    rl = run_rlhf(rcfg, rlhf, progress=progress)
    (rlhf / "rlhf_report.json").unlink()     # paths inside it name the temp dir
    results["rlhf"] = {k: rl[k] for k in ("before", "after", "logit_diff", "greedy")}
    results["rlhf"]["final_log"] = rl["history"][-1] if rl["history"] else None
    stage("rlhf", t0)

    t0 = time.time()
    from harness.zoo.induction import train_induction
    results["induction"] = train_induction(cfgs["induction"], seed, work / "toy-induction",
                                           progress)
    stage("induction", t0)
    shutil.rmtree(tok_dir)
    stages["total"] = round(time.time() - t_all, 2)
    return {"key": key, "seed": seed, "versions": versions(), "stage_seconds": stages,
            "configs": {k: asdict(v) for k, v in cfgs.items()}, "results": results}


def write_artifacts(seed: int = 0, progress: bool = True) -> Path:
    """Rebuild the world into a fresh dir and copy the three checkpoints to artifacts/."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_world(seed=seed, out_dir=Path(tmp) / "world", progress=progress)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name, src in paths.items():
            dst = ARTIFACTS / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
        report = json.loads((Path(tmp) / "world" / "build_report.json").read_text())
        report.pop("key")
        (ARTIFACTS / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    from harness.zoo.sae import write_artifacts as write_sae  # trained on the new source

    write_sae(seed, progress)
    return ARTIFACTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.zoo.build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="build dir (default: cache)")
    parser.add_argument("--write-artifacts", action="store_true",
                        help="rewrite harness/zoo/artifacts/ from a fresh build")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.write_artifacts:
        print(write_artifacts(args.seed, progress=not args.quiet))
    else:
        for name, path in build_world(args.seed, args.out, progress=not args.quiet).items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
