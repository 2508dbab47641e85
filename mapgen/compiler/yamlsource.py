"""A YAML reader that keeps the location of every value and rejects duplicate keys.

Bounded (`mapgen.common.limits`): values nest at most MAX_NESTING deep, a document expands to at most
MAX_YAML_VALUES values once its aliases are followed (a "billion laughs" document is refused, not
expanded), and an alias inside the value it names (a recursive anchor) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import yaml

from mapgen.common.errors import Location, SpecError
from mapgen.common.limits import MAX_NESTING, MAX_YAML_VALUES

Value = Union[str, int, float, bool, None, "dict[str, Node]", "list[Node]"]


@dataclass(frozen=True)
class Node:
    """A YAML value with where it stands in its file; mappings keep their keys' locations."""

    value: Value
    loc: Location
    key_locs: tuple[tuple[str, Location], ...] = ()

    def key_loc(self, key: str) -> Location:
        return dict(self.key_locs).get(key, self.loc)


class _TooLarge(Exception):
    def __init__(self, where: Location, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


def load(path: str, text: str) -> Node:
    """Parse `text` (the contents of `path`) into located nodes."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise SpecError([f"{path}:{line}:{col}: invalid YAML: {exc.problem}"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (binary data)
        before = text[: exc.position]
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        raise SpecError(
            [f"{path}:{line}:{col}: invalid YAML: character #x{code:04x} is not allowed ({exc.reason})"]
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}:1:1: invalid YAML: {exc}"]) from None
    except RecursionError:  # PyYAML composes nested values recursively
        raise SpecError([f"{path}:1:1: invalid YAML: values nest deeper than {MAX_NESTING} levels"]) from None
    if root is None:
        return Node({}, Location(path, 1, 1))
    errors: list[str] = []
    try:
        node = _Converter(path, errors).convert(root, ())
    except _TooLarge as exc:
        raise SpecError([f"{exc.where}: {exc.message}"]) from None
    if errors:
        raise SpecError(errors)
    return node


def _loc(path: str, node: yaml.Node) -> Location:
    return Location(path, node.start_mark.line + 1, node.start_mark.column + 1)


class _Converter:
    """yaml nodes -> Nodes, counting every value it makes: an alias is converted again each
    time it is used, so the count is the document's expanded size."""

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        self.values = 0

    def convert(self, node: yaml.Node, within: tuple[yaml.Node, ...]) -> Node:
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise _TooLarge(
                _loc(self.path, node),
                f"the YAML document expands to more than {MAX_YAML_VALUES:,} values (through "
                "aliases, a few lines can stand for billions); write the values out",
            )
        if any(node is outer for outer in within):
            raise _TooLarge(_loc(self.path, node), "recursive YAML alias: a value that contains itself")
        if len(within) >= MAX_NESTING:
            raise _TooLarge(_loc(self.path, node), f"values nest deeper than {MAX_NESTING} levels")
        inner = (*within, node)
        if isinstance(node, yaml.MappingNode):
            items: dict[str, Node] = {}
            key_locs: list[tuple[str, Location]] = []
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.errors.append(f"{_loc(self.path, key_node)}: a key must be a plain value, not a list or mapping")
                    continue
                key = str(self.scalar(key_node))
                where = _loc(self.path, key_node)
                if key in items:
                    first = dict(key_locs)[key]
                    self.errors.append(f"{where}: duplicate key '{key}' (first defined at line {first.line})")
                    continue
                items[key] = self.convert(value_node, inner)
                key_locs.append((key, where))
            return Node(items, _loc(self.path, node), tuple(key_locs))
        if isinstance(node, yaml.SequenceNode):
            return Node([self.convert(item, inner) for item in node.value], _loc(self.path, node))
        return Node(self.scalar(node), _loc(self.path, node))

    def scalar(self, node: yaml.Node) -> str | int | float | bool | None:
        try:
            value = _CONSTRUCTOR.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:  # `!!int x`, an integer too long to read
            problem = getattr(exc, "problem", None) or str(exc)
            self.errors.append(f"{_loc(self.path, node)}: invalid YAML value: {problem}")
            return None
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)


_CONSTRUCTOR = yaml.SafeLoader("")
