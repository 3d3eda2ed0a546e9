"""The `rlhf-sentiment` recipe: the seed's RLHF run (trlx PPO) redone with TRL's RLOOTrainer.

Procedure (as in the seed notebook): policy = a copy of the base LM with everything frozen
except the last `unfrozen_layers` transformer blocks (embeddings, position embeddings, the
final LayerNorm and the tied unembedding stay frozen, so the logit lens of frozen layers is
unchanged); reward = a sentiment classifier's probability of `target` ("negative" in the
seed), read through `transformers.pipeline("sentiment-analysis")`; a KL penalty to the
frozen reference (the base model) with weight `beta` is subtracted from the reward;
prompts = the first `prompt_words` words of movie reviews.

The same code runs the toy world (base `toy-reviews-source`, reward `toy-reviews-reward`,
prompts from the toy corpus, CPU) and the seed's real setup (base `lvwerra/gpt2-imdb`,
reward `lvwerra/distilbert-imdb`, prompts from the `imdb` dataset, a GPU): see
docs/toy-world.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from harness.errors import HarnessError

RECIPES = ("rlhf-sentiment",)
TOY_PROMPTS = "toy-reviews"


@dataclass(frozen=True)
class RLHFConfig:
    """One `rlhf-sentiment` run. `base`/`reward`: zoo name, local checkpoint dir or hub id.

    `prompts`: "toy-reviews" (the toy corpus) or a Hugging Face dataset name such as "imdb"
    (loaded with `datasets.load_dataset(prompts, split=prompt_split)`, text column
    `prompt_column`); each prompt is the first `prompt_words` words of a review.
    """
    base: str = "toy-reviews-source"
    reward: str = "toy-reviews-reward"
    target: str = "negative"
    unfrozen_layers: int = 2
    steps: int = 150
    seed: int = 0
    beta: float = 0.05                 # KL penalty weight (KL to the frozen base, in the reward)
    learning_rate: float = 2e-3
    batch_size: int = 32               # completions per optimizer step
    num_generations: int = 4           # completions per prompt (RLOO's leave-one-out group)
    max_new_tokens: int = 10
    temperature: float = 1.0
    prompts: str = TOY_PROMPTS
    prompt_split: str = "train+test"
    prompt_column: str = "text"
    prompt_words: int = 4
    n_prompts: int = 4096              # prompts used (the first n of the dataset / corpus)
    prepend_bos: bool = True           # put the tokenizer's BOS before each prompt
    device: str = "auto"               # "auto" (cuda if available), "cpu", "cuda"
    eval_prompts: int = 128            # for the before/after report (0: skip)
    recipe: str = "rlhf-sentiment"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            from harness.errors import did_you_mean
            raise HarnessError(f"unknown training recipe '{self.recipe}'"
                               + did_you_mean(self.recipe, RECIPES))
        if self.target not in ("negative", "positive"):
            raise HarnessError(f"target must be 'negative' or 'positive', not '{self.target}'")
        if self.unfrozen_layers < 1:
            raise HarnessError("unfrozen_layers must be at least 1")
        if self.batch_size % self.num_generations:
            raise HarnessError("batch_size must be a multiple of num_generations")

    @classmethod
    def from_dict(cls, d: dict) -> RLHFConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            from harness.errors import did_you_mean
            bad = sorted(unknown)[0]
            raise HarnessError(f"unknown training option '{bad}'" + did_you_mean(bad, known))
        return cls(**d)


# --- resolving models and prompts ----------------------------------------------------------

def resolve_model(name: str) -> str:
    """Zoo name -> its shipped dir (a packaged GGUF converted); an existing local dir ->
    itself; else a hub id (`sources.locate_name`)."""
    from harness.sources import locate_name

    return locate_name(name)


def check_trainable(location: str, role: str = "base") -> None:
    """Refuse, before anything loads, a local model folder TRL cannot train.

    TRL's trainer rebuilds the model from `config.architectures[0]`; a folder whose
    config.json lacks it (as a naive GGUF conversion writes it) loads fine and then crashes
    the trainer with a bare `TypeError: 'NoneType' object is not subscriptable`.
    """
    directory = Path(location)
    if not directory.is_dir():
        return   # a hub id: transformers checks what it downloads
    from harness.static_checks import folder_problem
    problem = folder_problem(directory)
    if problem:
        raise HarnessError(f"{role} model {directory}: {problem}")
    config = json.loads((directory / "config.json").read_text())
    if config.get("architectures"):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")), "<ModelClass>")
    raise HarnessError(
        f"{role} model {directory}: config.json has no `architectures`, which TRL's trainer "
        f"needs to rebuild the model; add \"architectures\": [\"{cls}\"] to "
        f"{directory / 'config.json'} (a GGUF file loaded with `gguf:` is converted with it)")


def load_prompts(cfg: RLHFConfig) -> list[str]:
    if cfg.prompts == TOY_PROMPTS:
        from harness.zoo.corpus import review_prompts
        return review_prompts(cfg.n_prompts, n_words=cfg.prompt_words, seed=cfg.seed)
    try:
        from datasets import load_dataset
        data = load_dataset(cfg.prompts, split=cfg.prompt_split)
    except Exception as exc:  # noqa: BLE001 - any loader failure is "unavailable" to the user
        raise HarnessError(f"could not load prompt dataset '{cfg.prompts}': {exc}") from exc
    texts = data[cfg.prompt_column][: cfg.n_prompts]
    return [" ".join(t.split()[: cfg.prompt_words]) for t in texts]


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM (GPT-2's `transformer.h` and the like)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise HarnessError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def freeze_all_but_last(model, unfrozen_layers: int) -> list[str]:
    """Freeze every parameter, then unfreeze the last `unfrozen_layers` blocks.

    Returns the names of the trainable parameters. Embeddings, final norm and (tied)
    unembedding stay frozen.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = transformer_blocks(model)
    if unfrozen_layers > len(blocks):
        raise HarnessError(f"unfrozen_layers={unfrozen_layers} but the model has "
                           f"{len(blocks)} blocks")
    for block in list(blocks)[len(blocks) - unfrozen_layers:]:
        for p in block.parameters():
            p.requires_grad_(True)
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        out_emb.weight.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate_policy(model, ref_model, tokenizer, reward, prompts: list[str], cfg: RLHFConfig,
                    seed: int) -> dict:
    """Mean reward of sampled completions and mean sequence KL(policy || ref) on them."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rewards, kls = [], []
    prefix = tokenizer.bos_token if cfg.prepend_bos and tokenizer.bos_token else ""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), 32):
            chunk = prompts[start:start + 32]
            enc = tokenizer([prefix + p for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            seq = ids
            full_mask = mask
            logp_pol = torch.zeros(len(chunk), device=device)
            logp_ref = torch.zeros(len(chunk), device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            step_ids, caches = ids, [None, None]   # key/value caches: each token read once
            for _ in range(cfg.max_new_tokens):
                pos = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
                logps = []
                for i, m in enumerate((model, ref_model)):
                    out = m(step_ids, attention_mask=full_mask, position_ids=pos,
                            cache=caches[i], use_cache=True)
                    caches[i] = out.cache
                    logps.append(torch.log_softmax(out.logits[:, -1].float()
                                                   / cfg.temperature, -1))
                lp, lr = logps
                nxt = torch.multinomial(lp.exp().cpu(), 1, generator=gen).to(device)[:, 0]
                nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
                live = (~done).float()
                logp_pol += live * lp.gather(-1, nxt[:, None])[:, 0]
                logp_ref += live * lr.gather(-1, nxt[:, None])[:, 0]
                seq = torch.cat([seq, nxt[:, None]], 1)
                step_ids = nxt[:, None]
                full_mask = torch.cat([full_mask, (~done).long()[:, None]], 1)
                done = done | (nxt == tokenizer.eos_token_id)
            completions = tokenizer.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)
            rewards += reward.score([p + c for p, c in zip(chunk, completions)], cfg.target)
            kls += (logp_pol - logp_ref).tolist()
    finally:
        tokenizer.padding_side = old_side
    return {"mean_reward": sum(rewards) / len(rewards), "mean_kl": sum(kls) / len(kls)}


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 10, prepend_bos: bool = True
           ) -> str:
    prefix = tokenizer.bos_token if prepend_bos and tokenizer.bos_token else ""
    device = next(model.parameters()).device
    ids = tokenizer(prefix + prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def logit_diff(model, tokenizer, prompt: str = "This movie was really", answer: str = " bad",
               foil: str = " good", prepend_bos: bool = True) -> float:
    """logit(answer) - logit(foil) at the final position (the seed's metric)."""
    prefix = tokenizer.bos_token if prepend_bos and tokenizer.bos_token else ""
    ids = tokenizer(prefix + prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    a, f = tokenizer.encode(answer), tokenizer.encode(foil)
    if len(a) != 1 or len(f) != 1:
        raise HarnessError(f"'{answer}' and '{foil}' must be single tokens")
    logits = model(ids.to(next(model.parameters()).device)).logits[0, -1]
    return float(logits[a[0]] - logits[f[0]])


# --- training ------------------------------------------------------------------------------

class _RewardFn:
    """TRL reward callable: prompt + completion -> reward model's score for the target."""

    def __init__(self, reward, target: str, strip: str):
        self.reward, self.target, self.strip = reward, target, strip
        self.__name__ = f"sentiment_{target}"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = [p.removeprefix(self.strip) + c for p, c in zip(prompts, completions)]
        return self.reward.score(texts, self.target)


def _progress_callback(total: int, enabled: bool, history: list):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=total, desc="rlhf-sentiment", disable=not enabled,
                            leave=False)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "reward" in logs:
                history.append({"step": state.global_step, "reward": logs.get("reward"),
                                "kl": logs.get("kl")})
                self.bar.set_postfix(reward=f"{logs['reward']:.3f}",
                                     kl=f"{logs.get('kl', float('nan')):.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return Progress()


def _positions_from_mask(module, args, kwargs):
    """Forward pre-hook: position ids that skip left padding, when none are given.

    TRL computes log-probabilities with `model(input_ids, attention_mask)` and no position
    ids, while `generate` derives them from the attention mask. For models with absolute
    position embeddings (GPT-2) that silently shifts every left-padded prompt by its padding
    during training; this hook makes both agree.
    """
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if (kwargs.get("position_ids") is None and mask is not None and ids is not None
            and kwargs.get("past_key_values") is None and mask.shape == ids.shape):
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return args, kwargs


def _device(cfg: RLHFConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def run_rlhf(cfg: RLHFConfig, out_dir: Path, progress: bool = True) -> dict:
    """Train into `out_dir` (model + tokenizer + rlhf_report.json); returns the report."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    from harness.zoo.pretrain import deterministic
    from harness.zoo.reward import SentimentReward

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, reward_id = resolve_model(cfg.base), resolve_model(cfg.reward)
    check_trainable(base)
    device = _device(cfg)
    use_cpu = device == "cpu"
    prompts = load_prompts(cfg)
    history: list[dict] = []
    with deterministic(cfg.seed, threads=2 if use_cpu else torch.get_num_threads()):
        tokenizer = AutoTokenizer.from_pretrained(base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        trainable = freeze_all_but_last(policy, cfg.unfrozen_layers)
        reward = SentimentReward(reward_id, device=device)
        prefix = tokenizer.bos_token if cfg.prepend_bos and tokenizer.bos_token else ""
        eval_prompts = load_prompts(replace(cfg, seed=cfg.seed + 1, n_prompts=cfg.eval_prompts)) \
            if cfg.prompts == TOY_PROMPTS else prompts[-cfg.eval_prompts:]
        before = evaluate_policy(policy.to(device), ref.to(device), tokenizer, reward,
                                 eval_prompts, cfg, seed=cfg.seed) if cfg.eval_prompts else {}
        with tempfile.TemporaryDirectory() as tmp:
            args = RLOOConfig(
                output_dir=tmp, max_steps=cfg.steps, learning_rate=cfg.learning_rate,
                lr_scheduler_type="constant", warmup_steps=0,
                per_device_train_batch_size=cfg.batch_size,
                num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
                temperature=cfg.temperature, beta=cfg.beta, seed=cfg.seed, data_seed=cfg.seed,
                use_cpu=use_cpu, bf16=False, fp16=False, gradient_checkpointing=False,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, max_grad_norm=1.0,
            )
            trainer = RLOOTrainer(
                model=policy, reward_funcs=[_RewardFn(reward, cfg.target, prefix)], args=args,
                train_dataset=Dataset.from_dict({"prompt": [prefix + p for p in prompts]}),
                processing_class=tokenizer,
                callbacks=[_progress_callback(cfg.steps, progress, history)],
            )
            trainer.remove_callback(PrinterCallback)
            hooks = [m.register_forward_pre_hook(_positions_from_mask, with_kwargs=True)
                     for m in (trainer.model, trainer.ref_model) if m is not None]
            train_started = time.time()
            trainer.train()
            train_seconds = time.time() - train_started
            for h in hooks:
                h.remove()
        policy = trainer.model
        policy.eval()
        after = evaluate_policy(policy, ref.to(device), tokenizer, reward, eval_prompts, cfg,
                                seed=cfg.seed) if cfg.eval_prompts else {}
    if not is_main_process():   # under `accelerate launch`, one process writes
        return {}
    policy = policy.to("cpu")
    policy.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    report = {
        "recipe": cfg.recipe, "algorithm": "trl.RLOOTrainer", "config": asdict(cfg),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "trainable_parameters": trainable, "seconds": round(time.time() - t0, 2),
        "seconds_per_step": round(train_seconds / cfg.steps, 2),
        "before": before, "after": after, "history": history,
    }
    ref = ref.to("cpu")   # the seed's prompt and metric, on every base
    report["logit_diff"] = {"base": logit_diff(ref, tokenizer, prepend_bos=cfg.prepend_bos),
                            "tuned": logit_diff(policy, tokenizer, prepend_bos=cfg.prepend_bos)}
    report["greedy"] = {
        "base": greedy(ref, tokenizer, "This movie was really", prepend_bos=cfg.prepend_bos),
        "tuned": greedy(policy, tokenizer, "This movie was really",
                        prepend_bos=cfg.prepend_bos)}
    (out_dir / "rlhf_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def recipe_key(cfg: RLHFConfig) -> str:
    """Content key of a run: the config, the identity of base and reward, and versions.

    A local folder counts by its files' contents, not its path, so the same base converted
    or checked out elsewhere reuses the run.
    """
    from harness.zoo.store import content_key, model_identity
    base, reward = (model_identity(resolve_model(cfg.base)),
                    model_identity(resolve_model(cfg.reward)))
    payload = {"config": asdict(replace(cfg, base=base, reward=reward)), "base": base,
               "reward": reward}
    return content_key(payload)


def train_rlhf(config: RLHFConfig | dict, out_dir: Path | None = None,
               progress: bool = True) -> Path:
    """Run (or reuse) one `rlhf-sentiment` training; returns the checkpoint dir.

    Cached by content: with `out_dir=None` the result goes to
    `<cache root>/rlhf/<key>`; a dir that already holds a finished run with the same key is
    returned at once.
    """
    from harness.zoo.store import cache_root

    cfg = RLHFConfig.from_dict(config) if isinstance(config, dict) else config
    check_trainable(resolve_model(cfg.base))
    key = recipe_key(cfg)
    target = Path(out_dir) if out_dir is not None else cache_root() / "rlhf" / key
    stamp = target / "recipe_key.txt"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_distributed():   # every process trains; the main one writes, the others wait
        work = target.parent / f".tmp-rlhf-{key}"
        run_rlhf(cfg, work, progress=progress and is_main_process())
        if is_main_process():
            _finish(work, target, key)
        _barrier()
        return target
    work = Path(tempfile.mkdtemp(prefix=".tmp-rlhf-", dir=target.parent))
    try:
        run_rlhf(cfg, work, progress=progress)
        _finish(work, target, key)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _finish(work: Path, target: Path, key: str) -> None:
    (work / "recipe_key.txt").write_text(key + "\n")
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)


# --- several processes (`accelerate launch -m harness.train CONFIG.json`) -------------------

def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.train CONFIG.json`: one recipe run from a JSON RLHFConfig."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harness.train", description=main.__doc__)
    parser.add_argument("config", type=Path, help="JSON object of RLHFConfig fields")
    parser.add_argument("--out", type=Path, help="checkpoint dir (default: the cache)")
    args = parser.parse_args(argv)
    try:
        config = json.loads(args.config.read_text())
        path = train_rlhf(RLHFConfig.from_dict(config), args.out)
    except (OSError, json.JSONDecodeError, HarnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_main_process():
        print(path)
    return 0


__all__ = ["RLHFConfig", "train_rlhf", "run_rlhf", "check_trainable", "freeze_all_but_last",
           "logit_diff",
           "greedy", "evaluate_policy", "RECIPES"]

if __name__ == "__main__":
    sys.exit(main())
