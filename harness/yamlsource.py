"""Safe YAML reading that remembers the line of every field, so errors can point at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.errors import SpecError

Loc = tuple  # a field path: ("claims", 3, "expect", "argmax")


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
    """Parse a YAML file with the safe loader (no object tags) and record field lines."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror}", file=file) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"invalid YAML: {problem}", file=file, line=line) from None
    if node is None:
        raise SpecError("the spec is empty; it needs at least `models:` and `claims:`", file=file)
    lines: dict[Loc, int] = {}
    try:
        data = _to_python(node, (), lines)
    except SpecError as exc:
        exc.file = file
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        raise SpecError(f"invalid YAML: {getattr(exc, 'problem', exc)}", file=file,
                        line=mark.line + 1 if mark else None) from None
    return SourcedYaml(data, lines, file)


STANDARD_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


def _to_python(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> object:
    lines[loc] = node.start_mark.line + 1
    if not isinstance(node, yaml.ScalarNode) and node.tag not in STANDARD_TAGS:
        raise SpecError(f"invalid YAML: tag '{node.tag}' is not allowed (specs are plain data)",
                        line=node.start_mark.line + 1, path=format_loc(loc))
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                raise SpecError(f"duplicate key '{key}'", line=key_node.start_mark.line + 1,
                                path=format_loc(loc + (key,)))
            out[key] = _to_python(value_node, loc + (key,), lines)
            lines[loc + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, loc + (i,), lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> object:
    if not isinstance(node, yaml.ScalarNode):
        raise SpecError("a mapping key must be a plain value", line=node.start_mark.line + 1)
    return _LOADER.construct_object(node, deep=True)


_LOADER = yaml.SafeLoader("")
