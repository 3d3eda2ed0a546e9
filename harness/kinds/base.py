"""What every claim kind is and answers, below the spec envelope (spec.py builds the `Claim`
union from the kinds) and without torch: static checks, freezing, reports and shards ask a
kind through this protocol instead of listing measure names.

A kind is one module of `harness/kinds/`: its pydantic class(es) (a subclass of `ClaimBase`
with `measure: Literal["name"]`) and its measurement, registered with `@measurement("name")`.
Kind modules import torch and `harness.measure.*` inside their measurement functions only,
and never `spec`, `session`, `models` or `claims`: what a measurement needs from a run comes
through the `MeasureContext` it is given."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness import labels
from harness.chance import MAX_RANDOM
from harness.errors import safe_text

NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,100}")   # spec names and claim ids


def checked_name(value: str, what: str, hint: str = "") -> str:
    """A spec name or claim id: letters, digits, '_', '-', '.' (at most 100), so that it reads
    the same in a pytest node id (`spec::claim`), `-k`, `--lf`, and every report format."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"{what} {safe_text(repr(value))} may use only letters, digits, '_', "
                         f"'-' and '.' (at most 100 characters){hint}")
    return value


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tolerance(Frozen):
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(0.0, ge=0)


PerPrompt = Union[Literal["all", "any", "mean"], dict[Literal["fraction"], str]]  # noqa: UP007

SEQUENCE_METRICS = labels.SEQUENCE_METRICS


class SearchSpec(Frozen):
    """`search:` hunt for a prompt of the claim's family on which it fails (hypothesis)."""

    max_examples: int = Field(50, ge=1, le=10_000)
    substitute: dict[str, list[str]] = {}   # word -> alternatives tried in its place


class Against(Frozen):
    """`against: {random: N, seed: S}`: the named selection against N random ones of the same
    size and kind from the same layers (`harness/chance.py`)."""

    random: int = Field(ge=1, le=MAX_RANDOM)
    seed: int = 0


def parse_comparison(text: str) -> tuple[str, float]:
    """">= 0.9" -> (">=", 0.9)."""
    match = re.fullmatch(r"\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", str(text))
    try:
        return match.group(1), float(match.group(2))
    except (AttributeError, ValueError):
        raise ValueError(f"'{text}' is not a comparison such as '>= 0.9'") from None


# ----------------------------------------------------------------------------- indices

AXES = {   # axis -> (the word in messages, the model size it must be below)
    "layer": ("layer", "n_layers"),
    "head": ("head", "n_heads"),
    "kv_head": ("key/value head", "n_kv_heads"),
    "neuron": ("neuron", "d_mlp"),
}   # and "position": a token position of every prompt, checked against the shortest


@dataclass(frozen=True)
class Index:
    """One index a claim names in a model: `loc` is its field path inside the claim (as spec
    errors print it), `axis` one of AXES, "position" (a token position, negative from the
    end), or "vocab" for a count of tokens (`k`)."""

    loc: tuple
    axis: str
    value: int


def index_problems(claim, sizes: dict[str, int | None], model: str) -> list[tuple[tuple, str]]:
    """(field path, message) for every index of `claim` outside a model of these sizes
    (n_layers, n_heads, n_kv_heads, d_mlp, d_vocab, shortest_prompt in tokens; absent or
    None: not checked). The one range check: static checks run it on config.json and the
    tokenized prompts, measurements on the loaded model."""
    out = []
    for index in claim.indices() + expect_indices(claim):
        if index.axis == "position":
            size = sizes.get("shortest_prompt")
            if size is not None and not -size <= index.value < size:
                out.append((index.loc, f"position {index.value} is outside the shortest prompt "
                                       f"({size} tokens for model '{model}'): use "
                                       f"-{size}..{size - 1}"))
            continue
        if index.axis == "vocab":
            size = sizes.get("d_vocab")
            if size and index.value > size:
                out.append((index.loc, f"k = {index.value} is more than model '{model}' has "
                                       f"tokens ({size})"))
            continue
        what, key = AXES[index.axis]
        size = sizes.get(key)
        if size is not None and not 0 <= index.value < size:
            out.append((index.loc, f"{what} {index.value} is out of range: model '{model}' has "
                                   f"{size} {what}s (0..{size - 1})"))
    return out


