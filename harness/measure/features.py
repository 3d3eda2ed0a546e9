"""SAE feature measurements through the bridge's hooks: activations, the reconstruction gate
and interventions (ablate, steer, patch features) read as logit differences.

Everything reads the SAE's hook with `run_with_cache(names_filter=...)` or edits it with
`run_with_hooks`, so it works on every architecture the bridge loads. Prompts go through in
slices sized by the memory budget. Positions: the BOS token (when prepended) and right padding
are never read or edited: SAEs are trained without BOS, and padding comes after every final
token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from harness.errors import MeasureError
from harness.labels import ALL_POSITIONS, FINAL_POSITION, LabelError, parse_position
from harness.measure.budget import WORK_SHARE, budget_bytes
from harness.measure.logits import logit_diff_reader, prompts_per_forward, read_final_logits
from harness.prompts import PromptBatch
from harness.saes import Sae

Edit = Callable[[Tensor, slice], Tensor]   # (activation [rows, pos, d_in], rows) -> edited


def real_positions(batch: PromptBatch, prepend_bos: bool) -> Bool[Tensor, "batch pos"]:
    """True at each prompt's own tokens up to its final one, BOS excluded."""
    pos = torch.arange(batch.tokens.shape[1])
    mask = pos[None, :] <= batch.final_pos[:, None].cpu()
    if prepend_bos:
        mask &= pos[None, :] > 0
    return mask


def _slices(bridge, batch: PromptBatch, memory_budget_mb: float):
    step = prompts_per_forward(bridge.cfg, batch.tokens.shape[1], memory_budget_mb)
    return [slice(s, s + step) for s in range(0, batch.tokens.shape[0], step)]


def _device(bridge) -> torch.device:
    return next(bridge.parameters()).device


def hook_activations(bridge, tokens: Int[Tensor, "batch pos"], hook: str,
                     memory_budget_mb: float = 2048) -> Float[Tensor, "batch pos d_in"]:
    """The activation at one hook for all prompts (float32, CPU)."""
    step = prompts_per_forward(bridge.cfg, tokens.shape[1], memory_budget_mb)
    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], step):
            _, cache = bridge.run_with_cache(tokens[start:start + step].to(_device(bridge)),
                                             names_filter=lambda n: n == hook)
            if hook not in cache:
                raise MeasureError(f"the model has no hook '{hook}' (the SAE's hook); check "
                                   "the SAE's `hook:`")
            parts.append(cache[hook].float().cpu())
    return torch.cat(parts)


