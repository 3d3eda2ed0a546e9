"""Claims -> measurements -> verdicts. One registered function per measure kind.

To add a claim kind: its pydantic class in spec.py (listed in CLAIM_CLASSES), a
`@measure("name")` function here that returns a `Measurement` of the class's value kind, and
(if it needs new operators) an `@operator` in expect.py. A kind without its measurement stops
this module's import.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harness import labels
from harness import spec as spec_module
from harness.errors import HarnessError, MeasureError, ModelUnavailable, SpecError
from harness.expect import (
    FEATURES,
    GRID,
    MODIFIERS,
    PAIR,
    PATCH,
    SAMPLES,
    SCALAR,
    TEXT,
    TOKENS,
    Measurement,
    Outcome,
    evaluate,
    fmt,
    kind_of,
)
from harness.measure.results import Grid, PatchEffect
from harness.models import LoadedModel
from harness.session import Session
from harness.spec import ClaimBase, Spec, parse_comparison

PASSED, FAILED, ERROR, SKIPPED, XFAILED = "passed", "failed", "error", "skipped", "xfailed"


@dataclass
class Verdict:
    """The outcome of one claim, ready for any report."""

    spec: str
    file: str
    line: int | None
    claim_id: str
    measure: str
    models: tuple[str, ...]
    status: str
    expected: dict
    measured: object = None
    message: str = ""
    margin: float | None = None
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return f"{self.spec}::{self.claim_id}"


class Skip(Exception):
    """A claim that cannot run here for a stated, acceptable reason (an optional model)."""


@dataclass
class ClaimContext:
    spec: Spec
    claim: ClaimBase
    session: Session
    prompts: tuple | None = None   # overrides the claim's prompts (counterexample search)

    @property
    def prepend_bos(self) -> bool:
        own = self.claim.prepend_bos
        return self.spec.defaults.prepend_bos if own is None else own

    def model(self, name: str) -> LoadedModel:
        try:
            return self.session.model(self.spec, name)
        except ModelUnavailable as exc:
            if self.spec.models[name].optional:
                raise Skip(f"optional model '{name}' is unavailable: {exc}") from None
            raise

    def batch(self, model: LoadedModel):
        prompts = self.prompts or self.spec.claim_prompts(self.claim)
        if self.session.limit is not None:   # --limit N: a quick look at the first N
            prompts = prompts[: self.session.limit]
        return self.session.batch(self.spec, prompts, model, self.prepend_bos)


MEASURES: dict[str, Callable[[ClaimContext], Measurement]] = {}


def measure(name: str):
    """Register the measurement of the claim kind `name` (a measure spec.py declares)."""
    if name not in spec_module.MEASURES:
        raise ValueError(f"@measure({name!r}): no claim class in spec.CLAIM_CLASSES declares "
                         "that measure; add its class there first")

    def register(fn):
        MEASURES[name] = fn
        return fn
    return register


def check_registry() -> None:
    """Every claim kind of the spec has exactly one measurement here (checked at import)."""
    missing = [m for m in spec_module.MEASURES if m not in MEASURES]
    if missing:
        raise ImportError(f"claims.py has no @measure for {', '.join(missing)}: every claim "
                          "class of spec.CLAIM_CLASSES needs its measurement")


# ----------------------------------------------------------------------------- behavior

@measure("logit_diff")
def _logit_diff(ctx: ClaimContext) -> Measurement:
    from harness.measure.logits import logit_diff

    model = ctx.model(ctx.claim.model)
    batch = ctx.batch(model)
    per_prompt = logit_diff(model.bridge, batch, ctx.session.memory_budget_mb)
    return _scalar_over_prompts(ctx, per_prompt, batch.texts)


def _scalar_over_prompts(ctx: ClaimContext, per_prompt: torch.Tensor, texts: tuple,
                         extras: dict | None = None) -> Measurement:
    """A per-prompt number: the mean is the value; `ci` adds a bootstrap interval."""
    extras = {"prompts": texts, **(extras or {})}
    if ctx.claim.ci:
        extras["stats"] = _interval(per_prompt, ctx.claim.ci, texts)
    return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()), extras)


# ----------------------------------------------------------------------------- sequences

def _span_mask(ctx: ClaimContext, model: LoadedModel, batch):
    """The positions a sequence metric scores, per prompt, on the clean tokens."""
    from harness.measure.sequence import Span, check_spans, span_mask
    from harness.prompts import single_token_id

    span = ctx.claim.span
    if isinstance(span, str):
        chosen = Span(span)
    elif hasattr(span, "after"):
        marker = single_token_id(model.tokenizer, span.after)
        if isinstance(marker, list):
            raise MeasureError(f"span marker {span.after!r} is {len(marker)} tokens: {marker}; "
                               "use a single token")
        chosen = Span("after", marker_id=marker)
    else:
        chosen = Span("range", start=span.start, stop=span.stop)
    mask = span_mask(batch.tokens, batch.final_pos, chosen, prefix=int(ctx.prepend_bos))
    check_spans(mask, batch.texts, chosen)
    return mask


def _sequence(ctx: ClaimContext) -> Measurement:
    from harness.measure.sequence import sequence_metric

    model = ctx.model(ctx.claim.model)
    batch = ctx.batch(model)
    mask = _span_mask(ctx, model, batch)
    per_prompt = sequence_metric(model.bridge, batch.tokens, batch.tokens, mask,
                                 ctx.claim.measure, ctx.session.memory_budget_mb)
    extras = {"prompts": batch.texts, "positions": [int(n) for n in mask.sum(1)]}
    if ctx.claim.ci:
        extras["stats"] = _interval(per_prompt, ctx.claim.ci, batch.texts)
    return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()), extras)


measure("loss")(_sequence)
measure("accuracy")(_sequence)


def _interval(per_prompt, level: float, texts) -> dict:
    from harness.stats import bootstrap_mean_ci

    low, high = bootstrap_mean_ci(per_prompt, level)
    order = per_prompt.argsort().tolist()
    return {"n": len(order), "mean": float(per_prompt.mean()), "ci": level, "low": low,
            "high": high, "lowest_prompts": [[texts[i], float(per_prompt[i])] for i in order[:3]]}


@measure("top_k")
def _top_k(ctx: ClaimContext) -> Measurement:
    from harness.measure.logits import top_k_tokens

    model = ctx.model(ctx.claim.model)
    batch = ctx.batch(model)
    tops = top_k_tokens(model.bridge, model.tokenizer, batch, ctx.claim.k,
                        ctx.session.memory_budget_mb)
    per_prompt = tuple([tok for tok, _ in row] for row in tops)
    return Measurement(TOKENS, per_prompt[0], per_prompt,
                       {"prompts": batch.texts, "probabilities": [[p for _, p in row]
                                                                  for row in tops],
                        "each": _answers(ctx)})


def _answers(ctx: ClaimContext, **more) -> list[dict]:
    """Per-prompt values that expectations read beside the measured value (their answer)."""
    prompts = ctx.prompts or ctx.spec.claim_prompts(ctx.claim)
    return [{"answer": p.answer, **{k: v[i] for k, v in more.items()}}
            for i, p in enumerate(prompts)]


@measure("generate")
def _generate(ctx: ClaimContext) -> Measurement:
    from harness.measure.generation import generate_texts

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    prompts = [t[: int(f) + 1] for t, f in zip(*_generation_input(batch, claim.input))
               for _ in range(claim.samples)]
    patch = _generation_patch(ctx, claim, prompts) if claim.patch else None
    extras = {"prompts": batch.texts if claim.input == "clean" else tuple(
        model.tokenizer.decode(p.tolist(), skip_special_tokens=True)
        for p in prompts[:: claim.samples])}
    seeds = [claim.seed + i for i in range(len(prompts))]   # prompt-major: seed + i*samples + s
    if claim.intervene is not None:   # SAE features: bridge hooks, the token loop
        from harness.measure.generation import generate_uncached

        hooks_for, extras["sae_gate"] = _generation_features(ctx, model, batch, claim.intervene)
        texts = tuple(generate_uncached(model, p, claim.max_new_tokens, claim.temperature, s,
                                        patch, hooks_for=hooks_for)
                      for p, s in zip(prompts, seeds))
    else:
        texts = tuple(generate_texts(model, prompts, seeds, claim.max_new_tokens,
                                     claim.temperature, patch, ctx.session.memory_budget_mb))
    if not claim.sampled:
        continuations = [_continuation(model.tokenizer, prompt, text)
                         for prompt, text in zip(prompts, texts)]
        return Measurement(TEXT, texts[0], texts, {
            **extras, "each": _answers(
                ctx, continuation=[c for c, _ in continuations],
                next_token=[n for _, n in continuations])})
    samples = {"texts": list(texts), "scores": None, "seeds": seeds}
    if claim.score_with:
        samples["scores"] = _reward(ctx, claim.score_with).score(list(texts),
                                                                  claim.score_target)
    return Measurement(SAMPLES, samples, extras=extras)


def _generation_features(ctx: ClaimContext, model: LoadedModel, batch, edit):
    """Hooks that edit SAE features at every generation step (gated on the claim's prompts)."""
    from harness.measure import features as F

    sae, gate = _gated_sae(ctx, model, batch, edit.sae)
    gates = {ctx.claim.model: gate}
    features = list(edit.ablate or ()) or ([edit.steer.feature] if edit.steer else
                                           list(edit.patch.features))
    _check_features(ctx, sae, features, edit.sae)
    source = None
    if edit.patch is not None:
        source = ctx.model(edit.patch.from_)
        _, gates[edit.patch.from_] = _gated_sae(ctx, source, ctx.batch(source), edit.sae)

    def hooks_for(window: torch.Tensor) -> list:
        where = torch.ones(window.shape, dtype=torch.bool)
        if ctx.prepend_bos:
            where[:, 0] = False
        if edit.positions == "final":
            where[:, :-1] = False
        if edit.ablate is not None:
            fn = F.ablate_edit(sae, features, where)
        elif edit.steer is not None:
            fn = F.steer_edit(sae, edit.steer.feature, edit.steer.alpha, where)
        else:
            acts = F.hook_activations(source.bridge, window, sae.hook)
            fn = F.patch_edit(sae, features, acts, where)
        return [(sae.hook, lambda act, hook: fn(act, slice(None)))]
    return hooks_for, gates


def _continuation(tokenizer, prompt_ids, text: str) -> tuple[str, str | None]:
    """The generated part of `text` and its first token (as the tokenizer splits it)."""
    prompt = tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=True)
    rest = text[len(prompt):] if text.startswith(prompt) else text
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    return rest, tokenizer.decode(ids[:1]) if ids else None


