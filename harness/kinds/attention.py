"""Attention: `attention` (how much heads attend from destinations to rule-chosen sources) and
`head_scores` (TransformerLens head-detector scores on repeated random tokens)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.errors import MeasureError
from harness.expect import GRID, SCALAR, Measurement
from harness.kinds.base import Frozen, Index, MeasureContext, SingleModelClaim, measurement
from harness.kinds.fields import head_indices
from harness.kinds.measuring import check_indices, head_grid
from harness.measure.results import grid_parts
from harness.roles import DETECTOR_ROLES, role_name
from harness.roles import RULES as ROLE_RULES
from harness.sites import parse_head


class AttentionClaim(SingleModelClaim):
    """How much heads attend from each destination to the sources a rule picks."""

    measure: Literal["attention"]
    FREEZE = "grid|scalar"
    VALUE_KIND = GRID        # SCALAR with `heads`
    REPORT_EXTRAS = ("prompts",)
    RESAMPLES_PROMPTS = True
    source: str | dict[Literal["position", "token"], int | str]
    heads: tuple[str, ...] | None = None     # named query heads -> a value (their mean)
    layers: tuple[int, ...] | None = None    # grid rows (default: every layer)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value):
        if isinstance(value, str):
            try:
                return role_name(value, ROLE_RULES, "attention source")
            except ValueError as exc:
                raise ValueError(f"{exc}; or write {{position: N}} or {{token: ' word'}}") \
                    from None
        if isinstance(value, dict):
            if len(value) != 1:
                raise ValueError("`source` takes one of {position: N} or {token: ' word'}")
            if "position" in value and (not isinstance(value["position"], int)
                                        or value["position"] < 0):
                raise ValueError("`source.position` needs a token column >= 0")
            if "token" in value and not isinstance(value["token"], str):
                raise ValueError("`source.token` needs a token string such as ' river'")
        return value

    @field_validator("heads")
    @classmethod
    def _query_heads(cls, value):
        for head in value or ():
            try:
                parse_head(head, "pattern")
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _heads_or_layers(self):
        if self.heads and self.layers:
            raise ValueError("give `heads` (a value) or `layers` (a grid), not both")
        return self

    def value_kind(self) -> str:
        return SCALAR if self.heads else GRID

    def reads_answers(self) -> bool:
        return False

    def indices(self) -> list[Index]:
        return [Index(("layers", i), "layer", layer) for i, layer in enumerate(self.layers or ())] \
            + head_indices(self.heads, "heads", "pattern")


class RandomTokens(Frozen):
    """Generated inputs: BOS, `length` seeded random tokens, the same tokens again."""

    length: int = Field(20, ge=2, le=4096)
    count: int = Field(16, ge=1, le=10_000)
    seed: int = 0
    vocab: Literal["all", "prompts"] = "all"   # any token, or tokens of the claim's prompts


class HeadScoresClaim(SingleModelClaim):
    """TransformerLens head-detector scores of every head, as a [layer, head] grid."""

    measure: Literal["head_scores"]
    FREEZE = "grid"
    VALUE_KIND = GRID
    RESAMPLES_PROMPTS = True     # the random sequences are its prompts
    REPORT_EXTRAS = ("inputs",)
    role: str                # roles.DETECTOR_ROLES, or TransformerLens's names
    random_tokens: RandomTokens = RandomTokens()
    exclude_bos: bool = False
    exclude_current_token: bool = False

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        return role_name(value, DETECTOR_ROLES, "head role")

    def reads_answers(self) -> bool:
        return False

    def makes_own_inputs(self) -> bool:
        return self.random_tokens.vocab == "all"   # else tokens drawn from the prompts


@measurement("attention")
def _attention(ctx: MeasureContext) -> Measurement:
    import torch

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
    check_indices(claim, model, claim.model)
    pairs = [parse_head(h, "pattern") for h in claim.heads] if claim.heads else None
    layers = sorted({layer for layer, _ in pairs}) if pairs else claim.layers
    scores = attention_scores(model.bridge, batch.tokens, batch.final_pos, rule, token_id,
                              layers, ctx.session.memory_budget_mb, batch.texts)
    layer_list = list(layers) if layers is not None else list(range(model.bridge.cfg.n_layers))
    if pairs:
        per_prompt = torch.stack([scores[layer_list.index(layer), head]
                                  for layer, head in pairs]).mean(0)
        return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()),
                           {"prompts": batch.texts})
    return Measurement(GRID, head_grid(scores.mean(-1), layer_list),
                       extras={"prompts": batch.texts}, parts=grid_parts(scores))


@measurement("head_scores")
def _head_scores(ctx: MeasureContext) -> Measurement:
    import torch

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
    grid = head_grid(scores.mean(-1), list(range(model.bridge.cfg.n_layers)))
    return Measurement(GRID, grid, extras={"inputs": {"sequences": gen.count,
                                                      "length": gen.length, "seed": gen.seed,
                                                      "vocab_size": len(vocab)}},
                       parts=grid_parts(scores))
