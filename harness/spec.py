"""The spec format: frozen, typed objects and `load_spec`, which validates everything it can
without loading weights. Every error names the file, the line and the field path."""

from __future__ import annotations

import itertools
import json
import math
import re
import string
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from harness import labels
from harness.errors import HarnessError, SpecError, did_you_mean
from harness.expect import MODIFIERS, PER_PROMPT_KINDS, check_expectation_spec

# The claim kinds live in harness/kinds/ (one module per kind), below this module: the names
# below are re-exported so that `harness.spec` stays the one place to import the spec format.
from harness.kinds import (  # noqa: F401
    CLAIM_CLASSES,
    CLAIM_KINDS,
    MEASURES,
    SAE_MEASURES,
    SEARCHABLE_MEASURES,
    measure_name,
)
from harness.kinds.base import (  # noqa: F401
    NAME_RE,
    SEQUENCE_METRICS,
    ClaimBase,
    Frozen,
    PerPrompt,
    SearchSpec,
    SingleModelClaim,
    Tolerance,
    checked_name,
    parse_comparison,
)
from harness.kinds.fields import (  # noqa: F401
    SPAN_HELP,
    FeatureEdit,
    FeaturePatchSpec,
    FeatureReading,
    Position,
    ReferencePrompts,
    RunRef,
    SiteSelection,
    SpanAfter,
    SpanRange,
    SpanSpec,
    SteerSpec,
)
from harness.kinds.generate import GenerationPatch  # noqa: F401
from harness.kinds.patching import SWEEP_AXES  # noqa: F401
from harness.kinds.readout import OneOrTwoModels  # noqa: F401
from harness.kinds.sequence import SequenceClaim  # noqa: F401
from harness.labels import COMPONENT_RE  # noqa: F401  (tests/test_labels.py reads it here)
from harness.sources import SOURCE_FIELDS
from harness.yamlsource import SourcedYaml, format_loc, read_yaml, read_yaml_text

globals().update({cls.__name__: cls for cls in CLAIM_CLASSES})   # spec.PatchClaim, ...

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


# ----------------------------------------------------------------------------- the envelope

class Defaults(Frozen):
    prepend_bos: bool = True
    tolerance: Tolerance = Tolerance()
    baseline: bool = False   # every claim also compares against the stored baseline


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
        for field, name in claim.model_refs():
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
        if claim.holdout is not None and claim.holdout not in spec.prompt_sets:
            add(("claims", i, "holdout"), f"unknown prompt set '{claim.holdout}' (a held-out "
                "set is a named set under `prompt_sets:`)"
                + did_you_mean(claim.holdout, spec.prompt_sets or ["(none defined)"]))
        if claim.holdout is not None and claim.makes_own_inputs():
            add(("claims", i, "holdout"), f"`holdout` measures the claim again on other "
                f"prompts, and this {claim.measure} claim makes its own inputs; remove it")
        if claim.against is not None and not claim.accepts_against():
            add(("claims", i, "against"), against_rule(claim))
        for field, name in claim.other_prompt_sets():
            if field not in ("reference", "control", "holdout") and name not in spec.prompt_sets:
                add(("claims", i, field), f"unknown prompt set '{name}'"
                    + did_you_mean(name, spec.prompt_sets or ["(none defined)"]))
        for loc, message in check_expectation_spec(claim):
            add(("claims", i) + loc, message)
        if "mean_score" in claim.expect and not getattr(claim, "score_with", None):
            add(("claims", i, "expect", "mean_score"), "`mean_score` needs `score_with: "
                                                       "REWARD_MODEL` on the claim")
        if claim.ci is not None and (not claim.has_intervals() or claim.per_prompt != "mean"):
            add(("claims", i, "ci"), labels.ci_rule(CLAIM_KINDS))
        if claim.confidence is not None:
            _check_confidence(claim, ("claims", i), add)
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
        if getattr(claim, "span", "all") != "all" and not claim.scores_span():
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


def _check_confidence(claim, loc: tuple, add) -> None:
    """`confidence:` needs per-prompt values to resample, one value judged (not each prompt)
    and no second level beside it."""
    if not claim.resamples_prompts():
        add(loc + ("confidence",), f"`confidence` does not apply to this {claim.measure} claim: "
            "it keeps no per-prompt values to resample; remove `confidence`")
    elif claim.per_prompt != "mean":
        add(loc + ("confidence",), "`confidence` judges the value over all prompts again on "
            "resamples of them; with `per_prompt` every prompt is judged already: remove one")
    elif claim.ci is not None:
        add(loc + ("confidence",), "give `ci` or `confidence`, not both: on a number both set "
            "the level of the interval that must lie inside the bound")


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
                and not claim.makes_own_inputs():
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
        if claim.needs_corrupt() and not any(p.corrupt for p in spec.claim_prompts(claim)):
            where = f"prompt set '{claim.prompts}'" if claim.prompts else "the spec's prompts"
            errors.append(spec.error(("claims", i), "patching from/into `input: corrupt` needs "
                                     f"prompts with `corrupt:` texts, and {where} has none"
                                     + (" matching `prompt:`" if claim.prompt else "")
                                     + "; add `corrupt: TEXT` to the prompts (or their rows)"))
        if claim.holdout in spec.prompt_sets:
            errors += _holdout_errors(spec, claim, i)
    return errors


def _holdout_errors(spec: Spec, claim, i: int) -> list[SpecError]:
    """The held-out set has prompts, and the answers, foils and corrupt texts the claim reads."""
    held = spec.prompt_set(claim.holdout)
    loc, where = ("claims", i, "holdout"), f"the held-out prompt set '{claim.holdout}'"
    if not held:
        return [spec.error(loc, f"{where} has no prompts")]
    if claim.reads_answers() and any(p.answer is None or p.foil is None for p in held):
        return [spec.error(loc, f"{where} has prompts without `answer` or `foil`, but claim "
                                f"'{claim.id}' ({claim.measure}) reads both; add them")]
    if claim.needs_corrupt() and not all(p.corrupt for p in held):
        return [spec.error(loc, f"{where} has prompts without `corrupt:` texts, which this "
                                "patching claim reads; add `corrupt: TEXT` to them")]
    return []


def against_rule(claim) -> str:
    """Why `against` does not apply to this claim, and where it does."""
    where = ", ".join(f"`{name}` ({cls.AGAINST})" for name, cls in CLAIM_KINDS.items()
                      if cls.AGAINST)
    return (f"`against: random` compares a named selection with random ones, and this "
            f"{claim.measure} claim names none it can draw; it applies to {where}")


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