def _generation_input(batch, which: str):
    """The tokens and final positions a generate claim (or its `from` run) reads."""
    if which == "corrupt":
        if batch.corrupt_tokens is None:
            raise MeasureError("`input: corrupt` needs prompts with `corrupt:` texts")
        return batch.corrupt_tokens, batch.corrupt_final_pos
    return batch.tokens, batch.final_pos


def _generation_patch(ctx: ClaimContext, claim, prompts: list):
    """The claim's `patch:`. From the same input as the generating run: the `from` model in
    lockstep on the same tokens. From the other input (causal tracing): the `from` run's own
    prompts, of equal token lengths, patched at prompt positions only."""
    from harness.measure.generation import patch_hooks

    patch = claim.patch
    source = ctx.model(patch.from_.model)
    from_prompts = None
    if patch.from_.input != claim.input:
        tokens, final = _generation_input(ctx.batch(source), patch.from_.input)
        from_prompts = [t[: int(f) + 1] for t, f in zip(tokens, final)
                        for _ in range(claim.samples)]
        if [len(p) for p in from_prompts] != [len(p) for p in prompts]:
            from harness.prompts import corrupt_length_mismatches

            problems = corrupt_length_mismatches(source.tokenizer,
                                                 ctx.spec.claim_prompts(claim), ctx.prepend_bos)
            raise MeasureError("; ".join(problems) or (
                f"models '{claim.model}' and '{patch.from_.model}' tokenize the prompts to "
                "different lengths; patching pairs positions one to one"))
    return patch_hooks(source, patch.site, patch.layers, patch.head_pairs(),
                       patch.neurons, patch.positions, from_prompts)


def _reward(ctx: ClaimContext, name: str):
    """A reward model of the spec, loaded once per session (transformers pipeline)."""
    return ctx.session.reward_model(ctx.spec, name)


# ----------------------------------------------------------------------------- localization

def _per_model_grids(ctx: ClaimContext, compute) -> Measurement:
    names = ctx.claim.model_names()
    grids = [compute(m, ctx.batch(m)) for m in map(ctx.model, names)]
    extras = {key: grids[0].extras[key] for key in ("path", "approximation")
              if key in grids[0].extras}
    if len(grids) == 1:
        return Measurement(GRID, grids[0], extras=extras)
    a, b = grids
    diff = Grid(a.axes, a.labels, b.values - a.values, method=a.method)
    return Measurement(PAIR, diff, extras={"a": a, "b": b, "names": names, **extras})


