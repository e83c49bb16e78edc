"""YAML read with every node's line kept, so an error can name the line of the field it is about.

PyYAML's composer gives each node a start mark; :func:`load` constructs the plain Python
value (safe types only) and a map from each field path (``("scenarios", 2, "label")``) to its
1-based line. Duplicate keys, which ``yaml.safe_load`` silently collapses, are reported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[str | int, ...]


class Problem(NamedTuple):
    """One error in a scenario document: its line (None when it has no source line), field, reason."""

    line: int | None
    field: str
    reason: str

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.field or '$'}: {self.reason}"


class Marked(NamedTuple):
    value: Any
    lines: dict[Path, int]
    problems: list[Problem]


def field_name(path: Path) -> str:
    """``("scenarios", 2, "crosstalk", "script", 0)`` -> ``scenarios[2].crosstalk.script[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path``, else of its closest ancestor that has one."""
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        path = path[:-1]


def load(text: str) -> Marked:
    """Parse one YAML document; a syntax error comes back as a problem with its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        return Marked(None, {}, [Problem(line, "", f"not valid YAML: {exc.problem or exc}")])
    except yaml.YAMLError as exc:
        return Marked(None, {}, [Problem(None, "", f"not valid YAML: {exc}")])
    if node is None:
        return Marked(None, {}, [])
    lines: dict[Path, int] = {}
    problems: list[Problem] = []
    _walk(node, (), lines, problems)
    try:
        value = SafeConstructor().construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        return Marked(None, lines, [Problem(mark.line + 1 if mark else None, "", str(exc.problem or exc))])
    return Marked(value, lines, problems)


def _walk(node: Node, path: Path, lines: dict[Path, int], problems: list[Problem]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, MappingNode):
        seen: set[str] = set()
        for key, child in node.value:
            name = key.value if isinstance(key, ScalarNode) else str(key.value)
            if name in seen:
                problems.append(Problem(key.start_mark.line + 1, field_name((*path, name)),
                                        "appears twice in the same mapping"))
            seen.add(name)
            _walk(child, (*path, name), lines, problems)
            lines[(*path, name)] = key.start_mark.line + 1
    elif isinstance(node, SequenceNode):
        for i, child in enumerate(node.value):
            _walk(child, (*path, i), lines, problems)
