"""The one grammar of the names a spec writes and a report shows: component labels (`L3H7`,
`L3KV1`, `L3N12`, `mlp3`, `resid_pre3`, ...), position rules, spans, sweep axes, sequence
metrics, edges of a model's graph (`L0H1 -> L1H2:k`) and which claims take `ci`.

Each is defined here once and parsed and formatted by the same code, so a label a report prints
is one a spec can name (`parse_label(format_label(x)) == x`). docs/spec-format.md's tables are
generated from these definitions (`doc_tables`; tests/test_labels.py fails when they differ).
Standard library only: the spec loader, static checks, measurements and reports all import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Union

from harness.errors import safe_text

# ----------------------------------------------------------------------------- component labels


@dataclass(frozen=True)
class Head:
    """An attention head: query head `L3H7`, or key/value head `L3KV1` (`kv`: sites k and v,
    where on a grouped-query model several query heads share one key/value head)."""

    layer: int
    head: int
    kv: bool = False

    def __str__(self) -> str:
        return f"L{self.layer}{'KV' if self.kv else 'H'}{self.head}"


@dataclass(frozen=True)
class Neuron:
    """A neuron of one layer's MLP (site `mlp_post`): `L3N12`."""

    layer: int
    neuron: int

    def __str__(self) -> str:
        return f"L{self.layer}N{self.neuron}"


LAYER_PARTS = ("resid_pre", "resid_mid", "resid_post", "attn", "mlp")


@dataclass(frozen=True)
class LayerPart:
    """A whole piece of one layer: a residual stream (`resid_pre3`) or a block's attention or
    MLP output (`attn3`, `mlp3`)."""

    part: str      # one of LAYER_PARTS
    layer: int

    def __str__(self) -> str:
        return f"{self.part}{self.layer}"


# labels that name no layer, and what each names
WORDS: dict[str, str] = {
    "embed": "the embeddings (`dla`; by component without the position embeddings)",
    "pos_embed": "the learned position embeddings (`dla` by component, where the model has them)",
    "bias": "the unembedding's bias (`dla` by layer and by component)",
    "rest": "everything but the heads, the unembedding's bias included (`dla` by head)",
    "final": "the residual stream after the last block (`logit_lens`)",
    "circuit": "the whole circuit (`circuit` completeness)",
}

Label = Union[Head, Neuron, LayerPart, str]  # noqa: UP007  (str: one of WORDS)


@dataclass(frozen=True)
class Form:
    """One way of writing a label, as the docs' table and the error messages show it."""

    key: str
    written: str     # the form, e.g. "L{layer}H{head}"
    example: str
    plural: str      # what labels of this form name, for messages: "query heads"
    names: str       # what the example names


FORMS: dict[str, Form] = {f.key: f for f in (
    Form("head", "L{layer}H{head}", "L3H7", "query heads",
         "query head 7 of layer 3: `heads` of sites `z`, `q`, `pattern`; `dla` by head; "
         "[layer, head] grids; circuit components"),
    Form("kv_head", "L{layer}KV{head}", "L3KV1", "key/value heads",
         "key/value head 1 of layer 3: `heads` of sites `k`, `v`; `path_patch` receivers "
         "on `k`, `v`"),
    Form("neuron", "L{layer}N{neuron}", "L3N12", "MLP neurons",
         "neuron 12 of layer 3's MLP (site `mlp_post`): [layer, neuron] grids"),
    Form("mlp", "mlp{layer}", "mlp3", "MLP layers",
         "layer 3's MLP output: `dla` by component; circuit components"),
    Form("attn", "attn{layer}", "attn3", "attention layers",
         "layer 3's attention output: `dla` by component"),
    Form("resid", "resid_pre{layer}, resid_mid{layer}, resid_post{layer}", "resid_pre3",
         "residual streams",
         "the residual stream entering layer 3 (`resid_mid`: between its attention and MLP; "
         "`resid_post`: leaving it): `logit_lens` entries"),
    Form("word", ", ".join(WORDS), "final", "named pieces", "one of WORDS"),
)}