@measure("dla")
def _dla(ctx: ClaimContext) -> Measurement:
    from harness.measure.attribution import dla

    return _per_model_grids(ctx, lambda m, batch: dla(m.bridge, batch, by=ctx.claim.by,
                                                      engine=ctx.session.engine, key=m.key))


@measure("logit_lens")
def _logit_lens(ctx: ClaimContext) -> Measurement:
    from harness.measure.attribution import logit_lens

    return _per_model_grids(
        ctx, lambda m, batch: logit_lens(m.bridge, batch, incl_mid=ctx.claim.incl_mid,
                                         engine=ctx.session.engine, key=m.key))


def _runs(ctx: ClaimContext):
    """The `from` and `into` runs of a patch claim, on one shared tokenization."""
    from harness.measure.patching import Run

    claim = ctx.claim
    runs = []
    for ref in (claim.from_, claim.into):
        model = ctx.model(ref.model)
        batch = ctx.batch(model)
        corrupt = ref.input == "corrupt"
        tokens = batch.corrupt_tokens if corrupt else batch.tokens
        final = batch.corrupt_final_pos if corrupt else batch.final_pos
        runs.append((Run(model.key, model.bridge, tokens, final), batch))
    (from_run, from_batch), (into_run, into_batch) = runs
    if from_run.tokens.shape != into_run.tokens.shape or not torch.equal(
            from_run.final_pos.cpu(), into_run.final_pos.cpu()):
        from harness.prompts import corrupt_length_mismatches

        problems = corrupt_length_mismatches(ctx.model(claim.into.model).tokenizer,
                                             ctx.spec.claim_prompts(claim), ctx.prepend_bos)
        raise MeasureError("; ".join(problems) or (
            f"models '{claim.from_.model}' and '{claim.into.model}' tokenize the prompts to "
            "different lengths; patching pairs positions one to one and needs one tokenizer"))
    if not (torch.equal(from_batch.answer_ids, into_batch.answer_ids)
            and torch.equal(from_batch.foil_ids, into_batch.foil_ids)):
        raise MeasureError(f"models '{claim.from_.model}' and '{claim.into.model}' tokenize "
                           "the answers differently; patching needs one shared tokenizer")
    return from_run, into_run, into_batch


def _site_kwargs(claim) -> dict:
    return dict(site=claim.site, layers=claim.layers, heads=claim.head_pairs(),
                positions=claim.positions, neurons=claim.neurons)


def _patch_measurement(effect, metric: str, path: str | None) -> Measurement:
    """A patch effect as the claim reports it: the raw patched value with `metric: logit_diff`,
    else the normalized effect. `per_prompt` holds the same quantity for each prompt (its
    patched - into over the mean from - into: their mean is the value), so `per_prompt: all`
    judges what the mean reports; `each` gives per-prompt raw / from / into to operators that
    read them."""
    raw = float(effect.patched.mean())
    value = raw if metric == "logit_diff" else float(effect.normalized)
    per_prompt = effect.patched if metric == "logit_diff" else effect.normalized_per_prompt()
    extras = {"raw": raw, "from": float(effect.from_value.mean()),
              "into": float(effect.into_value.mean()), "normalized": float(effect.normalized),
              "per_prompt_raw": effect.patched.tolist(),
              "each": [{"raw": r, "from": f, "into": i} for r, f, i in zip(
                  effect.patched.tolist(), effect.from_value.tolist(),
                  effect.into_value.tolist())]}
    if path is not None:
        extras["path"] = path
    return Measurement(PATCH, value, tuple(per_prompt.tolist()), extras)


SEQUENCE = labels.SEQUENCE_METRICS
SEQUENCE_PATH = "sequence-hooks"   # the engine path that computed a loss/accuracy patch


def _sequence_runs(ctx: ClaimContext):
    """from/into runs for a sequence metric: scored on the clean tokens' span."""
    from_run, into_run, into_batch = _runs(ctx)
    model = ctx.model(ctx.claim.into.model)
    return from_run, into_run, into_batch.tokens, _span_mask(ctx, model, into_batch)


@measure("patch")
def _patch(ctx: ClaimContext) -> Measurement:
    if ctx.claim.metric in SEQUENCE:
        from harness.measure import sequence_patching as sp

        fr, ir, targets, score = _sequence_runs(ctx)
        effect = sp.patch(fr.bridge, fr.tokens, ir.bridge, ir.tokens, ir.final_pos, targets,
                          score, ctx.claim.metric, memory_budget_mb=ctx.session.memory_budget_mb,
                          **_site_kwargs(ctx.claim))
        return _patch_measurement(effect, "normalized", SEQUENCE_PATH)
    from_run, into_run, batch = _runs(ctx)
    engine = ctx.session.engine
    effect = engine.patch(from_run, into_run, batch.answer_ids, batch.foil_ids,
                          **_site_kwargs(ctx.claim))
    return _patch_measurement(effect, ctx.claim.metric, engine.path_of(into_run))


@measure("patch_sweep")
def _patch_sweep(ctx: ClaimContext) -> Measurement:
    claim = ctx.claim
    if claim.metric in SEQUENCE:
        from harness.measure import sequence_patching as sp

        if claim.method != "exact":
            raise MeasureError("`method: attribution` reads the logit difference; use "
                               "`method: exact` with metric loss / accuracy")
        fr, ir, targets, score = _sequence_runs(ctx)
        grid = sp.patch_sweep(fr.bridge, fr.tokens, ir.bridge, ir.tokens, targets, score,
                              claim.metric, site=claim.site, over=tuple(claim.over),
                              memory_budget_mb=ctx.session.memory_budget_mb)
        return Measurement(GRID, grid, extras={"method": grid.method, "path": SEQUENCE_PATH})
    from_run, into_run, batch = _runs(ctx)
    grid = ctx.session.engine.patch_sweep(from_run, into_run, batch.answer_ids, batch.foil_ids,
                                          site=claim.site, over=tuple(claim.over),
                                          method=claim.method)
    if claim.metric == "logit_diff" and grid.raw is not None:
        grid = Grid(grid.axes, grid.labels, grid.raw, grid.raw, grid.method, grid.extras)
    return Measurement(GRID, grid, extras={"method": grid.method, "path": grid.extras["path"]})


