"""The small expression language that translates HF config fields into Megatron model dims.

An expression is a Python expression over the fields of the HF `config.json`:
names (`hidden_size`), nested fields (`rope_scaling.factor`), literals, `+ - * // / %`,
comparisons (`in` too), `and`/`or`/`not`, `x if c else y`, `default(expr, fallback)`, which
gives `fallback` when `expr` names a field the config does not have (or has as null), and for
per-layer lists: `range(n)` / `range(a, b)`, one-`for` list comprehensions
(`[i for i in range(num_hidden_layers) if i not in mlp_only_layers]`) and indexing (`x[i]`).
Nothing else parses: no other calls, no attribute access on non-dicts.

`Expr.fields()` names every config field an expression reads (dotted for nested fields), which
is how a spec's expressions count as understanding those fields (`mapgen.config`).
"""

from __future__ import annotations

import ast
import operator
from collections import ChainMap
from collections.abc import Mapping
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
    ast.NotIn: lambda a, b: a not in b,
}
_CONSTANTS = {"true": True, "false": False, "null": None}
# the calls an expression may make, with the numbers of arguments each takes
_CALLS = {"default": (2,), "range": (1, 2)}


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

    def evaluate(self, config: Mapping[str, Any]) -> Any:
        return _eval(self.tree, config)

    def fields(self) -> frozenset[str]:
        """The config fields the expression reads, nested ones dotted (`rope_scaling.factor`);
        a field read whole is its bare name. Comprehension variables and constants are not
        fields."""
        found: set[str] = set()
        _collect_fields(self.tree, frozenset(), found)
        return frozenset(found)

    def __str__(self) -> str:
        return self.source


def _check(node: ast.expr, source: str) -> None:
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            if not (
                isinstance(child.func, ast.Name)
                and len(child.args) in _CALLS.get(child.func.id, ())
                and not child.keywords
                and not any(isinstance(a, ast.Starred) for a in child.args)
            ):
                raise ExprSyntaxError(
                    f"invalid expression {source!r}: the only calls allowed are default(expr, fallback) "
                    "and range(n) / range(a, b)"
                )
        elif isinstance(child, ast.ListComp) and (
            len(child.generators) != 1
            or child.generators[0].is_async
            or not isinstance(child.generators[0].target, ast.Name)
        ):
            raise ExprSyntaxError(
                f"invalid expression {source!r}: a list comprehension takes one 'for <name> in ...'"
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
                ast.ListComp,
                ast.comprehension,
                ast.Store,
                ast.Subscript,
                ast.operator,
                ast.cmpop,
                ast.boolop,
                ast.unaryop,
            ),
        ):
            raise ExprSyntaxError(
                f"invalid expression {source!r}: {type(child).__name__} not allowed"
            )


def _eval(node: ast.expr, config: Mapping[str, Any]) -> Any:
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
        assert isinstance(node.func, ast.Name)
        if node.func.id == "range":
            bounds = [_eval(a, config) for a in node.args]
            if not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
                raise TypeError(f"range() takes integers, got {', '.join(repr(b) for b in bounds)}")
            return list(range(*bounds))
        try:
            return _eval(node.args[0], config)
        except MissingField:
            return _eval(node.args[1], config)
    if isinstance(node, ast.ListComp):
        loop = node.generators[0]
        assert isinstance(loop.target, ast.Name)
        found = []
        outer = dict(config)
        for value in _eval(loop.iter, config):
            scope = ChainMap({loop.target.id: value}, outer)
            if all(_eval(condition, scope) for condition in loop.ifs):
                found.append(_eval(node.elt, scope))
        return found
    if isinstance(node, ast.Subscript):
        base, index = _eval(node.value, config), _eval(node.slice, config)
        try:
            return base[index]
        except (IndexError, KeyError, TypeError):
            raise ValueError(f"{ast.unparse(node)}: cannot index {base!r} by {index!r}") from None
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


def _collect_fields(node: ast.AST, bound: frozenset[str], found: set[str]) -> None:
    if isinstance(node, ast.ListComp):
        loop = node.generators[0]
        _collect_fields(loop.iter, bound, found)
        assert isinstance(loop.target, ast.Name)
        inner = bound | {loop.target.id}
        for part in (node.elt, *loop.ifs):
            _collect_fields(part, inner, found)
        return
    if isinstance(node, ast.Call):
        for arg in node.args:
            _collect_fields(arg, bound, found)
        return
    path = _dotted(node)
    if path is not None:
        if path.split(".", 1)[0] not in bound and path not in _CONSTANTS:
            found.add(path)
        return
    for child in ast.iter_child_nodes(node):
        _collect_fields(child, bound, found)


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a name or a chain of attributes on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None