_N = r"([0-9]+)"
HEAD_RE = re.compile(rf"\AL{_N}(?:H|KV){_N}\Z")   # both head forms: groups layer, head
COMPONENT_RE = re.compile(rf"\A(?:L{_N}H{_N}|mlp{_N})\Z")   # matches what parse_component reads
_NEURON_RE = re.compile(rf"\AL{_N}N{_N}\Z")
_PART_RE = re.compile(rf"\A({'|'.join(LAYER_PARTS)}){_N}\Z")
_RESID = ("resid_pre", "resid_mid", "resid_post")


def _parse(text: str, key: str) -> Label | None:
    if key in ("head", "kv_head"):
        match = HEAD_RE.match(text)
        kv = key == "kv_head"
        if match and ("KV" in text) == kv:
            return Head(int(match.group(1)), int(match.group(2)), kv)
        return None
    if key == "neuron":
        match = _NEURON_RE.match(text)
        return Neuron(int(match.group(1)), int(match.group(2))) if match else None
    if key == "word":
        return text if text in WORDS else None
    match = _PART_RE.match(text)
    if not match or (match.group(1) in _RESID) != (key == "resid") \
            or (key != "resid" and match.group(1) != key):
        return None
    return LayerPart(match.group(1), int(match.group(2)))


class LabelError(ValueError):
    """A label that is not one of the forms asked for; the message lists them."""


def forms_help(forms: Iterable[str]) -> str:
    """'query heads as L{layer}H{head} (e.g. L3H7) or MLP layers as mlp{layer} (e.g. mlp3)'."""
    parts = [f"{FORMS[k].plural} as {FORMS[k].written} (e.g. {FORMS[k].example})"
             if k != "word" else f"one of {FORMS[k].written}" for k in forms]
    return ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]


def parse_label(text: object, forms: Iterable[str] = tuple(FORMS), what: str = "label"
                ) -> Label:
    """The label `text` names, in one of `forms` (keys of FORMS). Raises LabelError saying what
    was given, which forms are valid, and an example of each."""
    forms = tuple(forms)
    if isinstance(text, str):
        for key in forms:
            label = _parse(text, key)
            if label is not None:
                return label
    raise LabelError(f"{safe_text(repr(text))} is not a {what}; write {forms_help(forms)}")


def format_label(label: Label) -> str:
    """The text of a label: the inverse of `parse_label`."""
    if isinstance(label, str):
        if label not in WORDS:
            raise LabelError(f"{safe_text(repr(label))} is not a named label ({', '.join(WORDS)})")
        return label
    return str(label)


def parse_component(text: object) -> Head | LayerPart:
    """A circuit component: a query head (`L1H0`) or a layer's MLP (`mlp0`)."""
    return parse_label(text, ("head", "mlp"), "component")  # type: ignore[return-value]


# grid cells a label names: the axes of a [layer, head] or [layer, neuron] grid
def label_cell(label: Label) -> dict[str, int] | None:
    """`L3H7` -> {layer: 3, head: 7}; `L3N12` -> {layer: 3, neuron: 12}; other labels None."""
    if isinstance(label, Head):
        return {"layer": label.layer, "head": label.head}
    if isinstance(label, Neuron):
        return {"layer": label.layer, "neuron": label.neuron}
    return None