@measure("ablate")
def _ablate(ctx: ClaimContext) -> Measurement:
    from harness.measure.patching import Run

    claim = ctx.claim
    if claim.reference_prompts:
        return _ablate_from_reference(ctx)
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    if claim.metric in SEQUENCE:
        return _ablate_sequence(ctx, model, batch)
    run = Run(model.key, model.bridge, batch.tokens, batch.final_pos)
    reference = None
    if claim.reference_model:
        ref_model = ctx.model(claim.reference_model)
        ref_batch = ctx.batch(ref_model)
        reference = ctx.session.engine.logit_diff(
            Run(ref_model.key, ref_model.bridge, ref_batch.tokens, ref_batch.final_pos),
            ref_batch.answer_ids, ref_batch.foil_ids)
    effect = ctx.session.engine.ablate(run, batch.answer_ids, batch.foil_ids, kind=claim.kind,
                                       reference=reference, **_site_kwargs(claim))
    measurement = _patch_measurement(effect, claim.metric, ctx.session.engine.path_of(run))
    return Measurement(SCALAR, measurement.value, measurement.per_prompt, measurement.extras)


def _ablate_sequence(ctx: ClaimContext, model: LoadedModel, batch) -> Measurement:
    from harness.measure import sequence_patching as sp
    from harness.measure.sequence import sequence_metric

    claim, budget = ctx.claim, ctx.session.memory_budget_mb
    score = _span_mask(ctx, model, batch)
    reference = None
    if claim.reference_model:
        ref_model = ctx.model(claim.reference_model)
        ref_batch = ctx.batch(ref_model)
        reference = sequence_metric(ref_model.bridge, ref_batch.tokens, batch.tokens, score,
                                    claim.metric, budget)
    effect = sp.ablate(model.bridge, batch.tokens, batch.final_pos, batch.tokens, score,
                       claim.metric, kind=claim.kind, reference=reference,
                       memory_budget_mb=budget, **_site_kwargs(claim))
    measurement = _patch_measurement(effect, "normalized", SEQUENCE_PATH)
    return Measurement(SCALAR, measurement.value, measurement.per_prompt, measurement.extras)


# ----------------------------------------------------------------------------- circuits

def _reference(ctx: ClaimContext, model: LoadedModel, batch, kind: str, names, seed: int):
    """Ablation values for `kind` and what the report says about the reference prompts."""
    from harness.measure.circuits import ablation_values, resample_draw

    claim = ctx.claim
    if kind == "zero":
        return ablation_values(model.bridge, "zero", names, batch.tokens, batch.final_pos), {}
    ref_name = claim.reference_prompts
    ref_batch = ctx.session.batch(ctx.spec, ctx.spec.prompt_set(ref_name), model,
                                  ctx.prepend_bos)
    draw = resample_draw(len(batch.texts), len(ref_batch.texts), seed) \
        if kind == "resample" else None
    values = ablation_values(model.bridge, kind, names, batch.tokens, batch.final_pos,
                             ref_batch.tokens, ref_batch.final_pos, draw)
    used = [ref_batch.texts[i] for i in draw] if draw is not None else list(ref_batch.texts)
    return values, {"reference": {"prompt_set": ref_name, "kind": kind, "seed": seed,
                                  "prompts": used}}


def _ablate_from_reference(ctx: ClaimContext) -> Measurement:
    """`ablate` with `reference: {prompts: SET}`: the selection replaced by the reference
    prompts' mean (kind mean) or by a seeded draw of them (kind resample)."""
    from harness.measure.circuits import logit_diffs, site_replacement_hooks

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    names = [_site_hook(claim.site, layer) for layer in _selected_layers(claim, model)]
    values, extras = _reference(ctx, model, batch, claim.kind, names, claim.seed)
    hooks = site_replacement_hooks(model.bridge.cfg, claim.site, values, batch.final_pos,
                                   heads=claim.head_pairs(), positions=claim.positions,
                                   neurons=claim.neurons)
    args = (batch.tokens, batch.final_pos, batch.answer_ids, batch.foil_ids)
    clean = logit_diffs(model.bridge, *args)
    ablated = logit_diffs(model.bridge, *args, hooks=hooks)
    effect = PatchEffect(float((ablated.mean() - clean.mean()) / (0 - clean.mean())), ablated,
                         torch.zeros_like(clean), clean)
    measurement = _patch_measurement(effect, claim.metric, None)
    extras.update(measurement.extras)
    extras["prompts"] = batch.texts
    return Measurement(SCALAR, measurement.value, measurement.per_prompt, extras)


def _site_hook(site_name: str, layer: int) -> str:
    from harness.sites import site

    return site(site_name).hook_name(layer)


def _selected_layers(claim, model: LoadedModel) -> list[int]:
    pairs = claim.head_pairs()
    layers = sorted({layer for layer, _ in pairs}) if pairs else claim.layers
    if not layers:
        raise MeasureError("an ablation needs `layers:` (or `heads:`) to say what to ablate")
    bad = [layer for layer in layers if not 0 <= layer < model.bridge.cfg.n_layers]
    if bad:
        raise MeasureError(f"layer {bad[0]} is out of range: the model has "
                           f"{model.bridge.cfg.n_layers} layers")
    return list(layers)


@measure("attention")
def _attention(ctx: ClaimContext) -> Measurement:
    from harness.measure.attention import attention_scores
    from harness.prompts import single_token_id

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    rule, token_id = claim.source, None
    if isinstance(rule, dict):
        if "token" in rule:
            token_id = single_token_id(model.tokenizer, rule["token"])
            if isinstance(token_id, list):
                raise MeasureError(f"source token {rule['token']!r} is {len(token_id)} tokens "
                                   f"({token_id}); name a single token")
        rule = rule.get("position", "token")
    pairs = [_query_head(h, model) for h in claim.heads] if claim.heads else None
    layers = sorted({layer for layer, _ in pairs}) if pairs else claim.layers
    scores = attention_scores(model.bridge, batch.tokens, batch.final_pos, rule, token_id,
                              layers, ctx.session.memory_budget_mb, batch.texts)
    layer_list = list(layers) if layers is not None else list(range(model.bridge.cfg.n_layers))
    if pairs:
        per_prompt = torch.stack([scores[layer_list.index(layer), head]
                                  for layer, head in pairs]).mean(0)
        return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()),
                           {"prompts": batch.texts})
    return Measurement(GRID, _head_grid(scores.mean(-1), layer_list), extras={"prompts":
                                                                              batch.texts})