def expect_indices(claim) -> list[Index]:
    """The layers, heads and neurons named by the cells of a grid or ranking expectation
    (`argmax`, `argmin`, `top`, `only_above`), as labels (`L31H4`, `L3KV1`, `L3N12`, `mlp3`,
    edges) or {layer: .., head: ..} cells: one the model does not have can never hold, so it is
    a spec error, not a claim that fails after the weights load."""
    from harness.expect import GRID, PAIR, named_cells

    try:
        kind = claim.value_kind()
    except Exception:        # fields that do not yet decide it: other checks report them
        return []
    if kind not in (GRID, PAIR) or not isinstance(claim.expect, dict):
        return []
    return [Index(("expect",) + loc, axis, value)
            for loc, cell in named_cells(claim.expect) for axis, value in _cell_axes(cell)]


def _cell_axes(cell) -> list[tuple[str, int]]:
    """(axis, index) pairs a cell names; [] for what is not a model index (positions by
    number are checked against the grid when judged)."""
    if isinstance(cell, dict):
        return [(axis, v) for axis, v in cell.items()
                if axis in AXES and isinstance(v, int) and not isinstance(v, bool)]
    if not isinstance(cell, str):
        return []
    ends: list = []
    if "->" in cell:
        try:
            edge = labels.parse_edge(cell)
        except ValueError:
            return []
        ends = [edge.sender, edge.receiver]
    else:
        try:
            ends = [labels.parse_label(cell)]
        except labels.LabelError:
            return []
    out: list[tuple[str, int]] = []
    for end in ends:
        end = end.head if isinstance(end, labels.HeadInput) else end
        if isinstance(end, labels.Head):
            out += [("layer", end.layer), ("kv_head" if end.kv else "head", end.head)]
        elif isinstance(end, labels.Neuron):
            out += [("layer", end.layer), ("neuron", end.neuron)]
        elif isinstance(end, labels.LayerPart):
            out.append(("layer", end.layer))
    return out


def model_sizes(cfg) -> dict[str, int | None]:
    """A loaded model's sizes for `index_problems` (a TransformerLens config)."""
    return {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            "d_mlp": getattr(cfg, "d_mlp", None), "d_vocab": cfg.d_vocab}


# ----------------------------------------------------------------------------- the protocol