def cell_label(cell: Mapping[str, object]) -> str | None:
    """The label that names a grid cell given by its axes (the inverse of `label_cell`), or
    None where no label form names exactly those axes."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in cell.values()):
        return None
    if set(cell) == {"layer", "head"}:
        return format_label(Head(cell["layer"], cell["head"]))  # type: ignore[arg-type]
    if set(cell) == {"layer", "neuron"}:
        return format_label(Neuron(cell["layer"], cell["neuron"]))  # type: ignore[arg-type]
    return None


# ----------------------------------------------------------------------------- edges

# An edge of a model's computational graph runs from a sender's output to a receiver's input:
# senders are the embeddings, each query head's output and each MLP; receivers each head's
# q, k or v input, each MLP and the logits. On a grouped-query model the k and v inputs belong
# to key/value heads (`L1KV0:k`); where every query head has its own key/value head the
# query-head form (`L1H2:k`) names the same input (edge_graph.py normalizes to it).
HEAD_INPUTS = ("q", "k", "v")
EDGE_SENDER_WORDS = ("embed",)
EDGE_RECEIVER_WORDS = ("logits",)


@dataclass(frozen=True)
class HeadInput:
    """One input of an attention head: `L1H2:q`, `L1H2:k`, `L1KV0:v` (k and v only on
    key/value heads)."""

    head: Head
    input: str     # one of HEAD_INPUTS

    def __str__(self) -> str:
        return f"{self.head}:{self.input}"


EdgeSender = Union[Head, LayerPart, str]  # noqa: UP007  (L0H1, mlp3, embed)
EdgeReceiver = Union[HeadInput, LayerPart, str]  # noqa: UP007  (L1H2:k, mlp3, logits)


@dataclass(frozen=True)
class EdgeLabel:
    """`L0H1 -> L1H2:k`: the sender's output reaches the receiver's input."""

    sender: EdgeSender
    receiver: EdgeReceiver

    def __str__(self) -> str:
        return f"{format_edge_end(self.sender)} -> {format_edge_end(self.receiver)}"


EDGE_FORMS: dict[str, tuple[str, str, str]] = {   # form -> (written, example, names)
    "sender": ("embed, L{layer}H{head}, mlp{layer}", "L0H1",
               "a sender: the embeddings, a query head's output, an MLP's output"),
    "receiver": ("L{layer}H{head}:q, L{layer}H{head}:k, L{layer}H{head}:v, "
                 "L{layer}KV{head}:k, L{layer}KV{head}:v, mlp{layer}, logits", "L1H2:k",
                 "a receiver: a head's query, key or value input (key/value heads `L1KV0:k` "
                 "on grouped-query models), an MLP's input, the logits"),
    "edge": ("SENDER -> RECEIVER", "L0H1 -> L1H2:k",
             "head 1 of layer 0 reaches head 2 of layer 1 through its keys"),
}
EDGE_HELP = ("an edge is 'SENDER -> RECEIVER': senders embed, L{layer}H{head} or mlp{layer}; "
             "receivers L{layer}H{head}:q|k|v, L{layer}KV{head}:k|v, mlp{layer} or logits "
             "(e.g. 'L0H1 -> L1H2:k', 'mlp3 -> L5H0:q', 'embed -> mlp0', 'L9H9 -> logits')")
_EDGE_RE = re.compile(r"\A(\S+) +-> +(\S+)\Z")
_INPUT_RE = re.compile(rf"\AL{_N}(H|KV){_N}:([qkv])\Z")


def format_edge_end(end: EdgeSender | EdgeReceiver) -> str:
    return end if isinstance(end, str) else str(end)


def parse_edge_sender(text: object) -> EdgeSender:
    """`embed`, a query head `L0H1` or an MLP `mlp3`."""
    if text in EDGE_SENDER_WORDS:
        return text  # type: ignore[return-value]
    try:
        return parse_label(text, ("head", "mlp"), "edge sender")  # type: ignore[return-value]
    except LabelError:
        raise LabelError(f"{safe_text(repr(text))} is not an edge sender; write embed, "
                         "L{layer}H{head} (e.g. L0H1) or mlp{layer} (e.g. mlp3)") from None


def parse_edge_receiver(text: object) -> EdgeReceiver:
    """A head input `L1H2:q` / `L1KV0:k`, an MLP `mlp3` or `logits`."""
    if text in EDGE_RECEIVER_WORDS:
        return text  # type: ignore[return-value]
    if isinstance(text, str):
        match = _INPUT_RE.match(text)
        if match:
            kv, which = match.group(2) == "KV", match.group(4)
            if kv and which == "q":
                raise LabelError(f"{safe_text(repr(text))}: q inputs belong to query heads; "
                                 f"write L{int(match.group(1))}H{{head}}:q")
            return HeadInput(Head(int(match.group(1)), int(match.group(3)), kv), which)
        if _PART_RE.match(text) and text.startswith("mlp"):
            return parse_label(text, ("mlp",))  # type: ignore[return-value]
    raise LabelError(f"{safe_text(repr(text))} is not an edge receiver; write "
                     "L{layer}H{head}:q|k|v (e.g. L1H2:k), L{layer}KV{head}:k|v (e.g. L1KV0:v), "
                     "mlp{layer} (e.g. mlp3) or logits")


def parse_edge(text: object) -> EdgeLabel:
    """'L0H1 -> L1H2:k' -> EdgeLabel(Head(0, 1), HeadInput(Head(1, 2), "k")). Only the grammar:
    whether the edge exists in a model (sender upstream of receiver, heads in range) is
    `edge_graph.edge_problem`'s question."""
    match = _EDGE_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise LabelError(f"{safe_text(repr(text))} is not an edge; {EDGE_HELP}")
    return EdgeLabel(parse_edge_sender(match.group(1)), parse_edge_receiver(match.group(2)))