def _query_head(label: str, model: LoadedModel) -> tuple[int, int]:
    from harness.sites import parse_head

    layer, head = parse_head(label, "pattern")
    cfg = model.bridge.cfg
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise MeasureError(f"head {label} is not in this model ({cfg.n_layers} layers of "
                           f"{cfg.n_heads} heads)")
    return layer, head


def _head_grid(values: torch.Tensor, layers: list[int]) -> Grid:
    return Grid(("layer", "head"), (tuple(layers), tuple(range(values.shape[1]))), values)


@measure("head_scores")
def _head_scores(ctx: ClaimContext) -> Measurement:
    from harness.measure.attention import head_detector_scores, repeated_random_tokens

    claim = ctx.claim
    model = ctx.model(claim.model)
    tokenizer, gen = model.tokenizer, claim.random_tokens
    special = set(tokenizer.all_special_ids)
    if gen.vocab == "prompts":
        batch = ctx.batch(model)
        real = torch.arange(batch.tokens.shape[1])[None] <= batch.final_pos[:, None]
        candidates = batch.tokens[real].unique().tolist()
    else:
        candidates = range(min(len(tokenizer), model.bridge.cfg.d_vocab))
    vocab = torch.tensor([i for i in candidates if i not in special])
    if len(vocab) < 2:
        raise MeasureError("too few tokens to draw random sequences from; use "
                           "`random_tokens: {vocab: all}` or longer prompts")
    bos = tokenizer.bos_token_id if ctx.prepend_bos else None
    tokens = repeated_random_tokens(vocab, gen.length, gen.count, gen.seed, bos)
    if tokens.shape[1] > model.bridge.cfg.n_ctx:
        raise MeasureError(f"random_tokens.length {gen.length} makes sequences of "
                           f"{tokens.shape[1]} tokens; the model's context is "
                           f"{model.bridge.cfg.n_ctx}: use length <= "
                           f"{(model.bridge.cfg.n_ctx - (bos is not None)) // 2}")
    scores = head_detector_scores(model.bridge, tokens, claim.role,
                                  exclude_bos=claim.exclude_bos,
                                  exclude_current_token=claim.exclude_current_token,
                                  memory_budget_mb=ctx.session.memory_budget_mb)
    grid = _head_grid(scores.mean(-1), list(range(model.bridge.cfg.n_layers)))
    return Measurement(GRID, grid, extras={"inputs": {"sequences": gen.count,
                                                      "length": gen.length, "seed": gen.seed,
                                                      "vocab_size": len(vocab)}})


@measure("path_patch")
def _path_patch(ctx: ClaimContext) -> Measurement:
    from harness.measure.circuits import Component, parse_component

    claim = ctx.claim
    from_run, into_run, batch = _runs(ctx)
    cfg = into_run.bridge.cfg
    if claim.senders:
        sender_sets = [[parse_component(s, cfg) for s in claim.senders]]
    else:
        sender_sets = [[Component(layer, h)] for layer in range(cfg.n_layers)
                       for h in range(cfg.n_heads)]
    args = (batch.answer_ids, batch.foil_ids)
    engine = ctx.session.engine
    patched = engine.path_patch(from_run, into_run, *args, sender_sets, claim.path,
                                claim.receivers)                       # [variant, batch]
    from_value, into_value = engine.logit_diff(from_run, *args), engine.logit_diff(into_run, *args)
    normalized = (patched.mean(-1) - into_value.mean()) / (from_value.mean() - into_value.mean())
    extras = {"from": float(from_value.mean()), "into": float(into_value.mean()),
              "path": engine.path_of(into_run)}
    if claim.senders:
        effect = PatchEffect(float(normalized[0]), patched[0].cpu(), from_value.cpu(),
                             into_value.cpu())
        measurement = _patch_measurement(effect, claim.metric, None)
        return Measurement(PATCH, measurement.value, measurement.per_prompt,
                           {**extras, **measurement.extras})
    values = patched.mean(-1) if claim.metric == "logit_diff" else normalized
    grid = Grid(("layer", "head"), (tuple(range(cfg.n_layers)), tuple(range(cfg.n_heads))),
                values.view(cfg.n_layers, cfg.n_heads),
                raw=patched.mean(-1).view(cfg.n_layers, cfg.n_heads), extras=extras)
    return Measurement(GRID, grid, extras=extras)


@measure("circuit")
def _circuit(ctx: ClaimContext) -> Measurement:
    from harness.measure.circuits import (
        all_components,
        circuit_scores,
        component_hooks,
        parse_component,
    )

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    cfg = model.bridge.cfg
    members = [parse_component(m, cfg) for m in claim.members]
    values, extras = _reference(ctx, model, batch, claim.kind, component_hooks(cfg), claim.seed)
    scores = circuit_scores(model.bridge, batch.tokens, batch.final_pos, batch.answer_ids,
                            batch.foil_ids, members, values, all_components(cfg),
                            ctx.session.memory_budget_mb)
    extras.update({"prompts": batch.texts, "logit_diffs": {
        "model": float(scores.model.mean()), "all_ablated": float(scores.ablated.mean()),
        "circuit": float(scores.circuit.mean())}})
    if claim.metric == "faithfulness":
        per_prompt = scores.faithfulness()
        gap = scores.model.mean() - scores.ablated.mean()
        extras["ratio_of_means"] = float((scores.circuit.mean() - scores.ablated.mean()) / gap)
        if claim.ci:
            from harness.stats import bootstrap_mean_ci

            low, high = bootstrap_mean_ci(per_prompt, claim.ci)
            extras["stats"] = {"n": len(per_prompt), "mean": float(per_prompt.mean()),
                               "ci": claim.ci, "low": low, "high": high}
        return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()), extras)
    if claim.metric == "minimality":
        values_ = scores.minimality()
        labels = tuple(claim.members)
    else:
        values_ = scores.completeness()
        labels = tuple(claim.members) + ("circuit",)
    grid = Grid(("component",), (labels,), values_, extras=extras)
    return Measurement(GRID, grid, extras=extras)


# ----------------------------------------------------------------------------- SAE features