def feature_activations(bridge, sae: Sae, batch: PromptBatch, prepend_bos: bool,
                        position: str | dict = "final", reduce: str = "max",
                        tokenizer=None, memory_budget_mb: float = 2048
                        ) -> Float[Tensor, "batch d_sae"]:
    """Every feature's activation per prompt at a position rule (labels.parse_position: "final",
    "all" or {"token": " bad"}); `reduce` (max | mean) joins several positions."""
    mask = select_positions(batch, prepend_bos, position, tokenizer)
    n_pos = batch.tokens.shape[1]
    # prompts per step: the forward pass's share, and the [rows, pos, d_sae] features' share
    step = max(1, min(prompts_per_forward(bridge.cfg, n_pos, memory_budget_mb),
                      budget_bytes(memory_budget_mb, WORK_SHARE) // (4 * n_pos * sae.d_sae)))
    parts = []
    for start in range(0, batch.tokens.shape[0], step):
        rows = slice(start, start + step)
        x = hook_activations(bridge, batch.tokens[rows], sae.hook, memory_budget_mb)
        _check_width(sae, x)
        feats = sae.encode(x.to(sae.W_enc.device)).cpu()
        parts.append(reduce_positions(feats, mask[rows], reduce))
    return torch.cat(parts)


def _check_width(sae: Sae, x: Tensor) -> None:
    if x.shape[-1] != sae.d_in:
        raise MeasureError(f"the SAE reads {sae.d_in}-dimensional activations but {sae.hook} "
                           f"has {x.shape[-1]} on this model: the SAE belongs to another model "
                           "or hook")


def select_positions(batch: PromptBatch, prepend_bos: bool, position: str | dict,
                     tokenizer=None) -> Bool[Tensor, "batch pos"]:
    """The positions a rule (labels.parse_position) reads, per prompt: "final" each prompt's
    last token, "all" its tokens but BOS, {"token": T} where T occurs (a prompt without it is
    an error)."""
    try:
        rule = parse_position(position)
    except LabelError as exc:
        raise MeasureError(str(exc)) from None
    real = real_positions(batch, prepend_bos)
    if rule == FINAL_POSITION:
        mask = torch.zeros_like(real)
        mask[torch.arange(len(mask)), batch.final_pos.cpu()] = True
        return mask
    if rule == ALL_POSITIONS:
        return real
    token = rule.token   # a TokenPosition
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise MeasureError(f"position token {token!r} is {len(ids)} tokens for this model's "
                           "tokenizer; use a single-token string (often with a leading space)")
    mask = real & (batch.tokens.cpu() == ids[0])
    missing = [t for t, row in zip(batch.texts, mask) if not row.any()]
    if missing:
        raise MeasureError(f"position token {token!r} does not occur in prompt {missing[0]!r}"
                           f" ({len(missing)} of {len(batch.texts)} prompts lack it)")
    return mask


def reduce_positions(feats: Float[Tensor, "batch pos d_sae"], mask: Bool[Tensor, "batch pos"],
                     reduce: str) -> Float[Tensor, "batch d_sae"]:
    if reduce == "mean":
        weights = mask.float() / mask.sum(1, keepdim=True).clamp_min(1)
        return torch.einsum("bp,bpf->bf", weights, feats)
    return feats.masked_fill(~mask[..., None], float("-inf")).amax(1)


# ----------------------------------------------------------------------------- the gate

@dataclass(frozen=True)
class Reconstruction:
    """How well an SAE stands in for the activation it reads, on some prompts."""

    variance_explained: float   # 1 - |x - x_hat|^2 / |x - mean x|^2 over real positions
    loss_clean: float           # next-token cross entropy over the prompts' own tokens
    loss_spliced: float         # the same with the reconstruction spliced in at the hook
    n_positions: int

    @property
    def loss_increase(self) -> float:
        return self.loss_spliced - self.loss_clean

    def as_dict(self) -> dict:
        return {"variance_explained": round(self.variance_explained, 4),
                "loss_clean": round(self.loss_clean, 4),
                "loss_spliced": round(self.loss_spliced, 4),
                "loss_increase": round(self.loss_increase, 4), "n_positions": self.n_positions}


def reconstruction(bridge, sae: Sae, batch: PromptBatch, prepend_bos: bool,
                   memory_budget_mb: float = 2048) -> Reconstruction:
    """Variance explained and the next-token loss with the SAE's reconstruction spliced in."""
    real = real_positions(batch, prepend_bos)
    x = hook_activations(bridge, batch.tokens, sae.hook, memory_budget_mb)
    _check_width(sae, x)
    x = x[real]
    x_hat = sae.decode(sae.encode(x.to(sae.W_enc.device))).cpu()
    total = (x - x.mean(0)).pow(2).sum()
    explained = 1.0 - float((x - x_hat).pow(2).sum() / total.clamp_min(1e-12))

    def splice(act: Tensor, rows: slice) -> Tensor:
        m = real[rows].to(act.device)
        out = act.clone()
        out[m] = sae.decode(sae.encode(act[m].float())).to(act.dtype)
        return out

    clean = _next_token_loss(bridge, batch, None, memory_budget_mb)
    spliced = _next_token_loss(bridge, batch, (sae.hook, splice), memory_budget_mb)
    return Reconstruction(explained, clean, spliced, int(real.sum()))


def _next_token_loss(bridge, batch: PromptBatch, edit: tuple[str, Edit] | None,
                     memory_budget_mb: float) -> float:
    """Mean cross entropy of each prompt's tokens 1..final given what precedes them."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for rows in _slices(bridge, batch, memory_budget_mb):
            tokens = batch.tokens[rows].to(_device(bridge))
            if edit is None:
                logits = bridge(tokens, return_type="logits")
            else:
                name, fn = edit
                logits = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[
                    (name, lambda act, hook, rows=rows, fn=fn: fn(act, rows))])
            logp = logits[:, :-1].float().log_softmax(-1)
            target = tokens[:, 1:]
            nll = -logp.gather(-1, target[..., None])[..., 0].cpu()
            pos = torch.arange(1, tokens.shape[1])
            keep = pos[None, :] <= batch.final_pos[rows].cpu()[:, None]
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


# ----------------------------------------------------------------------------- interventions

def intervened_logit_diff(bridge, sae: Sae, batch: PromptBatch, edit: Edit,
                          memory_budget_mb: float = 2048) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(foil) per prompt with `edit` applied at the SAE's hook."""
    def hooks_for(rows: slice) -> list:
        return [(sae.hook, lambda act, hook: edit(act, rows))]

    return read_final_logits(bridge, batch.tokens, batch.final_pos,
                             logit_diff_reader(batch.answer_ids, batch.foil_ids),
                             memory_budget_mb, hooks_for=hooks_for)


def ablate_edit(sae: Sae, features: list[int], where: Bool[Tensor, "batch pos"]) -> Edit:
    """Remove the features' decoder contributions, keeping the SAE's error term: the
    activation becomes x - sum_k f_k(x) W_dec[k], i.e. the reconstruction with f_k = 0 plus
    the part of x the SAE does not explain."""
    index = list(features)

    def edit(act: Tensor, rows: slice) -> Tensor:
        m = where[rows].to(act.device)
        f = sae.encode(act.float())[..., index]
        delta = (f @ sae.W_dec[index]) * m[..., None]
        return act - delta.to(act.dtype)
    return edit


def steer_edit(sae: Sae, feature: int, alpha: float, where: Bool[Tensor, "batch pos"]) -> Edit:
    """Add alpha x the feature's unit decoder direction."""
    direction = sae.direction(feature)

    def edit(act: Tensor, rows: slice) -> Tensor:
        m = where[rows].to(act.device)
        return act + (alpha * direction * m[..., None]).to(act.dtype)
    return edit


def patch_edit(sae: Sae, features: list[int], source_acts: Float[Tensor, "batch pos d_in"],
               where: Bool[Tensor, "batch pos"]) -> Edit:
    """Give the features the activations they have in another run (same tokens), keeping
    everything else: x + sum_k (f_k(source) - f_k(x)) W_dec[k]."""
    index = list(features)
    source_feats = sae.encode(source_acts.to(sae.W_enc.device))[..., index]

    def edit(act: Tensor, rows: slice) -> Tensor:
        m = where[rows].to(act.device)
        f = sae.encode(act.float())[..., index]
        delta = ((source_feats[rows].to(act.device) - f) @ sae.W_dec[index]) * m[..., None]
        return act + delta.to(act.dtype)
    return edit
