"""SAE feature claims: `feature`, `top_features`, `feature_diff`, `feature_intervention`. Every
one passes its SAE's reconstruction gate on the claim's prompts first."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from harness.errors import MeasureError
from harness.expect import FEATURES, SCALAR, Measurement
from harness.kinds.base import (
    ClaimBase,
    MeasureContext,
    SingleModelClaim,
    chance_measurement,
    measurement,
)
from harness.kinds.fields import FeatureEdit, FeatureReading
from harness.kinds.measuring import check_features, gated_sae, scalar_over_prompts
from harness.measure.results import PromptParts

if TYPE_CHECKING:   # torch loads inside the measurements only
    import torch


class FeatureClaim(SingleModelClaim, FeatureReading):
    measure: Literal["feature"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    HAS_INTERVALS = True
    REPORT_EXTRAS = ("prompts", "stats", "sae_gate")
    RESAMPLES_PROMPTS = True
    AGAINST = "feature"
    feature: int = Field(ge=0)

    def chance_pool(self, sizes: dict):
        from harness.chance import Pool

        return Pool({"sae": (self.feature,)}, {"sae": tuple(range(sizes["d_sae"]))})


class TopFeaturesClaim(SingleModelClaim, FeatureReading):
    measure: Literal["top_features"]
    FREEZE = "features"
    VALUE_KIND = FEATURES
    REPORT_EXTRAS = ("prompts", "sae_gate", "scores")
    RESAMPLES_PROMPTS = True
    k: int = Field(10, ge=1)
    control: str | None = None          # a prompt set: rank by mean(prompts) - mean(control)


class FeatureDiffClaim(ClaimBase, FeatureReading):
    measure: Literal["feature_diff"]
    CI_WHEN = ("single-feature ", "")
    FREEZE = "features|scalar"
    VALUE_KIND = FEATURES    # SCALAR for one `feature`
    RESAMPLES_PROMPTS = True
    REPORT_EXTRAS = ("prompts", "stats", "sae_gate", "scores", "mean_a", "mean_b")
    models: tuple[str, str]
    feature: int | None = Field(None, ge=0)   # given: its b - a; else the top k changed
    k: int = Field(10, ge=1)
    direction: Literal["up", "down", "abs"] = "abs"

    def model_names(self) -> tuple[str, ...]:
        return self.models

    def value_kind(self) -> str:
        return FEATURES if self.feature is None else SCALAR

    def has_intervals(self) -> bool:
        return self.feature is not None


class FeatureInterventionClaim(SingleModelClaim, FeatureEdit):
    measure: Literal["feature_intervention"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    REPORT_EXTRAS = ("prompts", "stats", "sae_gate", "clean", "intervened")
    RESAMPLES_PROMPTS = True
    metric: Literal["logit_diff", "change"] = "logit_diff"

    def model_names(self) -> tuple[str, ...]:
        return (self.model,) + ((self.patch.from_,) if self.patch else ())

    def model_refs(self) -> list[tuple[str, str]]:
        return [("model", self.model)]   # `patch.from` is checked with the SAE's fields


def _feature_acts(ctx: MeasureContext, model, batch, sae) -> torch.Tensor:
    from harness.measure.features import feature_activations

    claim = ctx.claim
    return feature_activations(model.bridge, sae, batch, ctx.prepend_bos, claim.position,
                               claim.reduce, model.tokenizer, ctx.session.memory_budget_mb)


def _model_with_sae(ctx: MeasureContext, name: str):
    """A claim's model, its prompt batch and the claim's SAE, gated on that batch."""
    model = ctx.model(name)
    batch = ctx.batch(model)
    sae, gate = gated_sae(ctx, model, batch)
    return model, batch, sae, gate


@measurement("feature")
def _feature(ctx: MeasureContext) -> Measurement:
    claim = ctx.claim
    model, batch, sae, gate = _model_with_sae(ctx, claim.model)
    check_features(ctx, sae, [claim.feature])
    acts = _feature_acts(ctx, model, batch, sae)[:, claim.feature]
    return scalar_over_prompts(ctx, acts, batch.texts, {"sae_gate": {claim.model: gate}})


@chance_measurement("feature")
def _feature_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Random features of the same SAE: one pass reads every feature."""
    from harness.chance import draw

    claim = ctx.claim
    model, batch, sae, _ = _model_with_sae(ctx, claim.model)
    acts = _feature_acts(ctx, model, batch, sae).mean(0)
    return [float(acts[f]) for (f,) in draw(claim.chance_pool({"d_sae": sae.d_sae}), n, seed)]