def _gated_sae(ctx: ClaimContext, model: LoadedModel, batch, name: str | None = None):
    """The claim's SAE on the model's device, after its reconstruction gate on these prompts.

    Below the spec's thresholds the claim is an error that says so: an SAE read at another hook
    or model than it was trained on must never pass silently.
    """
    from harness.measure.features import reconstruction

    name = name or ctx.claim.sae
    source = ctx.spec.saes[name]
    sae = ctx.session.sae(ctx.spec, name, model.device)
    rec = ctx.session.gate((name, model.key, batch.texts, ctx.prepend_bos), lambda: reconstruction(
        model.bridge, sae, batch, ctx.prepend_bos, ctx.session.memory_budget_mb))
    gate = source.gate
    problems = []
    # written so that NaN fails: every comparison with NaN is false
    if not rec.variance_explained >= gate.min_variance_explained:
        problems.append(f"variance explained {fmt(rec.variance_explained)} < "
                        f"{fmt(gate.min_variance_explained)} (min_variance_explained)")
    if not rec.loss_increase <= gate.max_loss_increase:
        problems.append(f"next-token loss +{fmt(rec.loss_increase)} nats with the "
                        f"reconstruction spliced in > {fmt(gate.max_loss_increase)} "
                        "(max_loss_increase)")
    if problems:
        raise MeasureError(
            f"SAE '{name}' fails its reconstruction gate on model '{model.key.split('|')[0]}' at "
            f"{sae.hook} over {len(batch.texts)} prompts: {'; '.join(problems)}. An SAE read at "
            "another hook or model than it was trained on reconstructs badly: check the SAE's "
            "`hook:` (and which model it belongs to), or set `gate:` on the SAE if this "
            "reconstruction is good enough")
    return sae, rec.as_dict()


def _check_features(ctx: ClaimContext, sae, features, name: str | None = None) -> None:
    bad = [f for f in features if f >= sae.d_sae]
    if bad:
        raise MeasureError(f"feature {bad[0]} is out of range: SAE '{name or ctx.claim.sae}' has "
                           f"{sae.d_sae} features (0..{sae.d_sae - 1})")


def _feature_acts(ctx: ClaimContext, model: LoadedModel, batch, sae) -> torch.Tensor:
    from harness.measure.features import feature_activations

    claim = ctx.claim
    return feature_activations(model.bridge, sae, batch, ctx.prepend_bos, claim.position,
                               claim.reduce, model.tokenizer, ctx.session.memory_budget_mb)


def _model_with_sae(ctx: ClaimContext, name: str):
    """A claim's model, its prompt batch and the claim's SAE, gated on that batch."""
    model = ctx.model(name)
    batch = ctx.batch(model)
    sae, gate = _gated_sae(ctx, model, batch)
    return model, batch, sae, gate


@measure("feature")
def _feature(ctx: ClaimContext) -> Measurement:
    claim = ctx.claim
    model, batch, sae, gate = _model_with_sae(ctx, claim.model)
    _check_features(ctx, sae, [claim.feature])
    acts = _feature_acts(ctx, model, batch, sae)[:, claim.feature]
    return _scalar_over_prompts(ctx, acts, batch.texts, {"sae_gate": {claim.model: gate}})


@measure("top_features")
def _top_features(ctx: ClaimContext) -> Measurement:
    claim = ctx.claim
    model, batch, sae, gate = _model_with_sae(ctx, claim.model)
    score = _feature_acts(ctx, model, batch, sae).mean(0)
    if claim.control:
        control = ctx.session.batch(ctx.spec, ctx.spec.prompt_set(claim.control), model,
                                    ctx.prepend_bos)
        score = score - _feature_acts(ctx, model, control, sae).mean(0)
    return _ranked(score, claim.k, {"sae_gate": {claim.model: gate}, "prompts": batch.texts})


def _ranked(score: torch.Tensor, k: int, extras: dict) -> Measurement:
    """The k highest-scoring features with a positive score (fewer when fewer fire). A NaN
    score is never "not firing": it makes the claim an error."""
    if not bool(torch.isfinite(score).all()):
        raise MeasureError(f"{int((~torch.isfinite(score)).sum())} feature scores are not "
                           "finite (NaN or inf): the SAE or the model computes non-finite "
                           "activations, so no ranking of features can be judged")
    top = score.topk(min(k, score.numel()))
    kept = [(int(i), float(v)) for i, v in zip(top.indices, top.values) if v > 0]
    return Measurement(FEATURES, [i for i, _ in kept], None,
                       {**extras, "scores": [[i, round(v, 6)] for i, v in kept]})


@measure("feature_diff")
def _feature_diff(ctx: ClaimContext) -> Measurement:
    claim = ctx.claim
    acts, gates, texts = [], {}, None
    for name in claim.models:
        model, batch, sae, gates[name] = _model_with_sae(ctx, name)
        if texts is not None and batch.texts != texts:
            raise MeasureError("feature_diff needs both models on the same prompts")
        texts = batch.texts
        if claim.feature is not None:
            _check_features(ctx, sae, [claim.feature])
        acts.append(_feature_acts(ctx, model, batch, sae))
    change = acts[1] - acts[0]                     # b - a, per prompt and feature
    extras = {"sae_gate": gates}
    if claim.feature is not None:
        extras["mean_a"], extras["mean_b"] = (float(a[:, claim.feature].mean()) for a in acts)
        return _scalar_over_prompts(ctx, change[:, claim.feature], texts, extras)
    mean = change.mean(0)
    score = {"up": mean, "down": -mean, "abs": mean.abs()}[claim.direction]
    measured = _ranked(score, claim.k, {**extras, "prompts": texts})
    measured.extras["scores"] = [[i, round(float(mean[i]), 6)] for i in measured.value]
    return measured


@measure("feature_intervention")
def _feature_intervention(ctx: ClaimContext) -> Measurement:
    from harness.measure import features as F
    from harness.measure.logits import logit_diff

    claim = ctx.claim
    model, batch, sae, gate = _model_with_sae(ctx, claim.model)
    gates = {claim.model: gate}
    if claim.positions == "final":
        where = F.select_positions(batch, ctx.prepend_bos, "final")
    else:
        where = F.real_positions(batch, ctx.prepend_bos)
    if claim.ablate is not None:
        _check_features(ctx, sae, claim.ablate)
        edit = F.ablate_edit(sae, list(claim.ablate), where)
    elif claim.steer is not None:
        _check_features(ctx, sae, [claim.steer.feature])
        edit = F.steer_edit(sae, claim.steer.feature, claim.steer.alpha, where)
    else:
        _check_features(ctx, sae, claim.patch.features)
        source = ctx.model(claim.patch.from_)
        source_batch = ctx.batch(source)
        if not torch.equal(source_batch.tokens, batch.tokens):
            raise MeasureError(f"models '{claim.patch.from_}' and '{claim.model}' tokenize the "
                               "prompts differently; patching features needs the same tokens")
        _, gates[claim.patch.from_] = _gated_sae(ctx, source, source_batch)
        source_acts = F.hook_activations(source.bridge, source_batch.tokens, sae.hook,
                                         ctx.session.memory_budget_mb)
        edit = F.patch_edit(sae, list(claim.patch.features), source_acts, where)
    budget = ctx.session.memory_budget_mb
    clean = logit_diff(model.bridge, batch, budget)
    edited = F.intervened_logit_diff(model.bridge, sae, batch, edit, budget)
    value = edited if claim.metric == "logit_diff" else edited - clean
    return _scalar_over_prompts(ctx, value, batch.texts, {
        "sae_gate": gates, "clean": float(clean.mean()), "intervened": float(edited.mean())})