class ClaimBase(Frozen):
    """What every claim has, and what every kind answers (ClassVars and methods with
    defaults). A claim kind is one subclass with `measure: Literal["name"]` and its
    `VALUE_KIND` (or a `value_kind()` where its fields decide), listed in CLAIM_CLASSES
    (`harness/kinds/__init__.py`): the measure names, the `Claim` union and the value kinds all
    derive from that list."""

    VALUE_KIND: ClassVar[str]          # what expectations read: expect.SCALAR, GRID, ...
    SEARCHABLE: ClassVar[bool] = False   # `search:` hunts counterexamples among its prompts
    HAS_INTERVALS: ClassVar[bool] = False   # `ci:` bootstraps the mean over prompts
    # `confidence:` applies: the measurement keeps each prompt's values (its number per
    # prompt, or `Measurement.parts`), so a bootstrap over prompts judges it again without
    # a forward pass (`harness/stability.py`); `resamples_prompts()` where fields decide
    RESAMPLES_PROMPTS: ClassVar[bool] = False
    # how `harness freeze` pins the measured value: a rule of freeze.RULES, or one per shape
    # the fields can give the value ("grid|scalar"); None: the kind cannot be frozen, and
    # FREEZE_WHY says why (the frozen spec writes it as a comment)
    FREEZE: ClassVar[str | None]
    # where `has_intervals()` reads the fields: the words around the measure name that say
    # when `ci:` applies (("single-feature ", "") reads "single-feature `feature_diff`")
    CI_WHEN: ClassVar[tuple[str, str] | None] = None
    FREEZE_WHY: ClassVar[str] = ""
    # measurement extras the JSON report keeps (in this order); PRIVATE_EXTRAS are read by
    # the judging only. A key in neither is kept too: nothing is dropped silently.
    REPORT_EXTRAS: ClassVar[tuple[str, ...]] = ("prompts", "stats")
    PRIVATE_EXTRAS: ClassVar[tuple[str, ...]] = ("each",)
    # the HTML report's figure: heatmap, lines, bars, curve (drawn from a `curve` extra)
    FIGURE: ClassVar[str | None] = None
    MODEL_ARROW: ClassVar[bool] = False   # reports write its models `from->into`
    # the measured value lists each prompt's: "tokens" (top tokens) or "texts" (generations)
    PER_PROMPT_LISTING: ClassVar[str | None] = None
    # what `against: random` draws at random in place of the named selection ("heads",
    # "members"); None: the kind names no selection. `accepts_against()` where fields decide
    AGAINST: ClassVar[str | None] = None

    id: str = Field(min_length=1)
    description: str | None = None
    prompts: str | None = None          # a named prompt set; default: the spec's `prompts`
    prompt: str | None = None           # one literal prompt text (answer/foil from the set)
    expect: dict[str, Any]
    per_prompt: PerPrompt = "mean"
    prepend_bos: bool | None = None
    tolerance: Tolerance | None = None
    xfail: str | None = None
    skip: str | None = None
    ci: float | None = Field(None, gt=0, lt=1)   # bootstrap interval level, e.g. 0.95
    # the share of bootstrap resamples of the prompts the expectation must hold in (a number
    # judged on its mean: the level of the interval that must lie inside the bound)
    confidence: float | None = Field(None, gt=0, lt=1)
    search: SearchSpec | None = None
    against: Against | None = None      # the named selection against random ones
    holdout: str | None = None          # a prompt set the expectation must hold on too

    @field_validator("id")
    @classmethod
    def _id_chars(cls, value: str) -> str:
        return checked_name(value, "claim id")

    @field_validator("per_prompt")
    @classmethod
    def _fraction(cls, value):
        if isinstance(value, dict):
            if "fraction" not in value:
                raise ValueError("`per_prompt` is all, any, mean or {fraction: '>= 0.9'}")
            from harness.expect import share_bound_problem

            problem = share_bound_problem(*parse_comparison(value["fraction"]))
            if problem:
                raise ValueError(f"`per_prompt` fraction {problem}")
        return value

    def model_names(self) -> tuple[str, ...]:
        return ()

    def model_refs(self) -> list[tuple[str, str]]:
        """(field, model name) of every model the claim names, for the spec's cross checks."""
        return [("models" if getattr(self, "models", None) else "model", n)
                for n in self.model_names()]

    def other_prompt_sets(self) -> tuple[tuple[str, str], ...]:
        """The named prompt sets the claim reads besides its own prompts, as (field, set):
        a reference ablation's `reference`, top_features' `control`. The token checks read
        them as they read the claim's prompts."""
        sets = (("reference", getattr(self, "reference_prompts", None)),
                ("control", getattr(self, "control", None)), ("holdout", self.holdout))
        return tuple((name, value) for name, value in sets if isinstance(value, str))

    def accepts_against(self) -> bool:
        """Whether the claim names a selection that `against: random` can compare with random
        ones (its kind registers a `chance_measurement` and answers `chance_pool`)."""
        return self.AGAINST is not None

    def chance_pool(self, sizes: dict[str, int | None]):
        """The named selection and the items random ones are drawn from, for a model of these
        sizes (`model_sizes`; SAE claims add `d_sae`): a `harness.chance.Pool`."""
        raise NotImplementedError(f"{type(self).__name__} names no selection")

    def value_kind(self) -> str:
        """Which expectation operators apply (expect.py): the kind of value measured."""
        return self.VALUE_KIND

    def has_intervals(self) -> bool:
        return self.HAS_INTERVALS

    def resamples_prompts(self) -> bool:
        """Whether `confidence:` applies (see RESAMPLES_PROMPTS)."""
        return self.RESAMPLES_PROMPTS

    def reads_answers(self) -> bool:
        """Whether the claim reads each prompt's answer and foil (sequence metrics read
        neither). Claims that read none need no one-token answers."""
        return getattr(self, "metric", None) not in SEQUENCE_METRICS

    def scores_span(self) -> bool:
        """Whether `span:` applies: the claim scores a sequence metric over positions."""
        return getattr(self, "metric", None) in SEQUENCE_METRICS

    def needs_corrupt(self) -> bool:
        """Whether the claim reads its prompts' `corrupt:` texts."""
        return False

    def pairs_clean_and_corrupt(self) -> bool:
        """Whether the claim patches between the clean and the corrupt prompts, position by
        position (so each pair must tokenize to equal lengths)."""
        return False

    def makes_own_inputs(self) -> bool:
        """Whether the claim runs on inputs it makes itself (so it needs no prompts)."""
        return False

    def indices(self) -> list[Index]:
        """The layers, heads, neurons and token counts the claim names, each with its field
        path: static checks and measurements check them with `index_problems`."""
        return []

    def sites(self) -> list[tuple[tuple, str]]:
        """(field path, site name) of every activation site the claim reads or edits."""
        return []

    def sized_models(self) -> list[str]:
        """The models whose shapes the claim's indices must fit."""
        return list(self.model_names())

    def generated_tokens(self) -> int:
        """Tokens the claim generates after each prompt (their room in the context)."""
        return 0

    def cost(self, n_prompts: int) -> float:
        """A rough relative cost, to balance shards."""
        return 2.0 if self.search is not None else 1.0


