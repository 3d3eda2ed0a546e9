"""The spec format: frozen, typed objects and `load_spec`, which validates everything it can
without loading weights. Every error names the file, the line and the field path."""

from __future__ import annotations

import itertools
import json
import math
import re
import string
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from harness import labels
from harness.errors import HarnessError, SpecError, did_you_mean, safe_text
from harness.expect import (
    ANSWER_OPERATORS,
    FEATURES,
    GRID,
    MODIFIERS,
    PAIR,
    PATCH,
    PER_PROMPT_KINDS,
    SAMPLES,
    SCALAR,
    TEXT,
    TOKENS,
    check_expectation_spec,
)
from harness.roles import DETECTOR_ROLES, role_name
from harness.roles import RULES as ROLE_RULES
from harness.sites import HEAD_RE, HEAD_SITES, SITES, parse_head
from harness.sources import SOURCE_FIELDS
from harness.yamlsource import SourcedYaml, format_loc, read_yaml, read_yaml_text

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


MAX_PROMPTS = 100_000       # prompts in one prompt set, however made (templates, files, corpus)
MAX_FIRST_WORDS = 100_000   # `first_words:`; a prompt is a few dozen words


# ----------------------------------------------------------------------------- models

class TrainSource(Frozen):
    """`train:` a model built by a recipe from another model of the spec."""

    recipe: Literal["rlhf-sentiment"]
    base: str                                  # a model name of this spec
    reward: str = "toy-reviews-reward"         # a model name of this spec, zoo name or hub id
    target: Literal["negative", "positive"] = "negative"
    unfrozen_layers: int = Field(2, ge=1)
    steps: int = Field(150, ge=1)
    seed: int = 0
    beta: float = Field(0.05, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    num_generations: int | None = Field(None, ge=2)
    max_new_tokens: int | None = Field(None, ge=1)
    prompts: str | None = None                 # "toy-reviews" or a HF dataset name (imdb)
    prompt_words: int | None = Field(None, ge=1)
    n_prompts: int | None = Field(None, ge=1)

    def recipe_config(self, base: str, reward: str) -> dict:
        """Arguments of harness.train.RLHFConfig, with model names resolved."""
        data = self.model_dump(exclude_none=True)
        return {**data, "base": base, "reward": reward}


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class ModelSource(Frozen):
    """Where a model comes from: exactly one of hf / path / zoo / train / gguf."""

    hf: str | None = None
    revision: str | None = None
    path: str | None = None
    zoo: str | None = None
    gguf: str | None = None            # a GGUF file, relative to the spec's folder
    train: TrainSource | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    device_map: str | tuple[str, ...] | None = None  # "auto", or devices to spread layers over
    trust_remote_code: bool = False
    optional: bool = False

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        given = [k for k in SOURCE_FIELDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a model needs exactly one of hf / path / zoo / train / gguf, got "
                             + (", ".join(given) or "none"))
        if self.revision is not None and self.hf is None:
            raise ValueError("`revision` applies only to `hf:` models")
        if self.device_map is not None and self.device is not None:
            raise ValueError("give either `device` (one device) or `device_map` (several), "
                             "not both")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map {self.device_map!r} must be one of "
                             f"{', '.join(DEVICE_MAPS)} or a list of devices such as "
                             "[cuda:0, cuda:1]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_FIELDS if getattr(self, k) is not None)


# ----------------------------------------------------------------------------- SAEs

class SaeGate(Frozen):
    """The reconstruction gate every SAE claim passes first (on the claim's prompts)."""

    min_variance_explained: float = Field(0.7, le=1)   # may be negative: no floor
    max_loss_increase: float = Field(0.5, ge=0)   # nats of next-token loss


class SaeSource(Frozen):
    """`saes:` an SAE folder: `path:`, `hf:` (+ `folder:`, `revision:`) or `zoo:`."""

    path: str | None = None
    hf: str | None = None
    folder: str | None = None          # the SAE's folder inside the hub repo
    revision: str | None = None
    zoo: str | None = None
    hook: str | None = None            # default: the hook in the SAE's cfg.json
    model: str | None = None           # the spec model it was trained on (documentation)
    gate: SaeGate = SaeGate()

    @model_validator(mode="after")
    def _exactly_one_source(self) -> SaeSource:
        given = [k for k in ("path", "hf", "zoo") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("an SAE needs exactly one of path / hf / zoo, got "
                             + (", ".join(given) or "none"))
        if (self.folder is not None or self.revision is not None) and self.hf is None:
            raise ValueError("`folder` and `revision` apply only to `hf:` SAEs")
        return self

    @field_validator("hook")
    @classmethod
    def _hook_name(cls, value):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.]+", value):
            raise ValueError(f"'{value}' is not a hook name such as blocks.3.hook_resid_pre")
        return value


# ----------------------------------------------------------------------------- prompts

class DatasetSource(Frozen):
    """`dataset:` prompts read through `datasets` (hub name, or json/csv/text + data_files)."""

    name: str
    split: str = "train"
    field: str = "text"
    data_files: str | list[str] | None = None


class CorpusSource(Frozen):
    """`corpus:` reviews from the toy world's grammar."""

    name: Literal["toy-reviews"] = "toy-reviews"
    n: int = Field(100, ge=1, le=MAX_PROMPTS)
    seed: int = 0


PROMPT_SOURCES = ("text", "template", "file", "dataset", "corpus")


class PromptEntry(Frozen):
    """A literal prompt (`text`), a template family (`template` + `values`), or a family read
    from a `file`, a `dataset` or the toy `corpus` (cut by `first_words`, `limit`)."""

    text: str | None = None
    template: str | None = None
    values: dict[str, list[str]] | None = None
    file: str | None = None
    dataset: DatasetSource | None = None
    corpus: CorpusSource | None = None
    field: str = "text"
    first_words: int | None = Field(None, ge=1, le=MAX_FIRST_WORDS)
    strip: bool = False      # strip surrounding whitespace of `text` and `corrupt` alike
    limit: int | None = Field(None, ge=1)
    answer: str | None = None   # families: the default for rows without their own; loss and
    foil: str | None = None     # accuracy claims need neither
    corrupt: str | None = None

    @model_validator(mode="after")
    def _text_or_template(self) -> PromptEntry:
        given = [k for k in PROMPT_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a prompt needs exactly one of `text`, `template`, `file`, "
                             "`dataset` or `corpus`" + (f", got {', '.join(given)}" if given
                                                         else ""))
        if self.template is None and self.values is not None:
            raise ValueError("`values` needs a `template`")
        if self.template is not None:
            used = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
            for text in (self.corrupt,) if self.corrupt else ():
                used |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
            given = set(self.values or {})
            if used - given:
                missing = sorted(used - given)[0]
                raise ValueError(f"template placeholder '{{{missing}}}' has no entry in `values`"
                                 + did_you_mean(missing, given) if given else
                                 f"template placeholder '{{{missing}}}' has no entry in `values`")
            if given - used:
                raise ValueError(f"`values.{sorted(given - used)[0]}` is not used by the template")
            for name, options in (self.values or {}).items():
                if not options:
                    raise ValueError(f"`values.{name}` is empty")
            count = math.prod(len(options) for options in (self.values or {}).values())
            if count > MAX_PROMPTS:
                raise ValueError(f"the template expands to {count:,} prompts (the product of "
                                 f"its `values` lengths), more than the limit of "
                                 f"{MAX_PROMPTS:,} per prompt set; use fewer values, or sample "
                                 "them into a `file:` family")
            for text in (self.template, self.corrupt or ""):
                try:
                    text.format(**{k: v[0] for k, v in (self.values or {}).items()})
                except (ValueError, KeyError, IndexError, AttributeError) as exc:
                    raise ValueError(f"template {text!r} cannot be filled in ({exc}); write "
                                     "placeholders as {name}") from None
        return self


class Prompt(Frozen):
    """One concrete prompt after template expansion (answer/foil: None where not given)."""

    text: str
    answer: str | None = None
    foil: str | None = None
    corrupt: str | None = None
    loc: tuple = ()   # where the prompt is written in the spec, for error messages
    row: str | None = None   # a family's row: "p.jsonl:3: this row", "row 3 of dataset 'x'"


def expand(entries: tuple[PromptEntry, ...], loc: tuple = ("prompts",),
           directory: Path = Path(".")) -> tuple[Prompt, ...]:
    """Templates expand to the cross product of their values, in the order written; file,
    dataset and corpus families are read (relative paths from the spec's folder)."""
    from harness.prompt_sources import normalize_row

    out: list[Prompt] = []
    for i, entry in enumerate(entries):
        if len(out) > MAX_PROMPTS:
            break
        if entry.text is None and entry.template is None:
            try:
                out += _read_family(entry, loc + (i,), directory)
            except HarnessError as exc:   # the entry's line and field, for the spec error
                exc.loc = loc + (i, next(k for k in PROMPT_SOURCES if getattr(entry, k)))
                raise
            continue
        if entry.text is not None:
            rows = [{"text": entry.text, "corrupt": entry.corrupt}]
        else:
            names = list(entry.values or {})
            fills = [dict(zip(names, combo))
                     for combo in itertools.product(*(entry.values[n] for n in names))]
            rows = [{"text": entry.template.format(**fill),
                     "corrupt": entry.corrupt.format(**fill) if entry.corrupt else None}
                    for fill in fills]
        for row in rows:
            row = normalize_row(row, entry.first_words, entry.strip)
            out.append(Prompt(text=row["text"], answer=entry.answer, foil=entry.foil,
                              corrupt=row["corrupt"], loc=loc + (i,)))
    if len(out) > MAX_PROMPTS:
        raise HarnessError(f"the prompt set has more than the limit of {MAX_PROMPTS:,} prompts; "
                           "split it, or cut its families with `limit:`")
    return tuple(out)


def _read_family(entry: PromptEntry, loc: tuple, directory: Path) -> list[Prompt]:
    from harness import prompt_sources as sources

    if entry.file is not None:
        rows = sources.texts_from_file(directory / entry.file, entry.field)
    elif entry.dataset is not None:
        ds = entry.dataset
        files = ds.data_files
        if files is not None:
            files = [str(directory / f) for f in ([files] if isinstance(files, str) else files)]
        rows = sources.texts_from_dataset(ds.name, ds.split, ds.field, files,
                                          entry.limit or MAX_PROMPTS + 1)
    else:
        rows = sources.texts_from_corpus(entry.corpus.n, entry.corpus.seed)
    rows = rows[: entry.limit] if entry.limit else rows
    prompts = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("text"), str):   # 0, false, [] or null: never dropped
            field = entry.dataset.field if entry.dataset else entry.field
            raise HarnessError(f"{_row_origin(entry, row, number)}: `{field}` must be "
                               f"a string, got {json.dumps(row.get('text'), default=str)[:40]}"
                               "; write the prompt's text in quotes")
        row = {"corrupt": entry.corrupt, "answer": entry.answer, "foil": entry.foil,
               **{k: v for k, v in row.items() if v is not None}}
        for name in ("text", "answer", "foil", "corrupt"):
            if row[name] is not None and not isinstance(row[name], str):
                raise HarnessError(f"{_row_origin(entry, row, number)}: `{name}` must be a "
                                   f"string, got {json.dumps(row[name], default=str)[:40]}")
        row = sources.normalize_row(row, entry.first_words, entry.strip)
        if not row["text"]:   # a blank row, as a .txt file's blank lines
            continue
        prompts.append(Prompt(text=row["text"], answer=row["answer"], foil=row["foil"],
                              corrupt=row["corrupt"], loc=loc, row=_row_origin(entry, row, number)))
    return prompts


