"""`toy-reviews-sae`: a ReLU sparse autoencoder on the toy source model's residual stream.

Trained on the bridge's activations (compatibility mode, the numerics every claim reads) at
`blocks.3.hook_resid_pre` over toy-corpus reviews, BOS excluded. After training, features are
renumbered so the build is easy to state claims about: feature 0 is the feature whose mean
activation on negative reviews most exceeds its mean on positive ones, feature 1 the reverse,
then the rest by how often they fire. Saved in SAELens's layout. Cached by content (source
weights, config, library versions) like the rest of the zoo:
`python -m harness.zoo.sae --write-artifacts` rewrites harness/zoo/artifacts/toy-reviews-sae.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.zoo.store import (  # noqa: F401  (zoo_sae: public here too)
    ARTIFACTS,
    ZOO_SAES,
    cache_root,
    cached_build,
    content_key,
    model_identity,
    zoo_checkpoint,
    zoo_sae,
)

SOURCE = "toy-reviews-source"


@dataclass(frozen=True)
class SaeConfig:
    hook: str = "blocks.3.hook_resid_pre"
    d_sae: int = 256
    n_reviews: int = 3000
    n_heldout: int = 500
    steps: int = 1200
    batch_size: int = 256
    lr: float = 2e-3
    l1: float = 0.1              # L1 penalty on feature activations x decoder norms
    corpus_seed: int = 1       # not the source's pretraining corpus seed


def collect(bridge, tokenizer, texts: list[str], hook: str, batch: int = 256
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at `hook` for every non-BOS token of every text, and each row's text index."""
    from harness.prompts import encode, right_pad

    xs, owner = [], []
    pad = tokenizer.eos_token_id
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            rows = [encode(tokenizer, t, True) for t in texts[start:start + batch]]
            tokens, final = right_pad(rows, pad)
            _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == hook)
            pos = torch.arange(tokens.shape[1])
            mask = (pos[None] <= final[:, None]) & (pos[None] > 0)
            xs.append(cache[hook][mask].float())
            owner.append((torch.arange(len(rows))[:, None] + start).expand_as(mask)[mask])
    return torch.cat(xs), torch.cat(owner)


