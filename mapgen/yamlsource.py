"""A YAML reader that keeps the location of every value and rejects duplicate keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import yaml

from mapgen.errors import Location, SpecError

Value = Union[str, int, float, bool, None, "dict[str, Node]", "list[Node]"]


@dataclass(frozen=True)
class Node:
    """A YAML value with where it stands in its file; mappings keep their keys' locations."""

    value: Value
    loc: Location
    key_locs: tuple[tuple[str, Location], ...] = ()

    def key_loc(self, key: str) -> Location:
        return dict(self.key_locs).get(key, self.loc)


def load(path: str, text: str) -> Node:
    """Parse `text` (the contents of `path`) into located nodes."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise SpecError([f"{path}:{line}:{col}: invalid YAML: {exc.problem}"]) from None
    if root is None:
        return Node({}, Location(path, 1, 1))
    errors: list[str] = []
    node = _convert(path, root, errors)
    if errors:
        raise SpecError(errors)
    return node


def _loc(path: str, node: yaml.Node) -> Location:
    return Location(path, node.start_mark.line + 1, node.start_mark.column + 1)


def _convert(path: str, node: yaml.Node, errors: list[str]) -> Node:
    if isinstance(node, yaml.MappingNode):
        items: dict[str, Node] = {}
        key_locs: list[tuple[str, Location]] = []
        for key_node, value_node in node.value:
            key = str(_scalar(key_node))
            where = _loc(path, key_node)
            if key in items:
                first = dict(key_locs)[key]
                errors.append(
                    f"{where}: duplicate key '{key}' (first defined at line {first.line})"
                )
                continue
            items[key] = _convert(path, value_node, errors)
            key_locs.append((key, where))
        return Node(items, _loc(path, node), tuple(key_locs))
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(path, item, errors) for item in node.value], _loc(path, node))
    return Node(_scalar(node), _loc(path, node))


_CONSTRUCTOR = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> str | int | float | bool | None:
    value = _CONSTRUCTOR.construct_object(node)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
