"""A spec's YAML values read as strings, expressions and key sets, each refusal located."""

from __future__ import annotations

from typing import Any

from mapgen.common.errors import ErrorSink
from mapgen.compiler.expr import Expr, ExprSyntaxError
from mapgen.compiler.yamlsource import Node


def plain(node: Any) -> Any:
    """A node's value as plain Python, for a message."""
    value = node.value if isinstance(node, Node) else node
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def unknown_keys(node: Node, allowed: tuple[str, ...], what: str, errors: ErrorSink) -> None:
    assert isinstance(node.value, dict)
    for key in node.value:
        if key not in allowed:
            errors.add(
                node.key_loc(key),
                f"unknown key '{key}' in {what}; expected one of {', '.join(allowed)}",
            )


def nonempty_string(node: Node | None, what: str, errors: ErrorSink) -> str:
    if node is None:
        return ""
    if not isinstance(node.value, str) or not node.value:
        errors.add(node.loc, f"'{what}' must be a non-empty string")
        return ""
    return node.value


def parse_expr(node: Node | None, what: str, errors: ErrorSink) -> Expr | None:
    if node is None:
        return None
    source = node.value
    if isinstance(source, bool) or isinstance(source, int):
        source = str(source).lower() if isinstance(source, bool) else str(source)
    if not isinstance(source, str):
        errors.add(node.loc, f"'{what}' must be an expression")
        return None
    try:
        return Expr.parse(source)
    except ExprSyntaxError as exc:
        errors.add(node.loc, f"{what}: {exc}")
        return None