# ----------------------------------------------------------------------------- verdicts

def judge(claim, measurement: Measurement, defaults: dict,
          expect: dict) -> tuple[bool, str, float | None]:
    """Apply the expectation, per prompt where the claim asks for it. Per prompt means the
    quantity the claim reports, on each prompt; text and tokens are always judged on every
    prompt (their `mean` is `all`)."""
    if _judged_per_prompt(claim, measurement):
        if not measurement.per_prompt:
            raise MeasureError(f"`per_prompt: {claim.per_prompt}` needs one value per prompt, "
                               f"and this {claim.measure} measurement has none")
        return _judge_per_prompt(claim, measurement, defaults, expect)
    if getattr(claim, "ci", None) and measurement.per_prompt:
        return _judge_interval(measurement, defaults, expect)
    return _combine(evaluate(expect, measurement, defaults))


def _judged_per_prompt(claim, measurement: Measurement) -> bool:
    """Whether the expectation reads each prompt's value rather than one value."""
    if measurement.kind in (TEXT, TOKENS):
        return measurement.per_prompt is not None
    return measurement.kind in (SCALAR, PATCH) and claim.per_prompt != "mean"


def _judge_interval(measurement: Measurement, defaults: dict, expect: dict):
    """Gate on the bootstrap interval: scalar expectations accept an interval of values, so
    the whole confidence interval is inside it iff both of its ends are."""
    stats = measurement.extras["stats"]
    ends = [Measurement(SCALAR, stats[k]) for k in ("low", "high")]
    low, high = (_combine(evaluate(expect, m, defaults)) for m in ends)
    margins = [m for m in (low[2], high[2]) if m is not None]
    detail = f"{stats['ci']:.0%} interval [{fmt(stats['low'])}, {fmt(stats['high'])}] of " \
             f"the mean {fmt(stats['mean'])} over {stats['n']} prompts: " \
             f"low end {low[1]}; high end {high[1]}"
    return low[0] and high[0], detail, min(margins) if margins else None


def _combine(outcomes: list[Outcome]) -> tuple[bool, str, float | None]:
    if not outcomes:     # no check ran: nothing held
        return False, "no expectation was checked", None
    margins = [o.margin for o in outcomes if o.margin is not None]
    return (all(o.ok for o in outcomes), "; ".join(o.detail for o in outcomes),
            min(margins) if margins else None)


def _judge_per_prompt(claim, measurement: Measurement, defaults: dict, expect: dict):
    prompts = measurement.extras.get("prompts", ())
    results = []
    each = measurement.extras.get("each") or [{}] * len(measurement.per_prompt)
    for value, own in zip(measurement.per_prompt, each):
        single = Measurement(measurement.kind, value, None, {**measurement.extras, **own})
        results.append(_combine(evaluate(expect, single, defaults)))
    held = [ok for ok, _, _ in results]
    worst = min(range(len(results)), key=lambda i: (results[i][0], results[i][2] or 0.0))
    worst_text = f"worst prompt {prompts[worst]!r}: {results[worst][1]}" if prompts else \
        results[worst][1]
    rule = claim.per_prompt
    if rule == "all" or (rule == "mean" and measurement.kind != SCALAR):
        ok = all(held)
    elif rule == "any":
        ok = any(held)
    else:
        op, bound = parse_comparison(rule["fraction"])
        fraction = sum(held) / len(held)
        from harness.expect import compare

        outcome = compare(fraction, op, bound)
        return outcome.ok, f"held for {sum(held)}/{len(held)} prompts ({outcome.detail}); " \
                           f"{worst_text}", outcome.margin
    margins = [m for _, _, m in results if m is not None]
    margin = (min(margins) if rule == "all" else max(margins)) if margins else None
    return ok, f"held for {sum(held)}/{len(held)} prompts ({rule}); {worst_text}", margin


def evaluate_claim(spec: Spec, index: int, session: Session) -> Verdict:
    """Measure one claim and apply its expectation. Never raises for claim-level problems."""
    claim = spec.claims[index]
    verdict = Verdict(spec.spec, spec.file, spec.line_of(("claims", index)), claim.id,
                      claim.measure, claim.model_names(), ERROR, claim.expect)
    verdict.extras["params"] = claim.model_dump(
        mode="json", by_alias=True, exclude_none=True,
        exclude={"id", "expect", "measure", "description", "model", "models"})
    if claim.skip:
        verdict.status, verdict.message = SKIPPED, claim.skip
        return verdict
    start = time.perf_counter()
    try:
        measurement = MEASURES[claim.measure](ClaimContext(spec, claim, session))
        defaults = spec.defaults.tolerance.model_dump()
        if claim.tolerance:
            defaults.update(claim.tolerance.model_dump())
        verdict.measured = to_jsonable(measurement)
        verdict.extras.update(_extras(measurement))
        _refuse_nan(verdict, measurement)
        expect = {k: v for k, v in claim.expect.items() if k != "baseline"}
        if any(k not in MODIFIERS for k in expect):
            ok, message, margin = judge(claim, measurement, defaults, expect)
        elif claim.expect.get("baseline") or spec.defaults.baseline:
            ok, message, margin = True, "", None     # the baseline comparison below decides
        else:
            raise MeasureError("`expect` holds no check (only a tolerance): nothing to judge")
        if claim.search is not None and ok:
            ok, message = _search(spec, claim, session, defaults, expect, verdict, message)
        if claim.expect.get("baseline") or spec.defaults.baseline:
            ok, message, margin = _with_baseline(spec, claim, session, verdict, defaults,
                                                 (ok, message, margin))
        verdict.status, verdict.message, verdict.margin = (PASSED if ok else FAILED), message, \
            margin
    except Skip as exc:
        verdict.status, verdict.message = SKIPPED, str(exc)
    except SpecError:
        raise
    except HarnessError as exc:
        verdict.status, verdict.message = ERROR, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a bug or an unsupported model: report, keep going
        verdict.status = ERROR
        verdict.message = f"{type(exc).__name__}: {exc}"
        verdict.extras["traceback"] = traceback.format_exc()
    verdict.seconds = time.perf_counter() - start
    session.note_claim(verdict.seconds)
    return _apply_xfail(claim, verdict)


