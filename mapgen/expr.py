"""The small expression language that translates HF config fields into Megatron model dims.

An expression is a Python expression over the fields of the HF `config.json`:
names (`hidden_size`), nested fields (`rope_scaling.factor`), literals, `+ - * // /`,
comparisons, `and`/`or`/`not`, `x if c else y`, and `default(expr, fallback)`, which gives
`fallback` when `expr` names a field the config does not have (or has as null).
Nothing else parses: no calls, no subscripts, no attribute access on non-dicts.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any, Callable

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
}
_CONSTANTS = {"true": True, "false": False, "null": None}


class MissingField(Exception):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class ExprSyntaxError(Exception):
    pass


@dataclass(frozen=True)
class Expr:
    source: str
    tree: ast.expr

    @staticmethod
    def parse(source: str) -> Expr:
        try:
            tree = ast.parse(source.strip(), mode="eval").body
        except SyntaxError as exc:
            raise ExprSyntaxError(f"invalid expression {source!r}: {exc.msg}") from None
        _check(tree, source)
        return Expr(source, tree)

    def evaluate(self, config: dict[str, Any]) -> Any:
        return _eval(self.tree, config)

    def __str__(self) -> str:
        return self.source


def _check(node: ast.expr, source: str) -> None:
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            if not (
                isinstance(child.func, ast.Name)
                and child.func.id == "default"
                and len(child.args) == 2
                and not child.keywords
            ):
                raise ExprSyntaxError(
                    f"invalid expression {source!r}: the only call allowed is default(expr, fallback)"
                )
        elif isinstance(child, ast.BinOp) and type(child.op) not in _BINOPS:
            raise ExprSyntaxError(f"invalid expression {source!r}: operator not allowed")
        elif isinstance(child, ast.Compare) and any(type(op) not in _CMPOPS for op in child.ops):
            raise ExprSyntaxError(f"invalid expression {source!r}: comparison not allowed")
        elif not isinstance(
            child,
            (
                ast.Call,
                ast.Name,
                ast.Load,
                ast.Attribute,
                ast.Constant,
                ast.BinOp,
                ast.UnaryOp,
                ast.BoolOp,
                ast.Compare,
                ast.IfExp,
                ast.List,
                ast.Tuple,
                ast.operator,
                ast.cmpop,
                ast.boolop,
                ast.unaryop,
            ),
        ):
            raise ExprSyntaxError(
                f"invalid expression {source!r}: {type(child).__name__} not allowed"
            )


def _eval(node: ast.expr, config: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if node.id not in config or config[node.id] is None:
            raise MissingField(node.id)
        return config[node.id]
    if isinstance(node, ast.Attribute):
        base = _eval(node.value, config)
        path = ast.unparse(node)
        if not isinstance(base, dict) or base.get(node.attr) is None:
            raise MissingField(path)
        return base[node.attr]
    if isinstance(node, ast.Call):
        try:
            return _eval(node.args[0], config)
        except MissingField:
            return _eval(node.args[1], config)
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, config), _eval(node.right, config))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, config)
        if isinstance(node.op, ast.Not):
            return not value
        if isinstance(node.op, ast.USub):
            return -value
        return +value
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, config) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, config)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, config)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, config) else node.orelse, config)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, config) for e in node.elts]
    raise ExprSyntaxError(f"cannot evaluate {ast.unparse(node)}")