@measurement("top_features")
def _top_features(ctx: MeasureContext) -> Measurement:
    claim = ctx.claim
    model, batch, sae, gate = _model_with_sae(ctx, claim.model)
    acts = _feature_acts(ctx, model, batch, sae)
    score, control_mean = acts.mean(0), None
    if claim.control:
        control = ctx.session.batch(ctx.spec, ctx.spec.prompt_set(claim.control), model,
                                    ctx.prepend_bos)
        control_mean = _feature_acts(ctx, model, control, sae).mean(0)
        score = score - control_mean
    measured = _ranked(score, claim.k, {"sae_gate": {claim.model: gate},
                                        "prompts": batch.texts})
    return replace(measured, parts=PromptParts({"value": acts}, partial(_minus, control_mean),
                                               partial(_top_indices, claim.k, "up")))


def _minus(control_mean, means: dict):
    """The ranking score from resampled means: minus the control prompts' mean (kept fixed:
    the bootstrap resamples the claim's prompts)."""
    value = means["value"]
    return value if control_mean is None else value - control_mean.to(value)


def _top_indices(k: int, direction: str, mean) -> list[int]:
    """`_ranked`'s features (the k best scores that are positive) of one resample's means."""
    score = {"up": mean, "down": -mean, "abs": mean.abs()}[direction]
    top = score.topk(min(k, score.numel()))
    return [int(i) for i, v in zip(top.indices, top.values) if v > 0]


def _ranked(score: torch.Tensor, k: int, extras: dict) -> Measurement:
    """The k highest-scoring features with a positive score (fewer when fewer fire). A NaN
    score is never "not firing": it makes the claim an error."""
    import torch
    if not bool(torch.isfinite(score).all()):
        raise MeasureError(f"{int((~torch.isfinite(score)).sum())} feature scores are not "
                           "finite (NaN or inf): the SAE or the model computes non-finite "
                           "activations, so no ranking of features can be judged")
    top = score.topk(min(k, score.numel()))
    kept = [(int(i), float(v)) for i, v in zip(top.indices, top.values) if v > 0]
    return Measurement(FEATURES, [i for i, _ in kept], None,
                       {**extras, "scores": [[i, round(v, 6)] for i, v in kept]})


@measurement("feature_diff")
def _feature_diff(ctx: MeasureContext) -> Measurement:
    claim = ctx.claim
    acts, gates, texts = [], {}, None
    for name in claim.models:
        model, batch, sae, gates[name] = _model_with_sae(ctx, name)
        if texts is not None and batch.texts != texts:
            raise MeasureError("feature_diff needs both models on the same prompts")
        texts = batch.texts
        if claim.feature is not None:
            check_features(ctx, sae, [claim.feature])
        acts.append(_feature_acts(ctx, model, batch, sae))
    change = acts[1] - acts[0]                     # b - a, per prompt and feature
    extras = {"sae_gate": gates}
    if claim.feature is not None:
        extras["mean_a"], extras["mean_b"] = (float(a[:, claim.feature].mean()) for a in acts)
        return scalar_over_prompts(ctx, change[:, claim.feature], texts, extras)
    mean = change.mean(0)
    score = {"up": mean, "down": -mean, "abs": mean.abs()}[claim.direction]
    measured = _ranked(score, claim.k, {**extras, "prompts": texts})
    measured.extras["scores"] = [[i, round(float(mean[i]), 6)] for i in measured.value]
    return replace(measured, parts=PromptParts({"value": change},
                                               read=partial(_top_indices, claim.k,
                                                            claim.direction)))


@measurement("feature_intervention")
def _feature_intervention(ctx: MeasureContext) -> Measurement:
    import torch

    from harness.measure import features as F
    from harness.measure.logits import logit_diff

    claim = ctx.claim
    model, batch, sae, gate = _model_with_sae(ctx, claim.model)
    gates = {claim.model: gate}
    where = F.select_positions(batch, ctx.prepend_bos, claim.positions)
    if claim.ablate is not None:
        check_features(ctx, sae, claim.ablate)
        edit = F.ablate_edit(sae, list(claim.ablate), where)
    elif claim.steer is not None:
        check_features(ctx, sae, [claim.steer.feature])
        edit = F.steer_edit(sae, claim.steer.feature, claim.steer.alpha, where)
    else:
        check_features(ctx, sae, claim.patch.features)
        source = ctx.model(claim.patch.from_)
        source_batch = ctx.batch(source)
        if not torch.equal(source_batch.tokens, batch.tokens):
            raise MeasureError(f"models '{claim.patch.from_}' and '{claim.model}' tokenize the "
                               "prompts differently; patching features needs the same tokens")
        _, gates[claim.patch.from_] = gated_sae(ctx, source, source_batch)
        source_acts = F.hook_activations(source.bridge, source_batch.tokens, sae.hook,
                                         ctx.session.memory_budget_mb)
        edit = F.patch_edit(sae, list(claim.patch.features), source_acts, where)
    budget = ctx.session.memory_budget_mb
    clean = logit_diff(model.bridge, batch, budget)
    edited = F.intervened_logit_diff(model.bridge, sae, batch, edit, budget)
    value = edited if claim.metric == "logit_diff" else edited - clean
    return scalar_over_prompts(ctx, value, batch.texts, {
        "sae_gate": gates, "clean": float(clean.mean()), "intervened": float(edited.mean())})