def _row_origin(entry: PromptEntry, row: dict, number: int) -> str:
    if "line" in row:
        return f"{entry.file}:{row['line']}"
    source = f"dataset '{entry.dataset.name}'" if entry.dataset else (
        f"file {entry.file}" if entry.file else "the corpus")
    return f"row {number} of {source}"


# ----------------------------------------------------------------------------- claims

class Tolerance(Frozen):
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(0.0, ge=0)


class Defaults(Frozen):
    prepend_bos: bool = True
    tolerance: Tolerance = Tolerance()
    baseline: bool = False   # every claim also compares against the stored baseline


PerPrompt = Union[Literal["all", "any", "mean"], dict[Literal["fraction"], str]]  # noqa: UP007


class SearchSpec(Frozen):
    """`search:` hunt for a prompt of the claim's family on which it fails (hypothesis)."""

    max_examples: int = Field(50, ge=1, le=10_000)
    substitute: dict[str, list[str]] = {}   # word -> alternatives tried in its place


class ClaimBase(Frozen):
    """What every claim has. A claim kind is one subclass with `measure: Literal["name"]` and
    its `VALUE_KIND` (or a `value_kind()` where its fields decide), listed in CLAIM_CLASSES:
    the measure names, the `Claim` union and the value kinds all derive from that list."""

    VALUE_KIND: ClassVar[str]          # what expectations read: expect.SCALAR, GRID, ...
    SEARCHABLE: ClassVar[bool] = False   # `search:` hunts counterexamples among its prompts
    HAS_INTERVALS: ClassVar[bool] = False   # `ci:` bootstraps the mean over prompts
    # how `harness freeze` pins the measured value: a rule of freeze.RULES, or one per shape
    # the fields can give the value ("grid|scalar"); None: the kind cannot be frozen, and
    # FREEZE_WHY says why (the frozen spec writes it as a comment)
    FREEZE: ClassVar[str | None]
    FREEZE_WHY: ClassVar[str] = ""

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
    search: SearchSpec | None = None

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
            parse_comparison(value["fraction"])
        return value

    def model_names(self) -> tuple[str, ...]:
        return ()

    def other_prompt_sets(self) -> tuple[tuple[str, str], ...]:
        """The named prompt sets the claim reads besides its own prompts, as (field, set):
        a reference ablation's `reference`, top_features' `control`. The token checks read
        them as they read the claim's prompts."""
        sets = (("reference", getattr(self, "reference_prompts", None)),
                ("control", getattr(self, "control", None)))
        return tuple((name, value) for name, value in sets if isinstance(value, str))

    def value_kind(self) -> str:
        """Which expectation operators apply (expect.py): the kind of value measured."""
        return self.VALUE_KIND

    def has_intervals(self) -> bool:
        return self.HAS_INTERVALS

    def reads_answers(self) -> bool:
        """Whether the claim reads each prompt's answer and foil (sequence metrics read
        neither)."""
        return getattr(self, "metric", None) not in SEQUENCE_METRICS