def format_edge(edge: EdgeLabel) -> str:
    """The inverse of `parse_edge`."""
    return str(edge)


# ----------------------------------------------------------------------------- position rules

# where a feature is read in each prompt: a word, or {token: TEXT}
FINAL_POSITION = "final"
ALL_POSITIONS = "all"
POSITION_WORDS: dict[str, str] = {
    FINAL_POSITION: "each prompt's last token (the default)",
    ALL_POSITIONS: "every token but BOS",
}
TOKEN_POSITION_HELP = "every occurrence of that token (one token; a prompt without it is an error)"
POSITION_HELP = "a position is final, all or {token: ' word'}"

# the pydantic types of a `position:` field (spec.py) and of a feature edit's `positions:`
PositionWord = Literal[tuple(POSITION_WORDS)]  # type: ignore[valid-type]
Position = Union[PositionWord, dict[Literal["token"], str]]  # noqa: UP007


@dataclass(frozen=True)
class TokenPosition:
    """`{token: " bad"}`: the positions holding that token."""

    token: str


PositionRule = Union[str, TokenPosition]  # noqa: UP007  (str: one of POSITION_WORDS)


def parse_position(value: object) -> PositionRule:
    """A position rule as a spec writes it -> "final", "all" or a TokenPosition."""
    if isinstance(value, str) and value in POSITION_WORDS:
        return value
    if isinstance(value, TokenPosition):
        return value
    if isinstance(value, Mapping) and set(value) == {"token"} and isinstance(value["token"], str):
        return TokenPosition(value["token"])
    raise LabelError(f"{POSITION_HELP}; got {safe_text(repr(value))}")


def format_position(rule: PositionRule) -> str | dict[str, str]:
    """The inverse of `parse_position`: how a spec writes the rule."""
    return {"token": rule.token} if isinstance(rule, TokenPosition) else rule


# ----------------------------------------------------------------------------- spans

# which of each prompt's tokens a sequence metric scores (`span:`): a word or a mapping
SPAN_WORDS: dict[str, str] = {
    "all": "every token of the text (the first too, when BOS is prepended)",
    "second_half": "the last ⌊n/2⌋ of the n text tokens: the repeat of a sequence written twice",
}
DEFAULT_SPAN = "all"
SPAN_MAPPINGS: dict[str, str] = {
    "{start: A, stop: B}": "text tokens A..B−1, Python slice rules (negatives count from the "
                           "end; either may be left out)",
    "{after: TOKEN}": "the tokens after the first occurrence of a marker token (one token; a "
                      "prompt without it is an error)",
}
_SPAN_FORMS = (*SPAN_WORDS, *SPAN_MAPPINGS)
SPAN_HELP = f"a span is {', '.join(_SPAN_FORMS[:-1])} or {_SPAN_FORMS[-1]}"


# ----------------------------------------------------------------------------- sweep axes

# `over:` of a patch sweep -> which sites take it and what the grid holds
SWEEP_AXES: dict[tuple[str, ...], str] = {
    ("layer", "pos"): "every site: one cell per layer and position",
    ("layer",): "every site: all positions of a layer at once",
    ("layer", "head"): "head sites: one cell per layer and head (key/value heads on `k`, `v`)",
    ("layer", "head", "pos"): "head sites: one cell per layer, head and position",
}