class SingleModelClaim(ClaimBase):
    model: str

    def model_names(self) -> tuple[str, ...]:
        return (self.model,)


# ----------------------------------------------------------------------------- measurements

class MeasureContext(Protocol):
    """What a measurement function is given (`claims.ClaimContext` implements it): the spec,
    the claim, the session (engine, memory budget, batches, SAEs and their gates, reward
    models), and models and prompt batches with the claim's settings applied."""

    spec: Any
    claim: Any
    session: Any
    prompts: tuple | None

    @property
    def prepend_bos(self) -> bool: ...

    def model(self, name: str) -> Any: ...

    def batch(self, model: Any) -> Any: ...


MEASUREMENTS: dict[str, Callable[[MeasureContext], Any]] = {}


# kind -> its measurement of random selections: (context, N, seed) -> the claim's value for
# each of N random selections (chance.draw over `chance_pool`), batched where it can be
CHANCE_MEASUREMENTS: dict[str, Callable[[MeasureContext, int, int], list[float]]] = {}


def chance_measurement(*names: str):
    """Register how the claim kind(s) `names` measure random selections for `against`."""
    def register(fn):
        for name in names:
            CHANCE_MEASUREMENTS[name] = fn
        return fn
    return register


def measurement(*names: str):
    """Register the measurement of the claim kind(s) `names` (checked against the registry by
    `claims.check_registry` at import)."""
    def register(fn):
        for name in names:
            MEASUREMENTS[name] = fn
        return fn
    return register


__all__ = ["AXES", "Against", "CHANCE_MEASUREMENTS", "ClaimBase", "chance_measurement",
           "Frozen", "Index", "MEASUREMENTS", "MeasureContext",
           "NAME_RE", "PerPrompt", "SEQUENCE_METRICS", "SearchSpec", "SingleModelClaim",
           "Tolerance", "checked_name", "index_problems", "measurement", "model_sizes",
           "parse_comparison"]