def train_sae(cfg: SaeConfig, x: torch.Tensor, seed: int, progress: bool = True):
    """Plain ReLU SAE: MSE + L1 (activations x decoder norms), Adam, unit decoder rows."""
    from harness.saes import Sae
    from harness.zoo.pretrain import _progress, deterministic

    d_in = x.shape[1]
    with deterministic(seed):
        W_dec = torch.randn(cfg.d_sae, d_in)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        params = {"W_enc": W_dec.T.clone().requires_grad_(),
                  "b_enc": torch.zeros(cfg.d_sae, requires_grad=True),
                  "W_dec": W_dec.clone().requires_grad_(),
                  "b_dec": x.mean(0).clone().requires_grad_()}
        opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(seed)
        scale = x.pow(2).sum(-1).mean()
        bar = _progress(cfg.steps, "train toy-reviews-sae", progress)
        for step in range(cfg.steps):
            xb = x[torch.randint(len(x), (cfg.batch_size,), generator=gen)]
            f = torch.relu((xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
            x_hat = f @ params["W_dec"] + params["b_dec"]
            mse = (x_hat - xb).pow(2).sum(-1).mean() / scale
            l1 = (f * params["W_dec"].norm(dim=1)).sum(-1).mean() / scale.sqrt()
            warm = min(1.0, (step + 1) / (cfg.steps * 0.1))   # L1 warm-up: fewer dead features
            loss = mse + cfg.l1 * warm * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(mse=f"{mse.item():.4f}", l0=f"{(f > 0).float().sum(-1).mean():.1f}")
        bar.close()
    # Fold the decoder norms into the encoder so decoder rows are unit vectors (same output).
    with torch.no_grad():
        norms = params["W_dec"].norm(dim=1).clamp_min(1e-8)
        return Sae(params["W_enc"].detach() * norms, params["b_enc"].detach() * norms,
                   params["W_dec"].detach() / norms[:, None], params["b_dec"].detach(),
                   hook=cfg.hook, model_name=SOURCE)


def renumber(sae, feats: torch.Tensor, negative: torch.Tensor):
    """Feature 0: most negative-review-specific; 1: most positive-specific; then by firing rate.
    Returns the renumbered SAE and the new order (old indices)."""
    from harness.saes import Sae

    mean_neg, mean_pos = feats[negative].mean(0), feats[~negative].mean(0)
    first, second = int((mean_neg - mean_pos).argmax()), int((mean_pos - mean_neg).argmax())
    rate = (feats > 0).float().mean(0)
    rest = [i for i in rate.argsort(descending=True).tolist() if i not in (first, second)]
    order = torch.tensor([first, second, *rest])
    return Sae(sae.W_enc[:, order], sae.b_enc[order], sae.W_dec[order], sae.b_dec,
               hook=sae.hook, model_name=sae.model_name), order


def sae_key(source_dir: Path, seed: int = 0, cfg: SaeConfig = SaeConfig()) -> str:
    """Content key: the source's weights, the config, the seed and the library versions."""
    return content_key({"sae": asdict(cfg), "seed": seed,
                        "source": model_identity(str(source_dir))})


def build_sae(source_dir: Path, seed: int = 0, out_dir: Path | None = None,
              progress: bool = True, cfg: SaeConfig = SaeConfig()) -> Path:
    """Build (or reuse) the SAE for the source checkpoint in `source_dir`; returns its folder."""
    key = sae_key(source_dir, seed, cfg)
    root = Path(out_dir) if out_dir is not None else cache_root() / "sae" / key
    return cached_build(root, key,
                        lambda work: _build_into(work, Path(source_dir), seed, cfg, progress),
                        "sae")


def _build_into(work: Path, source_dir: Path, seed: int, cfg: SaeConfig, progress: bool
                ) -> dict:
    from harness.measure.features import reconstruction
    from harness.models import load_model
    from harness.prompts import build_batch
    from harness.saes import save_saelens
    from harness.spec import ModelSource, Prompt
    from harness.zoo.corpus import generate_corpus
    from harness.zoo.pretrain import deterministic

    t0 = time.time()
    source = ModelSource(path=str(source_dir))
    model = load_model(SOURCE, source, str(source_dir), "cpu")
    reviews = generate_corpus(cfg.n_reviews + cfg.n_heldout, seed=cfg.corpus_seed)
    train, heldout = reviews[: cfg.n_reviews], reviews[cfg.n_reviews:]
    with deterministic(seed):
        x, owner = collect(model.bridge, model.tokenizer, [r.text for r in train], cfg.hook)
    t_collect = time.time() - t0
    sae = train_sae(cfg, x, seed, progress)
    negative = torch.tensor([train[i].label == 0 for i in owner.tolist()])
    with torch.no_grad():
        sae, order = renumber(sae, sae.encode(x), negative)
    t_train = time.time() - t0 - t_collect
    prompts = [Prompt(text=r.text, answer=" bad", foil=" good") for r in heldout]
    batch = build_batch(model.tokenizer, prompts, True, None)
    rec = reconstruction(model.bridge, sae, batch, True)
    with torch.no_grad():
        hx, howner = collect(model.bridge, model.tokenizer, [r.text for r in heldout], cfg.hook)
        hf = sae.encode(hx)
    hneg = torch.tensor([heldout[i].label == 0 for i in howner.tolist()])
    save_saelens(sae, work, {"model_name": SOURCE, "training": asdict(cfg), "seed": seed})
    stats = {"heldout": rec.as_dict(), "l0": round(float((hf > 0).float().sum(-1).mean()), 2),
             "dead_features": int(((hf > 0).sum(0) == 0).sum()),
             "feature0_mean_negative": round(float(hf[hneg, 0].mean()), 4),
             "feature0_mean_positive": round(float(hf[~hneg, 0].mean()), 4),
             "feature1_mean_negative": round(float(hf[hneg, 1].mean()), 4),
             "feature1_mean_positive": round(float(hf[~hneg, 1].mean()), 4),
             "trained_index_of_feature": order[:2].tolist(), "n_train_positions": len(x)}
    seconds = {"collect": round(t_collect, 2), "train": round(t_train, 2),
               "total": round(time.time() - t0, 2)}
    if progress:
        print(f"[build_sae] {seconds['total']:.1f} s; held-out {stats['heldout']}",
              file=sys.stderr)
    return {"seed": seed, "config": asdict(cfg), "seconds": seconds, "results": stats}


def write_artifacts(seed: int = 0, progress: bool = True) -> Path:
    """Rebuild the SAE from the shipped source checkpoint into artifacts/toy-reviews-sae."""
    dst = ARTIFACTS / ZOO_SAES[0]
    with tempfile.TemporaryDirectory() as tmp:
        built = build_sae(zoo_checkpoint(SOURCE), seed, Path(tmp) / "sae", progress)
        report = json.loads((built / "build_report.json").read_text())
        report.pop("key")
        (built / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(built, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.zoo.sae")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-artifacts", action="store_true",
                        help="rewrite harness/zoo/artifacts/toy-reviews-sae")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.write_artifacts:
        print(write_artifacts(args.seed, progress=not args.quiet))
    else:
        print(build_sae(zoo_checkpoint(SOURCE), args.seed, progress=not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
