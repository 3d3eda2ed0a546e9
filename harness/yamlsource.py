"""Safe YAML reading that remembers the line of every field, so errors can point at it.

Any byte string read here yields data or a SpecError naming the file: never another exception.
Bounds that a real spec never reaches (size, nesting depth, nodes after alias expansion) stop
hostile files (alias bombs, 10,000-deep nesting) before they exhaust memory or the stack.
Numbers follow YAML 1.2 (`1e-3`, `1.0e6` and `.5e2` are numbers, not strings).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

from harness.errors import SpecError
from harness.files import UnreadableFile, read_regular

Loc = tuple  # a field path: ("claims", 3, "expect", "argmax")

MAX_BYTES = 4_000_000     # a large real spec is ~100 kB; long prompt lists belong in `file:`
MAX_DEPTH = 64            # real specs nest ~8 deep
MAX_NODES = 500_000       # values after alias expansion; a 10,000-prompt spec has ~50,000


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The safe loader (libyaml's C parser where installed) with YAML 1.2 floats."""

    _plain_tags: dict[str, str] = {}

    def resolve(self, kind, value, implicit):
        """Memoized for plain scalars: their tag depends on the text alone, and specs repeat
        the same keys thousands of times (pure-Python resolution dominated parsing)."""
        if kind is yaml.ScalarNode and implicit[0]:
            tag = self._plain_tags.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(self._plain_tags) < 50_000:
                    self._plain_tags[value] = tag
            return tag
        return super().resolve(kind, value, implicit)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)$"),
    list("-+.0123456789"))


@dataclass(frozen=True)
class SourcedYaml:
    """Plain YAML data plus the 1-based line of each field path."""

    data: object
    lines: dict[Loc, int]
    file: str

    def line_of(self, loc: Loc) -> int | None:
        """The line of the deepest known prefix of `loc`."""
        for end in range(len(loc), -1, -1):
            if tuple(loc[:end]) in self.lines:
                return self.lines[tuple(loc[:end])]
        return None


def format_loc(loc: Loc) -> str:
    """("claims", 3, "expect") -> "claims[3].expect"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: Path) -> SourcedYaml:
    """Read a spec file and parse it with `parse_yaml`."""
    file = str(path)
    try:
        raw = read_regular(path, MAX_BYTES)
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror}", file=file) from None
    except UnreadableFile as exc:
        raise SpecError(f"cannot read spec: {exc}; move long prompt lists into a `file:` "
                        "prompt family", file=file) from None
    return parse_yaml(raw, file)


def read_yaml_text(text: str, file: str = "<string>") -> SourcedYaml:
    """The same for YAML already in memory (a notebook's spec string); `file` names it."""
    return parse_yaml(text.encode("utf-8"), file)


def parse_yaml(raw: bytes, file: str = "<spec>") -> SourcedYaml:
    """Parse YAML bytes with the safe loader (no object tags) and record field lines."""
    if len(raw) > MAX_BYTES:
        raise SpecError(f"the spec is larger than {MAX_BYTES // 1_000_000} MB; move long prompt "
                        "lists into a `file:` prompt family", file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(f"the spec is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); save it as UTF-8", file=file, line=line) from None
    try:
        _check_depth(text)
        node = yaml.compose(text, Loader=_Loader)
    except SpecError as exc:
        exc.file = file
        raise
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file) from None
    except RecursionError:  # pragma: no cover - _check_depth stops this first
        raise SpecError(f"the spec nests deeper than {MAX_DEPTH} levels", file=file) from None
    if node is None:
        raise SpecError("the spec is empty; it needs at least `models:` and `claims:`", file=file)
    lines: dict[Loc, int] = {}
    try:
        data = _Builder(lines).build(node, ())
    except SpecError as exc:
        exc.file = file
        raise
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file) from None
    return SourcedYaml(data, lines, file)


def _yaml_error(exc: yaml.YAMLError, file: str) -> SpecError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if "nesting depth" in problem:   # libyaml's own limit, met while scanning ahead
        problem = f"the spec nests deeper than {MAX_DEPTH} levels; a spec needs far fewer"
    return SpecError(f"invalid YAML: {problem}", file=file,
                     line=mark.line + 1 if mark is not None else None)


def _check_depth(text: str) -> None:
    """Walk the event stream (no recursion) and stop at MAX_DEPTH: composing nodes recurses,
    so a deeply nested file would otherwise exhaust the stack."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"the spec nests deeper than {MAX_DEPTH} levels; a spec needs "
                                "far fewer", line=event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


STR_TAG = "tag:yaml.org,2002:str"
STANDARD_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


class _Builder:
    """Nodes -> plain Python, counting values so aliases cannot expand without limit."""

    def __init__(self, lines: dict[Loc, int]):
        self.lines, self.count = lines, 0
        self.constructor = SafeConstructor()

    def build(self, node: yaml.Node, loc: Loc) -> object:
        self.count += 1
        line = node.start_mark.line + 1
        if self.count > MAX_NODES:
            raise SpecError(f"the spec expands to more than {MAX_NODES:,} values (aliases "
                            "`*name` repeating large anchors?); write it without them",
                            line=line, path=format_loc(loc))
        if len(loc) > MAX_DEPTH:   # an alias that contains itself
            raise SpecError(f"the spec nests deeper than {MAX_DEPTH} levels (an alias inside "
                            "its own anchor?)", line=line, path=format_loc(loc[:4]) + "...")
        self.lines[loc] = line
        if not isinstance(node, yaml.ScalarNode) and node.tag not in STANDARD_TAGS:
            raise SpecError(f"invalid YAML: tag '{node.tag}' is not allowed (specs are plain "
                            "data)", line=line, path=format_loc(loc))
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            for key_node, value_node in node.value:
                key = self.key(key_node, loc)
                if key in out:
                    raise SpecError(f"duplicate key '{key}'", line=key_node.start_mark.line + 1,
                                    path=format_loc(loc + (key,)))
                out[key] = self.build(value_node, loc + (key,))
                self.lines[loc + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, loc + (i,)) for i, item in enumerate(node.value)]
        value = self.scalar(node)
        if isinstance(value, float) and math.isnan(value):
            raise SpecError("`.nan` is not a number a claim can be checked against; write a "
                            "number", line=line, path=format_loc(loc))
        return value

    def key(self, node: yaml.Node, loc: Loc) -> object:
        line = node.start_mark.line + 1
        if node.tag == "tag:yaml.org,2002:merge":
            raise SpecError("merge keys (`<<: *anchor`) are not supported; write the fields "
                            "out, or share them through `defaults:` and `prompt_sets:`",
                            line=line, path=format_loc(loc))
        if not isinstance(node, yaml.ScalarNode):
            raise SpecError("a mapping key must be a plain value", line=line,
                            path=format_loc(loc))
        key = self.scalar(node)
        if isinstance(key, float) and math.isnan(key):
            raise SpecError("`.nan` cannot be a key", line=line, path=format_loc(loc))
        return key

    def scalar(self, node: yaml.ScalarNode) -> object:
        if node.tag == STR_TAG:   # most values: skip the constructor's bookkeeping
            return node.value
        return self.constructor.construct_object(node, deep=True)