def parse_comparison(text: str) -> tuple[str, float]:
    """">= 0.9" -> (">=", 0.9)."""
    match = re.fullmatch(r"\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", str(text))
    try:
        return match.group(1), float(match.group(2))
    except (AttributeError, ValueError):
        raise ValueError(f"'{text}' is not a comparison such as '>= 0.9'") from None


class SingleModelClaim(ClaimBase):
    model: str

    def model_names(self) -> tuple[str, ...]:
        return (self.model,)


class LogitDiffClaim(SingleModelClaim):
    measure: Literal["logit_diff"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    SEARCHABLE = True
    HAS_INTERVALS = True


class TopKClaim(SingleModelClaim):
    measure: Literal["top_k"]
    FREEZE = "tokens"
    VALUE_KIND = TOKENS
    SEARCHABLE = True
    k: int = Field(10, ge=1)
    per_prompt: PerPrompt = "all"

    def reads_answers(self) -> bool:
        return bool(set(self.expect) & set(ANSWER_OPERATORS))   # answer expectations only


class SpanRange(Frozen):
    """`span: {start: a, stop: b}`: text tokens a..b-1 of each prompt (negatives from its end)."""

    start: int | None = None
    stop: int | None = None


class SpanAfter(Frozen):
    """`span: {after: TOKEN}`: the tokens after the first occurrence of a marker token."""

    after: str


SEQUENCE_METRICS = labels.SEQUENCE_METRICS
SPAN_HELP = "a span is all, second_half, {start: A, stop: B} or {after: TOKEN}"


def _parse_span(value):
    """One clear error for a bad span instead of one per member of the union."""
    if isinstance(value, SpanRange | SpanAfter):
        return value
    if isinstance(value, str):
        if value in ("all", "second_half"):
            return value
        hint = did_you_mean(value, ["all", "second_half"])
        raise ValueError(f"unknown span '{value}'" + (hint if "did you" in hint else "")
                         + f"; {SPAN_HELP}")
    if isinstance(value, dict) and set(value) == {"after"}:
        if not isinstance(value["after"], str):
            raise ValueError(f"`span.after` needs a token text such as \" |\", got "
                             f"{value['after']!r}")
        return SpanAfter(after=value["after"])
    if isinstance(value, dict) and value and set(value) <= {"start", "stop"}:
        if any(v is not None and (not isinstance(v, int) or isinstance(v, bool))
               for v in value.values()):
            raise ValueError(f"`span.start` / `span.stop` need integers, got {value}")
        return SpanRange(**value)
    raise ValueError(f"{SPAN_HELP}; got {value!r}")


SpanSpec = Annotated[Union[Literal["all", "second_half"], SpanRange, SpanAfter],  # noqa: UP007
                     BeforeValidator(_parse_span)]


class SequenceClaim(SingleModelClaim):
    VALUE_KIND = SCALAR
    HAS_INTERVALS = True

    span: SpanSpec = "all"

    def reads_answers(self) -> bool:
        return False


class LossClaim(SequenceClaim):
    """Mean next-token cross-entropy (nats) over a span, per prompt."""

    measure: Literal["loss"]
    FREEZE = "scalar"


class AccuracyClaim(SequenceClaim):
    """Share of a span's tokens that are the previous position's argmax, per prompt."""

    measure: Literal["accuracy"]
    FREEZE = "scalar"


class RunRef(Frozen):
    """One side of a patch: a model on the clean or the corrupt prompts."""

    model: str
    input: Literal["clean", "corrupt"] = "clean"


def _run_ref(value):
    return RunRef(model=value) if isinstance(value, str) else value


class SiteSelection(Frozen):
    site: str
    layers: tuple[int, ...] | None = None
    heads: tuple[str, ...] | None = None
    positions: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None

    @field_validator("site")
    @classmethod
    def _known_site(cls, value: str) -> str:
        if value not in SITES:
            raise ValueError(f"unknown site '{value}'" + did_you_mean(value, SITES))
        return value

    @field_validator("heads")
    @classmethod
    def _head_names(cls, value):
        for head in value or ():
            if not HEAD_RE.match(head):
                raise ValueError(f"'{head}' is not a head name; write query heads as "
                                 "L{layer}H{head} (e.g. L10H4) and key/value heads of sites k "
                                 "and v as L{layer}KV{head} (e.g. L3KV1)")
        return value

    @model_validator(mode="after")
    def _selection_fits_site(self):
        if self.heads and self.site not in HEAD_SITES:
            raise ValueError(f"`heads` needs a per-head site ({', '.join(HEAD_SITES)}), "
                             f"not '{self.site}'")
        for head in self.heads or ():
            parse_head(head, self.site)  # query-head label on k/v (or back): say which to write
        if self.neurons and self.site != "mlp_post":
            raise ValueError("`neurons` needs site 'mlp_post'")
        return self

    def head_pairs(self) -> tuple[tuple[int, int], ...] | None:
        if self.heads is None:
            return None
        return tuple((int(m.group(1)), int(m.group(2)))
                     for m in (HEAD_RE.match(h) for h in self.heads))


class SteerSpec(Frozen):
    feature: int = Field(ge=0)
    alpha: float


class FeaturePatchSpec(Frozen):
    from_: str = Field(alias="from")
    features: tuple[int, ...] = Field(min_length=1)
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class FeatureEdit(Frozen):
    """What to do to features at the SAE's hook: exactly one of ablate / steer / patch."""

    sae: str
    ablate: tuple[int, ...] | None = None
    steer: SteerSpec | None = None
    patch: FeaturePatchSpec | None = None
    positions: Literal["all", "final"] = "all"

    @model_validator(mode="after")
    def _one_edit(self):
        given = [k for k in ("ablate", "steer", "patch") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a feature intervention needs exactly one of `ablate: [k]`, "
                             "`steer: {feature, alpha}` or `patch: {from, features}`, got "
                             + (", ".join(given) or "none"))
        if self.ablate is not None and not self.ablate:
            raise ValueError("`ablate` needs at least one feature index")
        return self


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


class OneOrTwoModels(ClaimBase):
    """One model (a grid), or two (a pair: b - a, both grids kept)."""

    VALUE_KIND = GRID        # PAIR with `models: [A, B]`

    model: str | None = None
    models: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _one_or_two(self):
        if (self.model is None) == (self.models is None):
            raise ValueError("give either `model: NAME` or `models: [A, B]`")
        return self

    def model_names(self) -> tuple[str, ...]:
        return self.models if self.models else (self.model,)

    def value_kind(self) -> str:
        return PAIR if self.models else GRID


class LogitLensClaim(OneOrTwoModels):
    measure: Literal["logit_lens"]
    FREEZE = "grid"
    incl_mid: bool = False


class DlaClaim(OneOrTwoModels):
    measure: Literal["dla"]
    FREEZE = "grid"
    by: Literal["layer", "component", "head"] = "component"


class PatchClaim(ClaimBase, SiteSelection):
    measure: Literal["patch"]
    FREEZE = "patch"
    VALUE_KIND = PATCH
    from_: RunRef = Field(alias="from")
    into: RunRef
    metric: Literal["normalized", "logit_diff", "loss", "accuracy"] = "normalized"
    span: SpanSpec = "all"    # metric loss / accuracy: the scored positions

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("from_", "into", mode="before")
    @classmethod
    def _refs(cls, value):
        return _run_ref(value)

    def model_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.from_.model, self.into.model)))


