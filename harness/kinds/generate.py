"""`generate`: greedy texts or seeded samples, optionally while patching activations from
another run or editing SAE features."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from harness import labels
from harness.errors import MeasureError
from harness.expect import ANSWER_OPERATORS, SAMPLES, TEXT, Measurement
from harness.kinds.base import Index, MeasureContext, PerPrompt, SingleModelClaim, measurement
from harness.kinds.fields import FeatureEdit, RunRef, SiteSelection, _run_ref
from harness.kinds.measuring import answers_of, check_features, gated_sae

if TYPE_CHECKING:   # torch loads inside the measurements only
    import torch


class GenerationPatch(SiteSelection):
    """`patch:` of a generate claim: activations copied from `from` at every step. `from: M`
    is M on the clean prompts; `from: {model: M, input: clean}` into a claim on `input:
    corrupt` is causal tracing inside one model (prompt positions patched, generated ones not)."""

    from_: RunRef = Field(alias="from")
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("from_", mode="before")
    @classmethod
    def _ref(cls, value):
        return _run_ref(value)


class GenerateClaim(SingleModelClaim):
    measure: Literal["generate"]
    FREEZE = "text|samples"
    VALUE_KIND = TEXT        # SAMPLES when sampled
    SEARCHABLE = True
    max_new_tokens: int = Field(10, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    per_prompt: PerPrompt = "all"
    samples: int = Field(1, ge=1, le=10_000)   # per prompt, seeds seed, seed+1, ...
    score_with: str | None = None              # a reward model of the spec
    score_target: Literal["negative", "positive"] = "negative"
    input: Literal["clean", "corrupt"] = "clean"   # the prompts' texts or their corrupt ones
    patch: GenerationPatch | None = None       # generate while patching from another run
    intervene: FeatureEdit | None = None       # generate while editing SAE features
    REPORT_EXTRAS = ("prompts", "sae_gate")
    PER_PROMPT_LISTING = "texts"

    @model_validator(mode="after")
    def _sampling_needs_temperature(self):
        if self.patch is not None and self.intervene is not None:
            raise ValueError("give either `patch:` or `intervene:` on one generate claim")
        if self.intervene is not None and self.input != "clean":
            raise ValueError("`intervene:` generates from the clean prompts; drop `input:`")
        if self.patch is not None and self.patch.from_ == RunRef(model=self.model,
                                                                 input=self.input):
            raise ValueError(f"`patch: {{from: ...}}` is the generating run itself (model "
                             f"'{self.model}' on the {self.input} prompts), which changes "
                             "nothing; patch from the other input (e.g. `from: {model: "
                             f"{self.model}, input: clean}}` with `input: corrupt`) or another "
                             "model")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("`samples` > 1 needs `temperature` > 0 (greedy samples are all "
                             "the same)")
        return self

    @property
    def sampled(self) -> bool:
        return self.samples > 1 or self.score_with is not None

    def value_kind(self) -> str:
        return SAMPLES if self.sampled else TEXT

    def reads_answers(self) -> bool:
        return bool(set(self.expect) & set(ANSWER_OPERATORS))   # answer expectations only

    def model_names(self) -> tuple[str, ...]:
        names = (self.model,) + ((self.patch.from_.model,) if self.patch else ())
        if self.intervene is not None and self.intervene.patch is not None:
            names += (self.intervene.patch.from_,)
        return names

    def model_refs(self) -> list[tuple[str, str]]:
        refs = [("model", self.model)]
        refs += [("patch.from", self.patch.from_.model)] if self.patch else []
        if self.intervene is not None and self.intervene.patch is not None:
            refs += [("intervene.patch.from", self.intervene.patch.from_)]
        return refs + ([("score_with", self.score_with)] if self.score_with else [])

    def needs_corrupt(self) -> bool:
        return "corrupt" in (self.input, self.patch.from_.input if self.patch else None)

    def pairs_clean_and_corrupt(self) -> bool:
        return self.patch is not None and self.patch.from_.input != self.input

    def indices(self) -> list[Index]:
        return self.patch.selection_indices(("patch",)) if self.patch else []

    def sites(self) -> list[tuple[tuple, str]]:
        return [(("patch", "site"), self.patch.site)] if self.patch else []

    def sized_models(self) -> list[str]:
        return [n for n in self.model_names() if n != self.score_with]   # not a reward model

    def generated_tokens(self) -> int:
        return self.max_new_tokens

    def cost(self, n_prompts: int) -> float:
        return 1.0 + n_prompts * self.samples * self.max_new_tokens / 50


@measurement("generate")
def _generate(ctx: MeasureContext) -> Measurement:
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
            **extras, "each": answers_of(
                ctx, continuation=[c for c, _ in continuations],
                next_token=[n for _, n in continuations])})
    samples = {"texts": list(texts), "scores": None, "seeds": seeds}
    if claim.score_with:
        samples["scores"] = _reward(ctx, claim.score_with).score(list(texts),
                                                                  claim.score_target)
    return Measurement(SAMPLES, samples, extras=extras)


def _generation_features(ctx: MeasureContext, model, batch, edit):
    """Hooks that edit SAE features at every generation step (gated on the claim's prompts)."""
    import torch

    from harness.measure import features as F

    sae, gate = gated_sae(ctx, model, batch, edit.sae)
    gates = {ctx.claim.model: gate}
    features = list(edit.ablate or ()) or ([edit.steer.feature] if edit.steer else
                                           list(edit.patch.features))
    check_features(ctx, sae, features, edit.sae)
    source = None
    if edit.patch is not None:
        source = ctx.model(edit.patch.from_)
        _, gates[edit.patch.from_] = gated_sae(ctx, source, ctx.batch(source), edit.sae)

    def hooks_for(window: torch.Tensor) -> list:
        where = torch.ones(window.shape, dtype=torch.bool)
        if ctx.prepend_bos:
            where[:, 0] = False
        if edit.positions == labels.FINAL_POSITION:
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


def _generation_patch(ctx: MeasureContext, claim, prompts: list):
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


def _reward(ctx: MeasureContext, name: str):
    """A reward model of the spec, loaded once per session (transformers pipeline)."""
    return ctx.session.reward_model(ctx.spec, name)