def _refuse_nan(verdict: Verdict, measurement: Measurement) -> None:
    """A NaN (or the inf of a division by zero) is not a value any expectation can judge: the
    claim is an error that says why, and reports hold null instead (strict JSON). The values
    judged are the measured value, each prompt's and a `ci` interval's ends."""
    from harness.jsonfiles import finite, not_finite

    judged = [verdict.measured, list(measurement.per_prompt or ()),
              measurement.extras.get("stats")]
    if not_finite(judged):
        verdict.measured = finite(verdict.measured)
        verdict.extras = finite(verdict.extras)
        raise MeasureError("the measurement is not a finite number (NaN or inf), e.g. a "
                           "normalized effect whose `from` and `into` runs have the same "
                           "logit difference; use `metric: logit_diff` or runs that differ")


def _search(spec, claim, session, defaults, expect, verdict, message):
    """Look for a prompt of the family that breaks the claim; record what was found."""
    from harness.search import search, stale_stored

    def holds(prompt) -> tuple[bool, str]:
        ctx = ClaimContext(spec, claim, session, prompts=(prompt,))
        single = MEASURES[claim.measure](ctx)
        ok, detail, _ = _combine(evaluate(expect, Measurement(single.kind, single.per_prompt[0]),
                                          defaults))
        return ok, detail

    entries = spec.prompt_sets[claim.prompts] if claim.prompts else spec.prompts
    found = search(entries, claim.search.substitute, holds, claim.search.max_examples,
                   spec.file, claim.id)
    stale = stale_stored(entries, claim.search.substitute, spec.file, claim.id)
    ignored = f"; {stale} stored counterexample{'s' * (stale > 1)} ignored: no longer " \
              "prompts of the claim's family" if stale else ""
    if found is None:
        verdict.extras["search"] = {"max_examples": claim.search.max_examples, "found": None,
                                    **({"ignored_stored": stale} if stale else {})}
        return True, f"{message}; search of {claim.search.max_examples} examples found no " \
                     f"counterexample{ignored}"
    verdict.extras["search"] = {"found": found.prompt.text, "choices": found.choices,
                                "known": found.known, "detail": found.detail,
                                **({"ignored_stored": stale} if stale else {})}
    origin = "known counterexample still fails" if found.known else "counterexample found"
    return False, f"{origin}: {found.prompt.text!r} ({found.detail}); {message}{ignored}"


def _with_baseline(spec, claim, session, verdict, defaults, judged):
    """Add the comparison with the stored baseline (or, when updating, with itself)."""
    from harness.baselines import drift, stored_value
    from harness.expect import OPERATORS

    stored = verdict.measured if session.update_baselines else \
        stored_value(spec.file, claim.id)
    mods = {**defaults, **{k: v for k, v in claim.expect.items() if k in ("atol", "rtol")},
            "stored": stored}
    outcome = OPERATORS["baseline"].check(verdict.measured, True, mods)
    verdict.extras["baseline"] = {"stored": stored, "drift": drift(verdict.measured, stored)}
    ok, message, margin = judged
    margins = [m for m in (margin, outcome.margin) if m is not None]
    return (ok and outcome.ok, "; ".join(x for x in (message, outcome.detail) if x),
            min(margins) if margins else None)


def _apply_xfail(claim, verdict: Verdict) -> Verdict:
    if not claim.xfail:
        return verdict
    if verdict.status == FAILED:
        verdict.status = XFAILED
        verdict.message = f"expected failure ({claim.xfail}): {verdict.message}"
    elif verdict.status == PASSED:
        verdict.status = FAILED
        verdict.message = f"unexpectedly passed, but is marked xfail ({claim.xfail}); " \
                          f"remove the mark: {verdict.message}"
    return verdict


def to_jsonable(measurement: Measurement):
    value = measurement.value
    if isinstance(value, Grid):
        out = {"axes": list(value.axes), "labels": [list(lab) for lab in value.labels],
               "values": value.values.tolist()}
        if value.raw is not None:
            out["raw"] = value.raw.tolist()
        if value.method != "exact":
            out["method"] = value.method
        return out
    if measurement.kind in (SCALAR, PATCH):
        return float(value)
    if measurement.kind == SAMPLES:
        return value
    if measurement.per_prompt and len(measurement.per_prompt) > 1:
        return list(measurement.per_prompt)
    return value


def _extras(measurement: Measurement) -> dict:
    out = {}
    if measurement.per_prompt is not None and measurement.kind in (SCALAR, PATCH):
        out["per_prompt"] = list(measurement.per_prompt)
    for key in ("per_prompt_raw", "raw", "from", "into", "normalized", "method",
                "probabilities", "prompts",
                "stats", "path", "approximation", "reference", "inputs", "logit_diffs",
                "ratio_of_means", "sae_gate", "scores", "clean",
                "intervened", "mean_a", "mean_b"):
        if key in measurement.extras:
            out[key] = measurement.extras[key]
    if measurement.kind == PAIR:
        out["models_measured"] = {name: to_jsonable(Measurement(GRID, grid)) for name, grid in
                         zip(measurement.extras["names"],
                             (measurement.extras["a"], measurement.extras["b"]))}
    return out


def short_measured(verdict: Verdict) -> str:
    """A one-cell summary of the measured value for tables."""
    m = verdict.measured
    if isinstance(m, dict) and "values" in m:
        values = torch.tensor(m["values"])
        return f"{'x'.join(map(str, values.shape))} grid, max {fmt(float(values.max()))}"
    if isinstance(m, float):
        return fmt(m)
    if isinstance(m, list):
        return f"{len(m)} items: {fmt(m[0]) if m else ''}"
    return "" if m is None else str(m)


check_registry()

__all__ = ["evaluate_claim", "Verdict", "MEASURES", "PASSED", "FAILED", "ERROR", "SKIPPED",
           "XFAILED", "kind_of", "PAIR"]