SWEEP_AXES = labels.SWEEP_AXES


class PatchSweepClaim(PatchClaim):
    measure: Literal["patch_sweep"]
    FREEZE = "grid"
    VALUE_KIND = GRID
    over: tuple[str, ...]
    method: Literal["exact", "attribution"] = "exact"

    @model_validator(mode="after")
    def _axes_fit_site(self):
        if tuple(self.over) not in SWEEP_AXES:
            raise ValueError(f"`over: {list(self.over)}` is not a sweep; use one of "
                             "[layer, pos], [layer], [layer, head], [layer, head, pos]")
        if "head" in self.over and self.site not in HEAD_SITES:
            raise ValueError(f"a sweep over heads needs a per-head site "
                             f"({', '.join(HEAD_SITES)}), not '{self.site}'")
        return self


class ReferencePrompts(Frozen):
    """`reference: {prompts: SET}`: the prompt set a mean or resample ablation draws from."""

    prompts: str


class AblateClaim(SingleModelClaim, SiteSelection):
    measure: Literal["ablate"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    kind: Literal["zero", "mean", "resample"] = "zero"
    # a model name: its logit diff counts as "fully ablated"; {prompts: SET}: the prompts
    # whose mean (kind mean) or activations (kind resample) replace the selection
    reference: str | ReferencePrompts | None = None
    seed: int = 0                  # resample: which reference prompt each prompt draws
    metric: Literal["normalized", "logit_diff", "loss", "accuracy"] = "normalized"
    span: SpanSpec = "all"    # metric loss / accuracy: the scored positions

    @model_validator(mode="after")
    def _resample_needs_prompts(self):
        if self.kind == "resample" and not isinstance(self.reference, ReferencePrompts):
            raise ValueError("`kind: resample` needs `reference: {prompts: SET}`, the prompt "
                             "set whose activations replace the selection")
        if isinstance(self.reference, ReferencePrompts) and self.metric in ("loss", "accuracy"):
            raise ValueError("`reference: {prompts: SET}` ablations read the logit difference; "
                             "use `metric: normalized` or `metric: logit_diff`")
        return self

    @property
    def reference_model(self) -> str | None:
        return self.reference if isinstance(self.reference, str) else None

    @property
    def reference_prompts(self) -> str | None:
        return self.reference.prompts if isinstance(self.reference, ReferencePrompts) else None

    def model_names(self) -> tuple[str, ...]:
        return (self.model,) + ((self.reference_model,) if self.reference_model else ())




class AttentionClaim(SingleModelClaim):
    """How much heads attend from each destination to the sources a rule picks."""

    measure: Literal["attention"]
    FREEZE = "grid|scalar"
    VALUE_KIND = GRID        # SCALAR with `heads`
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


COMPONENT_RE = labels.COMPONENT_RE


def _components(value):
    for label in value or ():
        if not COMPONENT_RE.match(label):
            raise ValueError(f"'{label}' is not a component; write heads as L{{layer}}H{{head}} "
                             "(e.g. L1H0) and MLP layers as mlp{layer} (e.g. mlp0)")
    return value


class PathPatchClaim(ClaimBase):
    """IOI path patching: the senders' effect that reaches the receivers' q/k/v (or the final
    residual) directly, every other component frozen at its `into` value."""

    measure: Literal["path_patch"]
    FREEZE = "grid|patch"
    VALUE_KIND = GRID        # PATCH with `senders`
    from_: RunRef = Field(alias="from")
    into: RunRef
    senders: tuple[str, ...] | None = None   # components; omitted: one cell per head (a grid)
    path: Literal["q", "k", "v", "resid"]
    receivers: tuple[str, ...] = ()          # heads (L1H0; L1KV0 for k and v on GQA models)
    metric: Literal["normalized", "logit_diff"] = "normalized"

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("from_", "into", mode="before")
    @classmethod
    def _refs(cls, value):
        return _run_ref(value)

    @field_validator("senders")
    @classmethod
    def _sender_names(cls, value):
        return _components(value)

    @model_validator(mode="after")
    def _receivers_fit_path(self):
        if self.from_.model != self.into.model:
            raise ValueError("path patching runs one model on two inputs: give `from` and "
                             "`into` the same model (e.g. input: clean / input: corrupt)")
        if self.path == "resid" and self.receivers:
            raise ValueError("path `resid` is the final residual stream; drop `receivers`")
        if self.path != "resid" and not self.receivers:
            raise ValueError(f"path '{self.path}' needs `receivers:`, the heads whose "
                             f"{self.path} input the effect must pass through")
        for label in self.receivers:
            parse_head(label, self.path)
        return self

    def model_names(self) -> tuple[str, ...]:
        return (self.into.model,)

    def value_kind(self) -> str:
        return PATCH if self.senders else GRID


class CircuitClaim(SingleModelClaim):
    """A set of components compared with the full model, everything outside it ablated."""

    measure: Literal["circuit"]
    FREEZE = "cells|scalar"
    VALUE_KIND = GRID        # SCALAR for faithfulness
    members: tuple[str, ...] = Field(min_length=1)
    kind: Literal["zero", "mean", "resample"]   # always explicit: scores depend on it
    reference: str | ReferencePrompts | None = None   # prompt set for mean / resample
    seed: int = 0
    metric: Literal["faithfulness", "minimality", "completeness"] = "faithfulness"

    @field_validator("members")
    @classmethod
    def _member_names(cls, value):
        return _components(value)

    @model_validator(mode="after")
    def _reference_for_kind(self):
        if self.kind != "zero" and self.reference is None:
            raise ValueError(f"`kind: {self.kind}` needs `reference:`, the prompt set to take "
                             "the ablated activations from")
        return self

    @property
    def reference_prompts(self) -> str | None:
        ref = self.reference
        return ref.prompts if isinstance(ref, ReferencePrompts) else ref

    def value_kind(self) -> str:
        return SCALAR if self.metric == "faithfulness" else GRID

    def has_intervals(self) -> bool:
        return self.metric == "faithfulness"


# ----------------------------------------------------------------------------- SAE features

Position = labels.Position


class FeatureReading(Frozen):
    """Where an SAE feature is read: `position` final | all | {token: " bad"}; `reduce`
    joins several positions of one prompt."""

    sae: str
    position: Position = "final"
    reduce: Literal["max", "mean"] = "max"


class FeatureClaim(SingleModelClaim, FeatureReading):
    measure: Literal["feature"]
    FREEZE = "scalar"
    VALUE_KIND = SCALAR
    HAS_INTERVALS = True
    feature: int = Field(ge=0)


class TopFeaturesClaim(SingleModelClaim, FeatureReading):
    measure: Literal["top_features"]
    FREEZE = "features"
    VALUE_KIND = FEATURES
    k: int = Field(10, ge=1)
    control: str | None = None          # a prompt set: rank by mean(prompts) - mean(control)


class FeatureDiffClaim(ClaimBase, FeatureReading):
    measure: Literal["feature_diff"]
    FREEZE = "features|scalar"
    VALUE_KIND = FEATURES    # SCALAR for one `feature`
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
    metric: Literal["logit_diff", "change"] = "logit_diff"

    def model_names(self) -> tuple[str, ...]:
        return (self.model,) + ((self.patch.from_,) if self.patch else ())


# ----------------------------------------------------------------------------- the registry

# Every claim kind, once: the measure names, the `Claim` union, the SAE measures and each
# kind's value kind derive from this list (claims.py registers one measurement per name).
CLAIM_CLASSES: tuple[type[ClaimBase], ...] = (
    LogitDiffClaim, TopKClaim, GenerateClaim, LogitLensClaim, DlaClaim, PatchClaim,
    PatchSweepClaim, AblateClaim, LossClaim, AccuracyClaim, AttentionClaim, HeadScoresClaim,
    PathPatchClaim, CircuitClaim, FeatureClaim, TopFeaturesClaim, FeatureDiffClaim,
    FeatureInterventionClaim,
)


def measure_name(cls: type[ClaimBase]) -> str:
    """The `measure:` a claim class answers to (its one-value Literal)."""
    field = cls.model_fields.get("measure")
    names = get_args(field.annotation) if field is not None else ()
    if len(names) != 1:
        raise TypeError(f"{cls.__name__} needs `measure: Literal[\"name\"]`")
    return names[0]


CLAIM_KINDS: dict[str, type[ClaimBase]] = {measure_name(c): c for c in CLAIM_CLASSES}
MEASURES: tuple[str, ...] = tuple(CLAIM_KINDS)
SAE_MEASURES: tuple[str, ...] = tuple(m for m, c in CLAIM_KINDS.items()
                                      if issubclass(c, FeatureReading | FeatureEdit))
SEARCHABLE_MEASURES: tuple[str, ...] = tuple(m for m, c in CLAIM_KINDS.items() if c.SEARCHABLE)
Claim = Annotated[Union[CLAIM_CLASSES], Field(discriminator="measure")]  # noqa: UP007


class Spec(Frozen):
    spec: str
    description: str | None = None
    models: dict[str, ModelSource]
    saes: dict[str, SaeSource] = {}
    prompts: tuple[PromptEntry, ...] = ()
    prompt_sets: dict[str, tuple[PromptEntry, ...]] = {}
    defaults: Defaults = Defaults()
    claims: tuple[Claim, ...]
    file: str = "<spec>"
    field_lines: dict[str, int] = {}   # formatted field path -> line, for later errors
    _resolved: dict | None = PrivateAttr(default=None)   # set name ("" default) -> prompts

    @field_validator("spec")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        return checked_name(value, "spec name")

    @property
    def resolved(self) -> bool:
        """Whether `resolve_prompts` has read this spec's prompt sets."""
        return self._resolved is not None

    def prompt_set(self, name: str | None) -> tuple[Prompt, ...]:
        """The prompts of a set, as `resolve_prompts` read them (files, datasets once)."""
        if self._resolved is None:
            raise HarnessError(f"{self.file}: the spec's prompts are not resolved yet; "
                               "call harness.spec.resolve_prompts(spec) after reading it")
        return self._resolved[name or ""]

    def line_of(self, loc: tuple) -> int | None:
        for end in range(len(loc), -1, -1):
            line = self.field_lines.get(format_loc(loc[:end]))
            if line is not None:
                return line
        return None

    def error(self, loc: tuple, message: str) -> SpecError:
        return SpecError(message, file=self.file, line=self.line_of(loc), path=format_loc(loc))

    @property
    def directory(self) -> Path:
        return Path(self.file).parent

    def claim_prompts(self, claim: ClaimBase) -> tuple[Prompt, ...]:
        """The prompts a claim runs on; `prompt: TEXT` picks/creates one with the set's tokens."""
        prompts = self.prompt_set(claim.prompts)
        if claim.prompt is None:
            return prompts
        same = [p for p in prompts if p.text == claim.prompt]
        if same:
            return tuple(same[:1])
        if not prompts:
            return (Prompt(text=claim.prompt, loc=("claims",)),)
        first = prompts[0]
        return (Prompt(text=claim.prompt, answer=first.answer, foil=first.foil, loc=first.loc),)


# ----------------------------------------------------------------------------- loading

def load_spec(path: str | Path) -> Spec:
    """The first two stages on one spec file: `read_spec`, then `resolve_prompts`. Raises
    SpecError (possibly several)."""
    return resolve_prompts(read_spec(path))


def load_spec_text(text: str, name: str = "notebook", file: str = "<string>") -> Spec:
    """`load_spec` of a spec written as a YAML string (errors name `file` and its lines)."""
    return resolve_prompts(spec_from_source(read_yaml_text(text, file), name))


def read_spec(path: str | Path) -> Spec:
    """Stage 1: read, parse and cross-check one spec file. Reads nothing but the file: prompt
    families, models and datasets are later stages'."""
    return spec_from_source(read_yaml(Path(path)), Path(path).stem)


def spec_from_source(source: SourcedYaml, name: str) -> Spec:
    """Parsed YAML -> a validated, cross-checked Spec named `name` unless it names itself
    (prompts not yet resolved)."""
    data = source.data
    if not isinstance(data, dict):
        raise SpecError("a spec is a mapping with `models:`, `prompts:` and `claims:`",
                        file=source.file, line=1)
    unknown_measure = _check_measures(data, source)
    if unknown_measure:
        raise unknown_measure
    payload = dict(data, file=source.file)
    if "spec" not in data:
        try:
            payload["spec"] = checked_name(name, "spec name", "; it defaults to the file's "
                                           "stem: rename the file or set `spec: NAME`")
        except ValueError as exc:
            raise SpecError(str(exc), file=source.file, path="spec") from None
    payload["field_lines"] = {format_loc(loc): line for loc, line in source.lines.items()}
    try:
        spec = Spec.model_validate(payload)
    except ValidationError as exc:
        raise _spec_errors(exc, source) from None
    errors = cross_check(spec, source)
    if errors:
        raise _combine(errors)
    return spec


def _check_measures(data: dict, source: SourcedYaml) -> SpecError | None:
    for i, claim in enumerate(data.get("claims") or []):
        if isinstance(claim, dict) and "measure" in claim and claim["measure"] not in MEASURES:
            loc = ("claims", i, "measure")
            return SpecError(f"unknown measure '{claim['measure']}'"
                             + did_you_mean(claim["measure"], MEASURES),
                             file=source.file, line=source.line_of(loc), path=format_loc(loc))
    return None


def _spec_errors(exc: ValidationError, source: SourcedYaml) -> SpecError:
    errors = []
    order = {"extra_forbidden": 0, "missing": 2}
    for err in sorted(exc.errors(), key=lambda e: order.get(e["type"], 1)):
        loc = _clean_loc(err["loc"])
        errors.append(SpecError(_message(err, loc), file=source.file, line=source.line_of(loc),
                                path=format_loc(loc)))
    return _combine(errors)


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-member names from a location; restore `from`."""
    out: list = []
    for i, part in enumerate(loc):
        # the union member right after a claim's index (not a field named like a measure:
        # a generate claim's `patch`)
        tag = part in MEASURES and i > 0 and isinstance(loc[i - 1], int)
        if isinstance(part, str) and (tag or part.startswith("function-")
                                      or part in ("str", "dict[literal['fraction'],str]",
                                                  "literal['all','any','mean']",
                                                  "ReferencePrompts", "literal['final','all']",
                                                  "dict[literal['token'],str]")):
            continue
        out.append("from" if part == "from_" else part)
    return tuple(out)


def _message(err: dict, loc: tuple) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return f"unknown field '{loc[-1]}'{_field_hint(err, loc)}"
    if kind == "missing":
        return f"missing required field '{loc[-1]}'"
    msg = err["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return msg
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return f"{msg} (got {shown})"


def _field_hint(err: dict, loc: tuple) -> str:
    """'did you mean' among the fields of the object that holds the unknown key."""
    candidates: set[str] = set()
    for cls in (Spec, ModelSource, TrainSource, PromptEntry, Defaults, Tolerance, SaeSource,
                SaeGate, SteerSpec, FeaturePatchSpec, *CLAIM_CLASSES):
        candidates |= {f.alias or name for name, f in cls.model_fields.items()}
    candidates -= {"file", "field_lines"}
    return did_you_mean(loc[-1], candidates).replace("; valid choices", "; known fields")


def _combine(errors: list[SpecError]) -> SpecError:
    first = errors[0]
    if len(errors) > 1:
        first.others = errors[1:]
    return first


# ----------------------------------------------------------------------------- cross checks

def cross_check(spec: Spec, source: SourcedYaml) -> list[SpecError]:
    """Checks that need the whole spec: names, references, expectations."""
    errors: list[SpecError] = []

    def add(loc: tuple, message: str) -> None:
        errors.append(SpecError(message, file=source.file, line=source.line_of(loc),
                                path=format_loc(loc)))

    seen: dict[str, int] = {}
    for i, claim in enumerate(spec.claims):
        if claim.id in seen:
            add(("claims", i, "id"), f"duplicate claim id '{claim.id}' (first used by "
                                     f"claims[{seen[claim.id]}])")
        seen.setdefault(claim.id, i)
        for field, name in _model_refs(claim):
            if name not in spec.models:
                add(("claims", i, field), f"unknown model '{name}'"
                    + did_you_mean(name, spec.models))
        if claim.prompts is not None and claim.prompts not in spec.prompt_sets:
            add(("claims", i, "prompts"), f"unknown prompt set '{claim.prompts}'"
                + did_you_mean(claim.prompts, spec.prompt_sets or ["(none defined)"]))
        reference = getattr(claim, "reference_prompts", None)
        if reference is not None and reference not in spec.prompt_sets:
            add(("claims", i, "reference"), f"unknown prompt set '{reference}' (reference "
                "prompts are a named set under `prompt_sets:`)"
                + did_you_mean(reference, spec.prompt_sets or ["(none defined)"]))
        for loc, message in check_expectation_spec(claim):
            add(("claims", i) + loc, message)
        if "mean_score" in claim.expect and not getattr(claim, "score_with", None):
            add(("claims", i, "expect", "mean_score"), "`mean_score` needs `score_with: "
                                                       "REWARD_MODEL` on the claim")
        if claim.ci is not None and (not claim.has_intervals() or claim.per_prompt != "mean"):
            add(("claims", i, "ci"), labels.ci_rule(CLAIM_KINDS))
        if "per_prompt" in claim.model_fields_set and claim.value_kind() not in PER_PROMPT_KINDS:
            add(("claims", i, "per_prompt"), f"`per_prompt` does not apply here: this "
                f"{claim.measure} claim measures a {claim.value_kind()} (one value for all its "
                "prompts, not one per prompt), so the expectation reads that value; remove "
                "`per_prompt`")
        if all(key in MODIFIERS for key in claim.expect) and claim.expect \
                and not spec.defaults.baseline:
            add(("claims", i, "expect"), f"`expect` holds only a tolerance "
                f"({', '.join(claim.expect)}), which checks nothing by itself; add what should "
                "hold, e.g. {approx: 0.5, atol: 0.1} or {baseline: true, atol: 0.1}")
        if getattr(claim, "span", "all") != "all" and claim.measure not in SEQUENCE_METRICS \
                and getattr(claim, "metric", None) not in SEQUENCE_METRICS:
            add(("claims", i, "span"), "`span` applies to `loss` and `accuracy` claims and to "
                                       "`metric: loss | accuracy`")
        if claim.measure in SAE_MEASURES:
            _check_sae_claim(spec, claim, ("claims", i), add)
        if getattr(claim, "intervene", None) is not None:
            _check_sae_claim(spec, claim.intervene, ("claims", i, "intervene"), add)
        if claim.search is not None and not claim.SEARCHABLE:
            add(("claims", i, "search"), f"`search` applies to {', '.join(SEARCHABLE_MEASURES)}"
                                         f" claims, not '{claim.measure}'")
    for name, sae in spec.saes.items():
        if sae.model is not None and sae.model not in spec.models:
            add(("saes", name, "model"), f"unknown model '{sae.model}'"
                + did_you_mean(sae.model, spec.models))
    for name, model in spec.models.items():
        if model.train is not None and model.train.base not in spec.models:
            add(("models", name, "train", "base"), f"unknown base model '{model.train.base}'"
                + did_you_mean(model.train.base, spec.models))
    return errors


# ----------------------------------------------------------------------------- prompts

def resolve_prompts(spec: Spec) -> Spec:
    """Stage 2: read every prompt set once (templates, files, datasets, the toy corpus), then
    check what needs the prompts. Returns the spec holding them (the same spec when it already
    does); raises SpecError naming the set, row or claim."""
    if spec.resolved:
        return spec
    resolved, errors = {}, []
    for name in [None, *spec.prompt_sets]:
        loc = ("prompt_sets", name) if name else ("prompts",)
        try:
            resolved[name or ""] = expand(spec.prompt_sets[name] if name else spec.prompts,
                                          loc, spec.directory)
        except HarnessError as exc:
            errors.append(spec.error(getattr(exc, "loc", loc), str(exc)))
    if errors:
        raise _combine(errors)
    out = spec.model_copy()
    out._resolved = resolved
    errors = prompt_errors(out)
    if errors:
        raise _combine(errors)
    return out


def prompt_errors(spec: Spec) -> list[SpecError]:
    """The checks that need the resolved prompts: answer != foil, every claim has prompts and
    the answers, foils and corrupt texts it reads."""
    errors: list[SpecError] = []
    for name in [None, *spec.prompt_sets]:
        for prompt in spec.prompt_set(name):
            if prompt.answer is not None and prompt.answer == prompt.foil:
                errors.append(spec.error(
                    prompt.loc + ("foil",), f"answer and foil are both {prompt.answer!r}: the "
                    "logit difference of a token with itself is always 0; give two different "
                    "tokens"))
                break
    for i, claim in enumerate(spec.claims):
        if not spec.prompt_set(claim.prompts) and claim.prompt is None \
                and not _generates_inputs(claim):
            errors.append(spec.error(("claims", i), "this claim has no prompts: add `prompts:` "
                                                    "to the spec"))
        if claim.reads_answers():
            for prompt in spec.claim_prompts(claim):
                missing = [n for n in ("answer", "foil") if getattr(prompt, n) is None]
                if missing:
                    where = f"{prompt.row}: " if prompt.row else ""
                    errors.append(spec.error(
                        prompt.loc, f"{where}this prompt has no `{missing[0]}`, but claim "
                        f"'{claim.id}' ({claim.measure}) reads each prompt's answer and foil: "
                        f"add `{missing[0]}: TOKEN` (one token, e.g. \" bad\") to the prompt, "
                        "its rows or its entry"))
                    break
        if _needs_corrupt(claim) and not any(p.corrupt for p in spec.claim_prompts(claim)):
            where = f"prompt set '{claim.prompts}'" if claim.prompts else "the spec's prompts"
            errors.append(spec.error(("claims", i), "patching from/into `input: corrupt` needs "
                                     f"prompts with `corrupt:` texts, and {where} has none"
                                     + (" matching `prompt:`" if claim.prompt else "")
                                     + "; add `corrupt: TEXT` to the prompts (or their rows)"))
    return errors


def _generates_inputs(claim) -> bool:
    """head_scores claims make their own inputs unless they draw tokens from the prompts."""
    return isinstance(claim, HeadScoresClaim) and claim.random_tokens.vocab == "all"


def _check_sae_claim(spec: Spec, claim, loc: tuple, add) -> None:
    """The SAE exists; control prompt sets exist; patched-from models exist."""
    if claim.sae not in spec.saes:
        add(loc + ("sae",), f"unknown SAE '{claim.sae}'"
            + did_you_mean(claim.sae, spec.saes or ["(none defined: add `saes:`)"]))
    control = getattr(claim, "control", None)
    if control is not None and control not in spec.prompt_sets:
        add(loc + ("control",), f"unknown prompt set '{control}'"
            + did_you_mean(control, spec.prompt_sets or ["(none defined)"]))
    patch = getattr(claim, "patch", None)
    if patch is not None and patch.from_ not in spec.models:
        add(loc + ("patch", "from"), f"unknown model '{patch.from_}'"
            + did_you_mean(patch.from_, spec.models))


def _model_refs(claim) -> list[tuple[str, str]]:
    if isinstance(claim, FeatureInterventionClaim):
        return [("model", claim.model)]
    if isinstance(claim, PatchClaim | PathPatchClaim):
        return [("from", claim.from_.model), ("into", claim.into.model)]
    if isinstance(claim, GenerateClaim):
        refs = [("model", claim.model)]
        refs += [("patch.from", claim.patch.from_.model)] if claim.patch else []
        if claim.intervene is not None and claim.intervene.patch is not None:
            refs += [("intervene.patch.from", claim.intervene.patch.from_)]
        return refs + ([("score_with", claim.score_with)] if claim.score_with else [])
    refs = [("models" if getattr(claim, "models", None) else "model", n)
            for n in claim.model_names()]
    if isinstance(claim, AblateClaim) and claim.reference_model:
        refs[-1] = ("reference", claim.reference_model)
    return refs


def _needs_corrupt(claim) -> bool:
    if isinstance(claim, GenerateClaim):
        return "corrupt" in (claim.input, claim.patch.from_.input if claim.patch else None)
    return isinstance(claim, PatchClaim | PathPatchClaim) and \
        "corrupt" in (claim.from_.input, claim.into.input)


def find_specs(paths: list[str | Path]) -> list[Path]:
    """Spec files named directly or found (recursively, sorted) in directories."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.y*ml") if q.suffix in (".yaml", ".yml")
                            and not q.name.endswith(".baseline.yaml"))
        else:
            found.append(p)
    return found
