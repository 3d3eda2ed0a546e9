"""Spec fields that several claim kinds share: runs to patch between, site selections,
spans, reference prompt sets, component labels, SAE readings and edits."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from harness import labels
from harness.edge_graph import order_problem
from harness.errors import did_you_mean, safe_text
from harness.kinds.base import Frozen, Index
from harness.sites import HEAD_SITES, KV_SITES, SITES, parse_head


class SpanRange(Frozen):
    """`span: {start: a, stop: b}`: text tokens a..b-1 of each prompt (negatives from its end)."""

    start: int | None = None
    stop: int | None = None


class SpanAfter(Frozen):
    """`span: {after: TOKEN}`: the tokens after the first occurrence of a marker token."""

    after: str


SPAN_HELP = labels.SPAN_HELP
SPAN_WORDS = tuple(labels.SPAN_WORDS)


def _parse_span(value):
    """One clear error for a bad span instead of one per member of the union."""
    if isinstance(value, SpanRange | SpanAfter):
        return value
    if isinstance(value, str):
        if value in SPAN_WORDS:
            return value
        hint = did_you_mean(value, SPAN_WORDS)
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


SpanWord = Literal[SPAN_WORDS]  # type: ignore[valid-type]
SpanSpec = Annotated[Union[SpanWord, SpanRange, SpanAfter],  # noqa: UP007
                     BeforeValidator(_parse_span)]




class RunRef(Frozen):
    """One side of a patch: a model on the clean or the corrupt prompts."""

    model: str
    input: Literal["clean", "corrupt"] = "clean"


def _run_ref(value):
    return RunRef(model=value) if isinstance(value, str) else value


class FromInto(Frozen):
    """Two runs of a patch: the values come `from` one and are written `into` the other. A
    kind declares the fields itself (`from_: RunRef = Field(alias="from")`, `into: RunRef`,
    after `measure`), so its report's `params` keep their order."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("from_", "into", mode="before", check_fields=False)
    @classmethod
    def _refs(cls, value):
        return _run_ref(value)

    def model_refs(self) -> list[tuple[str, str]]:
        return [("from", self.from_.model), ("into", self.into.model)]

    def needs_corrupt(self) -> bool:
        return "corrupt" in (self.from_.input, self.into.input)

    def pairs_clean_and_corrupt(self) -> bool:
        return self.from_.input != self.into.input


HEAD_FORMS = ("head", "kv_head")   # L3H7, L3KV1: which one a site takes is `sites.parse_head`


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
            try:
                labels.parse_label(head, HEAD_FORMS, "head name")
            except labels.LabelError as exc:
                raise ValueError(f"{exc}; key/value heads are for sites k and v") from None
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
        heads = [labels.parse_label(h, HEAD_FORMS) for h in self.heads]
        return tuple((head.layer, head.head) for head in heads)  # type: ignore[union-attr]

    def selection_indices(self, where: tuple = ()) -> list[Index]:
        """The layers, heads (query or key/value, as the site has) and neurons selected."""
        out = [Index(where + ("layers", i), "layer", layer)
               for i, layer in enumerate(self.layers or ())]
        head_axis = "kv_head" if self.site in KV_SITES else "head"
        for i, (layer, head) in enumerate(self.head_pairs() or ()):
            out += [Index(where + ("heads", i), "layer", layer),
                    Index(where + ("heads", i), head_axis, head)]
        out += [Index(where + ("neurons", i), "neuron", n)
                for i, n in enumerate(self.neurons or ())]
        out += [Index(where + ("positions", i), "position", p)
                for i, p in enumerate(self.positions or ())]
        return out




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
    positions: labels.PositionWord = labels.ALL_POSITIONS

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




class ReferencePrompts(Frozen):
    """`reference: {prompts: SET}`: the prompt set a mean or resample ablation draws from."""

    prompts: str




def _components(value):
    """Circuit component labels (`L1H0`, `mlp0`); a LabelError (a ValueError) names the forms."""
    for label in value or ():
        labels.parse_component(label)
    return value


Position = labels.Position


class FeatureReading(Frozen):
    """Where an SAE feature is read: `position` final | all | {token: " bad"}; `reduce`
    joins several positions of one prompt."""

    sae: str
    position: Position = labels.FINAL_POSITION
    reduce: Literal["max", "mean"] = "max"


def component_indices(components, field: str) -> list[Index]:
    """The layer (and head) of each component label L{layer}H{head} / mlp{layer}."""
    out = []
    for i, text in enumerate(components or ()):
        try:
            component = labels.parse_component(text)
        except labels.LabelError:
            continue   # refused where the field is read (`_components`)
        out.append(Index((field, i), "layer", component.layer))
        if isinstance(component, labels.Head):
            out.append(Index((field, i), "head", component.head))
    return out


def head_indices(labels, field: str, site: str) -> list[Index]:
    """The layer and head of each head label (query heads L3H7, or L3KV1 on k/v sites)."""
    axis = "kv_head" if site in KV_SITES else "head"
    out = []
    for i, label in enumerate(labels or ()):
        layer, head = parse_head(label, site)
        out += [Index((field, i), "layer", layer), Index((field, i), axis, head)]
    return out


def _edge_labels(value):
    """Edge labels (`L0H1 -> L1H2:k`): the grammar and, where layer order alone decides it,
    whether the edge can exist; a ValueError says which and why."""
    for i, text in enumerate(value or ()):
        edge = labels.parse_edge(text)
        problem = order_problem(edge)
        if problem:
            raise ValueError(f"edge {i} {safe_text(repr(text))} does not exist: {problem}")
    if len(set(value or ())) != len(value or ()):
        raise ValueError("an edge is listed twice")
    return value


def edge_indices(edges, field: str) -> list[Index]:
    """The layer and head of each end of each edge label (heads: query heads; key/value heads
    for `L1KV0:k`), for the range checks before weights load."""
    out = []
    for i, text in enumerate(edges or ()):
        try:
            edge = labels.parse_edge(text)
        except labels.LabelError:
            continue   # refused where the field is read (`_edge_labels`)
        for end in (edge.sender, edge.receiver):
            head = end.head if isinstance(end, labels.HeadInput) else end
            if isinstance(head, labels.Head):
                out += [Index((field, i), "layer", head.layer),
                        Index((field, i), "kv_head" if head.kv else "head", head.head)]
            elif isinstance(head, labels.LayerPart):
                out.append(Index((field, i), "layer", head.layer))
    return out
