"""Expectation operators: what a claim says about a measurement, checked and explained.

Each operator is registered with the kinds of measurement it applies to, a validator for its
argument (used by `harness validate`, no weights needed) and a check returning an `Outcome`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.chance import p_value
from harness.errors import did_you_mean
from harness.labels import LabelError, label_cell, parse_label
from harness.measure.results import Grid, PromptParts

if TYPE_CHECKING:   # torch only where a measured tensor is read: validate stays light
    import torch

SCALAR, TEXT, TOKENS, GRID, PAIR, PATCH = "scalar", "text", "tokens", "grid", "pair", "patch"
SAMPLES = "samples"   # several generations, optionally scored by a reward model
FEATURES = "features"  # SAE feature indices (top_features, feature_diff without `feature`)
VALUE_KINDS = (SCALAR, TEXT, TOKENS, GRID, PAIR, PATCH, SAMPLES, FEATURES)
PER_PROMPT_KINDS = (SCALAR, PATCH, TEXT, TOKENS)   # one value per prompt: `per_prompt` applies
MODIFIERS = ("atol", "rtol")


@dataclass(frozen=True)
class Measurement:
    """What a measure produced. `value` is what expectations read.

    kind: scalar (float), patch (float, with raw/from/into in extras), text (str),
    tokens (list[str]), grid (Grid), pair (Grid of b - a, with both grids in extras).
    `per_prompt` holds one value per prompt where the measure has them; `parts` the
    per-prompt tensors a grid or ranking is made from, for the bootstrap (`stability.py`).
    """

    kind: str
    value: object
    per_prompt: tuple | None = None
    extras: dict = field(default_factory=dict)
    parts: PromptParts | None = None


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    margin: float | None = None  # distance to the boundary; positive when the expectation holds


@dataclass(frozen=True)
class Operator:
    name: str
    kinds: tuple[str, ...]
    validate: Callable[[object], str | None]   # returns an error message or None
    check: Callable[[object, object, dict], Outcome]  # (value, arg, modifiers) -> Outcome


OPERATORS: dict[str, Operator] = {}


def operator(name: str, kinds: tuple[str, ...], validate: Callable[[object], str | None]):
    def register(check):
        OPERATORS[name] = Operator(name, kinds, validate, check)
        return check
    return register


# ----------------------------------------------------------------------------- validators

def _number(arg) -> str | None:
    ok = isinstance(arg, int | float) and not isinstance(arg, bool)
    return None if ok else f"needs a number, got {arg!r}"


def _pair_of_numbers(arg) -> str | None:
    if isinstance(arg, list) and len(arg) == 2 and not any(_number(a) for a in arg):
        return None if arg[0] <= arg[1] else f"needs [low, high] with low <= high, got {arg}"
    return f"needs [low, high], got {arg!r}"


def _number_or_list(arg) -> str | None:
    if isinstance(arg, list):
        return None if arg and not any(_number(a) for a in arg) else "needs a list of numbers"
    return _number(arg)


def _one_of(*choices):
    def validate(arg):
        return None if arg in choices else f"must be one of {', '.join(map(str, choices))}, " \
                                           f"got {arg!r}"
    return validate


def _string(arg) -> str | None:
    if not isinstance(arg, str):
        return f"needs a string, got {arg!r}"
    return None if arg else "needs a non-empty text: every text contains ''"


def _string_or_list(arg) -> str | None:
    return None if isinstance(arg, str) else _item_list(arg)


def _item_list(arg) -> str | None:
    """Token strings (top_k) or feature indices (top_features)."""
    ok = isinstance(arg, list) and arg and (all(isinstance(a, str) for a in arg) or all(
        isinstance(a, int) and not isinstance(a, bool) for a in arg))
    return None if ok else f"needs a list of token strings or of feature indices, got {arg!r}"


def _cell(arg) -> str | None:
    if isinstance(arg, str | int) and not isinstance(arg, bool):
        return None
    if isinstance(arg, dict) and arg and all(isinstance(v, int | str) for v in arg.values()):
        return None
    return f"needs a cell: a label such as mlp3 or L3H0, an index, or {{layer: 3, pos: -1}}; " \
           f"got {arg!r}"


def _comparison_map(arg) -> str | None:
    if not isinstance(arg, dict) or not arg:
        return f"needs comparisons such as {{'>=': 0.8}}, got {arg!r}"
    for op, bound in arg.items():
        if op not in COMPARISONS and op != "between":
            return f"unknown comparison '{op}'" + did_you_mean(op, [*COMPARISONS, "between"])
        err = _pair_of_numbers(bound) if op == "between" else _number(bound)
        if err:
            return f"'{op}' {err}"
    return None


def share_bound_problem(op: str, bound) -> str | None:
    """Why a comparison on a share (a fraction of prompts or samples, always in [0, 1]) is no
    test: it holds for every share, or for none; None when it can go either way."""
    if op == "between":
        low, high = bound
        always, never = low <= 0 and high >= 1, high < 0 or low > 1
    else:   # a one-sided bound is monotone in the share: its two ends decide
        ends = [COMPARISONS[op](share, float(bound)) for share in (0.0, 1.0)]
        always, never = all(ends), not any(ends)
    if always:
        return f"'{op} {bound}' holds for every share from 0 to 1: it tests nothing"
    if never:
        return f"'{op} {bound}' holds for no share from 0 to 1: it can never pass"
    return None


def _top(arg) -> str | None:
    if not isinstance(arg, dict) or set(arg) - {"k", "equals", "includes"}:
        return f"needs {{k: N, equals: [...]}} or {{k: N, includes: [...]}}, got {arg!r}"
    if not isinstance(arg.get("k"), int) or arg["k"] < 1:
        return "needs `k`, an integer >= 1"
    if ("equals" in arg) == ("includes" in arg):
        return "needs exactly one of `equals` or `includes`"
    key = "equals" if "equals" in arg else "includes"
    cells = arg[key]
    if not isinstance(cells, list) or not cells or any(_cell(c) for c in cells):
        return f"`{key}` needs a non-empty list of cells"   # [] would hold vacuously
    if len({repr(c) for c in cells}) < len(cells):
        return f"`{key}` names a cell twice: {cells!r}"
    if key == "equals" and len(cells) != arg["k"]:
        return (f"`equals` lists {len(cells)} cells but k is {arg['k']}: the top {arg['k']} "
                f"can never equal them; give k: {len(cells)} or use `includes`")
    if len(cells) > arg["k"]:
        return (f"`includes` lists {len(cells)} cells, more than the top {arg['k']} can hold; "
                f"give k >= {len(cells)}")
    return None


def _only_above(arg) -> str | None:
    if not isinstance(arg, dict) or set(arg) != {"threshold", "cells"}:
        return f"needs {{threshold: t, cells: [...]}}, got {arg!r}"
    if _number(arg["threshold"]) or not isinstance(arg["cells"], list):
        return "needs a number `threshold` and a list `cells`"
    bad = [c for c in arg["cells"] if _cell(c)]
    return _cell(bad[0]) if bad else None


def _true(arg) -> str | None:
    return None if arg is True else f"must be true, got {arg!r}"


def _nonnegative_int(arg) -> str | None:
    ok = isinstance(arg, int) and not isinstance(arg, bool) and arg >= 0
    return None if ok else f"needs a layer index >= 0, got {arg!r}"


# ----------------------------------------------------------------------------- scalar checks

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda v, b: v > b, ">=": lambda v, b: v >= b,
    "<": lambda v, b: v < b, "<=": lambda v, b: v <= b,
}


def compare(value: float, op: str, bound: float) -> Outcome:
    ok = COMPARISONS[op](value, bound) and math.isfinite(value)   # inf is no measured value
    margin = value - bound if op in (">", ">=") else bound - value
    return Outcome(ok, f"{fmt(value)} {op} {fmt(bound)}", margin)


for _op in COMPARISONS:
    operator(_op, (SCALAR, PATCH), _number)(
        lambda value, arg, mods, _op=_op: compare(float(value), _op, float(arg)))


@operator("between", (SCALAR, PATCH), _pair_of_numbers)
def _between(value, arg, mods) -> Outcome:
    low, high = arg
    return Outcome(low <= value <= high, f"{fmt(value)} in [{fmt(low)}, {fmt(high)}]",
                   min(value - low, high - value))


@operator("sign", (SCALAR, PATCH), _one_of("positive", "negative"))
def _sign(value, arg, mods) -> Outcome:
    signed = value if arg == "positive" else -value
    return Outcome(signed > 0, f"{fmt(value)} is {arg}", signed)


@operator("approx", (SCALAR, PATCH, GRID, PAIR), _number_or_list)
def _approx(value, arg, mods) -> Outcome:
    got = value.values.flatten().tolist() if isinstance(value, Grid) else [float(value)]
    want = arg if isinstance(arg, list) else [arg] * (1 if not isinstance(value, Grid) else
                                                      len(got))
    if len(want) != len(got):
        return Outcome(False, f"expected {len(want)} values, measured {len(got)}", None)
    atol, rtol = mods.get("atol", 1e-4), mods.get("rtol", 0.0)
    slack = _slack(got, want, atol, rtol)
    shown = fmt(got[0]) if len(got) == 1 else f"{len(got)} values"
    return Outcome(slack >= 0, f"{shown} ≈ {arg} (atol {atol:g}, rtol {rtol:g})", slack)


def _slack(got: list[float], want: list[float], atol: float, rtol: float) -> float:
    """The smallest room left inside the tolerance; -inf when any number is NaN or infinite
    (Python's `min` over NaN depends on the order, and NaN must never be within tolerance)."""
    slacks = [atol + rtol * abs(w) - abs(g - w) for g, w in zip(got, want)]
    return min(slacks, default=0.0) if all(map(math.isfinite, slacks)) else -math.inf


@operator("flips_sign", (PATCH,), _true)
def _flips_sign(value, arg, mods) -> Outcome:
    """Reads raw values: the patched run has `from`'s sign, the unpatched `into` the other."""
    raw, src, dst = mods["raw"], mods["from"], mods["into"]
    ok = src * dst < 0 and raw * src > 0
    return Outcome(ok, f"patched {fmt(raw)} vs from {fmt(src)}, into {fmt(dst)}",
                   raw * math.copysign(1.0, src))


# ----------------------------------------------------------------------------- text checks

@operator("contains", (TEXT,), _string)
def _contains(value, arg, mods) -> Outcome:
    return Outcome(arg in value, f"{value!r} contains {arg!r}")


@operator("not_contains", (TEXT,), _string)
def _not_contains(value, arg, mods) -> Outcome:
    return Outcome(arg not in value, f"{value!r} does not contain {arg!r}")


@operator("equals", (TEXT, TOKENS, FEATURES), _string_or_list)
def _equals(value, arg, mods) -> Outcome:
    return Outcome(value == arg, f"{value!r} == {arg!r}")


@operator("includes", (TOKENS, FEATURES), _item_list)
def _includes(value, arg, mods) -> Outcome:
    missing = [t for t in arg if t not in value]
    return Outcome(not missing, f"{value!r} includes {arg!r}"
                   + (f" (missing {missing!r})" if missing else ""))


@operator("excludes", (TOKENS, FEATURES), _item_list)
def _excludes(value, arg, mods) -> Outcome:
    present = [t for t in arg if t in value]
    return Outcome(not present, f"{value!r} excludes {arg!r}"
                   + (f" (present {present!r})" if present else ""))


# ----------------------------------------------------------------------------- per-prompt answers
# These read the prompt's own answer (the judging puts it in the modifiers, per prompt).
ANSWER_OPERATORS = ("answer_is_top", "includes_answer", "next_is_answer", "contains_answer")


@operator("answer_is_top", (TOKENS,), _true)
def _answer_is_top(value, arg, mods) -> Outcome:
    answer = mods["answer"]
    return Outcome(bool(value) and value[0] == answer,
                   f"top token {value[0] if value else None!r} is the answer {answer!r}")


@operator("includes_answer", (TOKENS,), _true)
def _includes_answer(value, arg, mods) -> Outcome:
    answer = mods["answer"]
    rank = value.index(answer) + 1 if answer in value else None
    where = f"rank {rank}" if rank else f"not in the top {len(value)}"
    return Outcome(rank is not None, f"answer {answer!r} is {where} of {value!r}")


@operator("next_is_answer", (TEXT,), _true)
def _next_is_answer(value, arg, mods) -> Outcome:
    answer, got = mods["answer"], mods.get("next_token")
    return Outcome(got == answer, f"next token {got!r} is the answer {answer!r}")


@operator("contains_answer", (TEXT,), _true)
def _contains_answer(value, arg, mods) -> Outcome:
    answer, text = mods["answer"], mods.get("continuation", value)
    return Outcome(answer in text, f"continuation {text!r} contains the answer {answer!r}")


# ----------------------------------------------------------------------------- grid checks

def resolve_cell(grid: Grid, cell) -> tuple[int, ...]:
    """A cell written in a spec -> an index tuple into `grid.values`. Raises ValueError."""
    if isinstance(cell, dict):
        unknown = set(cell) - set(grid.axes)
        if unknown:
            raise ValueError(f"cell axis '{sorted(unknown)[0]}' is not one of {list(grid.axes)}")
        if set(cell) != set(grid.axes):
            raise ValueError(f"cell {cell} must give every axis of {list(grid.axes)}")
        return tuple(_axis_index(grid, a, cell[a]) for a in grid.axes)
    named = _label_cell(cell)   # L3H7 on a [layer, head] grid, L3N12 on [layer, neuron]
    if named is not None and set(named) == set(grid.axes):
        return tuple(_axis_index(grid, a, named[a]) for a in grid.axes)
    if len(grid.axes) != 1:
        raise ValueError(f"cell {cell!r} must name every axis of {list(grid.axes)}, "
                         f"e.g. {{{', '.join(f'{a}: 0' for a in grid.axes)}}}")
    return (_axis_index(grid, grid.axes[0], cell),)


def _label_cell(cell) -> dict[str, int] | None:
    try:
        return label_cell(parse_label(cell, ("head", "kv_head", "neuron")))
    except LabelError:
        return None


def _axis_index(grid: Grid, axis: str, value) -> int:
    labels = list(grid.labels[grid.axes.index(axis)])
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value in labels and all(isinstance(x, int) for x in labels):
            return labels.index(value)
        if -len(labels) <= value < len(labels):
            return value % len(labels)
    raise ValueError(f"{axis} {value!r} is not in this grid"
                     + did_you_mean(value, map(str, labels)))


def describe_cell(grid: Grid, index: tuple[int, ...]) -> str:
    parts = []
    for axis, i in zip(grid.axes, index):
        label = grid.labels[grid.axes.index(axis)][i]
        parts.append(f"{axis} {i} ({label!r})" if isinstance(label, str) and axis == "pos"
                     else f"{axis} {label}" if axis != "component" else str(label))
    return ", ".join(parts)


def top_cells(grid: Grid, k: int = 3, largest: bool = True) -> list[tuple[tuple[int, ...], float]]:
    import torch

    flat = grid.values.flatten().float()
    k = min(k, flat.numel())
    idx = torch.topk(flat if largest else -flat, k).indices.tolist()
    shape = tuple(grid.values.shape)
    return [(tuple(int(x) for x in _unravel(i, shape)), float(flat[i])) for i in idx]


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(i % size)
        i //= size
    return out[::-1]


def top_summary(grid: Grid, k: int = 3) -> str:
    return "; top cells: " + ", ".join(f"[{describe_cell(grid, c)}] = {fmt(v)}"
                                       for c, v in top_cells(grid, k))


# where each grid operator names cells: a cell itself, or lists of cells under these keys
CELL_ARGS = {"argmax": None, "argmin": None, "top": ("equals", "includes"),
             "only_above": ("cells",)}


def named_cells(expect: dict) -> list[tuple[tuple, object]]:
    """(path inside `expect`, cell) for every cell the grid operators of `expect` name (static
    checks read their layers and heads)."""
    out: list[tuple[tuple, object]] = []
    for name, keys in CELL_ARGS.items():
        arg = expect.get(name)
        if arg is None:
            continue
        if keys is None:
            out.append(((name,), arg))
            continue
        for key in keys:
            if isinstance(arg, dict) and isinstance(arg.get(key), list):
                out += [((name, key, i), cell) for i, cell in enumerate(arg[key])]
    return out


def _broken_cells(grid: Grid) -> Outcome | None:
    """A failed outcome when some cell is NaN or infinite: a ranking over a broken
    measurement (a diverged model, a division by zero) must not pass, whichever cell it names
    (torch ranks NaN first, so `argmax` of an all-NaN grid named its first cell)."""
    import torch

    bad = ~torch.isfinite(grid.values.float())
    if not bool(bad.any()):
        return None
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    return Outcome(False, f"{int(bad.sum())} of {bad.numel()} cells are not finite (first: "
                          f"{describe_cell(grid, first)} = {fmt(float(grid.values[first]))}): "
                          "no cell can be ranked on a broken measurement", -math.inf)


def _extreme(largest: bool):
    def check(grid: Grid, arg, mods) -> Outcome:
        broken = _broken_cells(grid)
        if broken is not None:
            return broken
        (cell, value), = top_cells(grid, 1, largest)
        want = resolve_cell(grid, arg)
        word = "argmax" if largest else "argmin"
        wanted_value = float(grid.values[want])
        return Outcome(cell == want, f"{word} at {describe_cell(grid, cell)} = {fmt(value)}"
                       f" (expected {describe_cell(grid, want)} = {fmt(wanted_value)})"
                       + top_summary(grid), -abs(value - wanted_value))
    return check


operator("argmax", (GRID, PAIR), _cell)(_extreme(True))
operator("argmin", (GRID, PAIR), _cell)(_extreme(False))


@operator("top", (GRID, PAIR), _top)
def _top_check(grid: Grid, arg, mods) -> Outcome:
    broken = _broken_cells(grid)
    if broken is not None:
        return broken
    n = grid.values.numel()
    if arg["k"] >= n:   # every cell is in the top k: it would hold whatever was measured
        return Outcome(False, f"top {arg['k']} of a grid of {n} cells takes every cell, so it "
                              f"tests nothing; give k < {n}" + top_summary(grid, n))
    cells = [c for c, _ in top_cells(grid, arg["k"])]
    want = [resolve_cell(grid, c) for c in arg.get("equals", arg.get("includes"))]
    ok = set(cells) == set(want) if "equals" in arg else all(w in cells for w in want)
    shown = ", ".join(describe_cell(grid, c) for c in cells)
    return Outcome(ok, f"top {arg['k']}: [{shown}]" + top_summary(grid, arg["k"] + 2))


@operator("only_above", (GRID, PAIR), _only_above)
def _only_above_check(grid: Grid, arg, mods) -> Outcome:
    broken = _broken_cells(grid)
    if broken is not None:
        return broken
    threshold = float(arg["threshold"])
    above = {tuple(int(x) for x in idx) for idx in (grid.values > threshold).nonzero().tolist()}
    want = {resolve_cell(grid, c) for c in arg["cells"]}
    shown = ", ".join(describe_cell(grid, c) for c in sorted(above)) or "none"
    return Outcome(above == want, f"cells above {fmt(threshold)}: [{shown}]" + top_summary(grid))


def _aggregate(name: str, reduce: Callable[[torch.Tensor], float]):
    def check(grid: Grid, arg, mods) -> Outcome:
        value = reduce(grid.values.float())
        results = [between_or_compare(value, op, bound) for op, bound in arg.items()]
        ok = all(r.ok for r in results)
        return Outcome(ok, f"{name} " + " and ".join(r.detail for r in results)
                       + ("" if ok else top_summary(grid)), min(r.margin for r in results))
    return check


def between_or_compare(value: float, op: str, bound) -> Outcome:
    return _between(value, bound, {}) if op == "between" else compare(value, op, float(bound))


operator("max", (GRID, PAIR), _comparison_map)(_aggregate("max", lambda t: float(t.max())))
operator("min", (GRID, PAIR), _comparison_map)(_aggregate("min", lambda t: float(t.min())))
operator("sum", (GRID, PAIR), _comparison_map)(_aggregate("sum", lambda t: float(t.sum())))


@operator("same_below", (PAIR,), _nonnegative_int)
def _same_below(grid: Grid, arg, mods) -> Outcome:
    """Layers 0..L-1 agree and layer L is the first to differ (see spec-format.md)."""
    from harness.measure.attribution import first_differing_layer

    first = first_differing_layer(mods["a"], mods["b"], atol=mods.get("atol", 1e-4))
    where = "never" if first is None else f"first at layer {first}"
    return Outcome(first == arg, f"models differ {where} (expected first at layer {arg}, "
                                 f"atol {mods.get('atol', 1e-4):g})")


# ----------------------------------------------------------------------------- samples

def _rate_arg(arg) -> str | None:
    if not isinstance(arg, dict):
        return f"needs {{contains: TEXT, '>=': 0.8}}, got {arg!r}"
    tests = [k for k in arg if k in ("contains", "not_contains")]
    if len(tests) != 1 or not isinstance(arg[tests[0]], str) or not arg[tests[0]]:
        return "needs exactly one of `contains` / `not_contains` with a non-empty text"
    rest = {k: v for k, v in arg.items() if k not in tests}
    if not rest:
        return "needs a comparison such as '>=': 0.8"
    problem = _comparison_map(rest)
    if problem:
        return problem
    problems = [share_bound_problem(op, bound) for op, bound in rest.items()]
    return next((p for p in problems if p), None)


@operator("rate", (SAMPLES,), _rate_arg)
def _rate(samples, arg, mods) -> Outcome:
    """The share of samples that contain (or do not contain) a text."""
    word = "contains" if "contains" in arg else "not_contains"
    needle = arg[word]
    hits = [(needle in t) == (word == "contains") for t in samples["texts"]]
    rate = sum(hits) / len(hits)
    results = [between_or_compare(rate, op, b) for op, b in arg.items() if op != word]
    return Outcome(all(r.ok for r in results),
                   f"{sum(hits)}/{len(hits)} samples {word.replace('_', ' ')} {needle!r}: rate "
                   + " and ".join(r.detail for r in results), min(r.margin for r in results))


@operator("mean_score", (SAMPLES,), _comparison_map)
def _mean_score(samples, arg, mods) -> Outcome:
    """The mean reward-model score of the samples (`score_with`)."""
    scores = samples.get("scores")
    if scores is None:
        return Outcome(False, "no scores: the claim needs `score_with: REWARD_MODEL`")
    mean = sum(scores) / len(scores)
    results = [between_or_compare(mean, op, b) for op, b in arg.items()]
    return Outcome(all(r.ok for r in results), f"mean score over {len(scores)} samples "
                   + " and ".join(r.detail for r in results), min(r.margin for r in results))


# ----------------------------------------------------------------------------- against chance

def _probability(arg) -> str | None:
    ok = isinstance(arg, int | float) and not isinstance(arg, bool) and 0 < arg < 1
    return None if ok else f"needs a significance level between 0 and 1, e.g. 0.01; got {arg!r}"


@operator("significant", (SCALAR, PATCH), _probability)
def _significant(value, arg, mods) -> Outcome:
    """The named selection's empirical p-value against random ones (`against:`, read from
    the measurement's `trust`) is at most the level."""
    trust = mods.get("trust") or {}
    if "p_value" not in trust:
        return Outcome(False, "no p-value: `significant` needs `against: {random: N}`")
    p = trust["p_value"]
    return Outcome(p <= arg, f"p = {fmt(p)} <= {fmt(arg)} (beats {trust['percentile']:.0f}% of "
                             f"{trust['random']} random selections)", arg - p)


# ----------------------------------------------------------------------------- baselines

@operator("baseline", (SCALAR, PATCH, GRID, PAIR, TEXT, TOKENS, SAMPLES, FEATURES), _true)
def _baseline(measured_json, arg, mods) -> Outcome:
    """Equal to the stored baseline: numbers within atol/rtol, text and tokens exactly.
    Reads the JSON form of the measurement (claims.py passes it) and `mods["stored"]`."""
    from harness.baselines import _numbers

    stored = mods["stored"]
    got, want = _numbers(measured_json), _numbers(stored)
    if got is None or want is None:
        return Outcome(measured_json == stored, f"baseline {stored!r} == {measured_json!r}")
    if len(got) != len(want):
        return Outcome(False, f"baseline has {len(want)} values, measured {len(got)}")
    atol, rtol = mods.get("atol", 1e-4), mods.get("rtol", 0.0)
    slack = _slack(got, want, atol, rtol)
    worst = max(abs(g - w) for g, w in zip(got, want))
    return Outcome(slack >= 0, f"drift from baseline {fmt(worst)} (atol {atol:g}, rtol "
                               f"{rtol:g})", slack)


# ----------------------------------------------------------------------------- entry points

def kind_of(claim) -> str:
    """The value kind a claim's measure produces: declared by its kind (harness/kinds/)."""
    return claim.value_kind()


def check_expectation_spec(claim) -> list[tuple[tuple, str]]:
    """Spec-time checks of `expect`: known operators, fitting the measure, valid arguments."""
    errors: list[tuple[tuple, str]] = []
    kind = kind_of(claim)
    if not claim.expect:
        return [(("expect",), "`expect` is empty; say what should hold, e.g. {'>': 0}")]
    for name, arg in claim.expect.items():
        loc = ("expect", name)
        if name in MODIFIERS:
            if _number(arg) or arg < 0:
                errors.append((loc, f"'{name}' needs a number >= 0, got {arg!r}"))
            continue
        op = OPERATORS.get(name)
        if op is None:
            errors.append((loc, f"unknown expectation '{name}'" + did_you_mean(name, OPERATORS)))
            continue
        if kind not in op.kinds:
            fits = sorted(n for n, o in OPERATORS.items() if kind in o.kinds)
            errors.append((loc, f"'{name}' does not apply to measure '{claim.measure}' "
                                f"({kind}); use one of {', '.join(fits)}"))
            continue
        message = op.validate(arg)
        if message:
            errors.append((loc, f"'{name}' {message}"))
        elif name == "significant" and getattr(claim, "against", None) is None:
            errors.append((loc, "`significant` reads the p-value of `against: {random: N, "
                                "seed: S}`; add `against` to the claim"))
        elif name == "significant" and p_value(claim.against.random, 0) > arg:
            n = claim.against.random
            need = math.ceil(1 / arg) - 1
            errors.append((loc, f"with {n} random selections the smallest p-value is 1/{n + 1} "
                                f"= {p_value(n, 0):.3g}, above {arg:g}: the claim could never "
                                f"pass; draw at least {need} (`against: {{random: {need}}}`)"))
    return errors


def evaluate(expect: dict, measurement: Measurement, defaults: dict) -> list[Outcome]:
    """Apply every operator of `expect` to the measurement's value."""
    mods = {**defaults, **{k: v for k, v in expect.items() if k in MODIFIERS},
            **measurement.extras}
    outcomes = []
    for name, arg in expect.items():
        if name in MODIFIERS:
            continue
        try:
            outcomes.append(OPERATORS[name].check(measurement.value, arg, mods))
        except ValueError as exc:  # a cell that does not exist in this grid
            outcomes.append(Outcome(False, f"{name}: {exc}"))
    return outcomes


def fmt(value) -> str:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return repr(value)