def format_axes(axes: Iterable[str]) -> str:
    """("layer", "pos") -> "[layer, pos]", as a spec writes `over:`."""
    return f"[{', '.join(map(str, axes))}]"


def sweep_axes_problem(over: Iterable[str]) -> str | None:
    """Why `over` is not a sweep (None: it is one)."""
    over = tuple(over)
    if over in SWEEP_AXES:
        return None
    return (f"`over: {safe_text(format_axes(over))}` is not a sweep; use one of "
            + ", ".join(format_axes(a) for a in SWEEP_AXES))


# ----------------------------------------------------------------------------- sequence metrics

# metrics that score a span of each prompt's tokens instead of reading its answer and foil
SEQUENCE_METRIC_HELP: dict[str, str] = {
    "loss": "mean next-token cross-entropy (nats) over the span's tokens",
    "accuracy": "share of the span's tokens that are the previous position's argmax",
}
SEQUENCE_METRICS: tuple[str, ...] = tuple(SEQUENCE_METRIC_HELP)


# ----------------------------------------------------------------------------- `ci`

# claims that take `ci:` in some of their forms only: measure -> (words before, words after)
def ci_conditions(kinds: Mapping[str, type]) -> dict[str, tuple[str, str]]:
    """The kinds whose `has_intervals()` reads their fields, with the words their class puts
    around its measure name (`CI_WHEN`, e.g. ("single-feature ", "")), so each kind states
    its own condition in its own module."""
    return {m: cls.CI_WHEN for m, cls in kinds.items() if getattr(cls, "CI_WHEN", None)}


def ci_claims(kinds: Mapping[str, type]) -> str:
    """Which claims take `ci:`, in words, from the claim classes (measure -> class): those
    with `HAS_INTERVALS`, and those with a `CI_WHEN` condition (their `has_intervals()`
    decides)."""
    conditions = ci_conditions(kinds)
    named = [f"{conditions[m][0]}`{m}`{conditions[m][1]}" if m in conditions
             else f"`{m}`" for m, cls in kinds.items()
             if m in conditions or getattr(cls, "HAS_INTERVALS", False)]
    return ", ".join(named[:-1]) + " and " + named[-1] + " claims"


def ci_rule(kinds: Mapping[str, type]) -> str:
    """The spec error for `ci:` where it does not apply."""
    return (f"`ci` applies to {ci_claims(kinds)} over the mean of their prompts "
            "(per_prompt: mean)")


# ----------------------------------------------------------------------------- docs

def markdown_table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _code_list(text: str) -> str:
    return ", ".join(f"`{part}`" for part in text.split(", "))


def doc_tables() -> dict[str, str]:
    """docs/spec-format.md's tables of this grammar, by the name of their marker comment."""
    forms = [f for f in FORMS.values() if f.key != "word"]
    return {
        "labels": markdown_table(
            ("label", "example", "names"),
            [(_code_list(f.written), f"`{f.example}`", f.names) for f in forms]
            + [(f"`{word}`", f"`{word}`", meaning) for word, meaning in WORDS.items()]),
        "edges": markdown_table(
            ("part", "written", "example", "names"),
            [(key, _code_list(written), f"`{example}`", names)
             for key, (written, example, names) in EDGE_FORMS.items()]),
        "positions": markdown_table(
            ("position", "reads"),
            [(f"`{word}`", meaning) for word, meaning in POSITION_WORDS.items()]
            + [('`{token: " bad"}`', TOKEN_POSITION_HELP)]),
        "spans": markdown_table(
            ("span", "scored tokens"),
            [(f"`{word}`" + (" (default)" if word == DEFAULT_SPAN else ""), meaning)
             for word, meaning in SPAN_WORDS.items()]
            + [(f"`{form}`", meaning) for form, meaning in SPAN_MAPPINGS.items()]),
        "sweep_axes": markdown_table(
            ("over", "sites and cells"),
            [(f"`{format_axes(axes)}`", meaning) for axes, meaning in SWEEP_AXES.items()]),
        "sequence_metrics": markdown_table(
            ("metric", "each prompt's value"),
            [(f"`{m}`", meaning) for m, meaning in SEQUENCE_METRIC_HELP.items()]),
    }
