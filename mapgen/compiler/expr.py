"""The small expression language that translates HF config fields into Megatron model dims.

An expression is a Python expression over the fields of the HF `config.json`:
names (`hidden_size`), nested fields (`rope_scaling.factor`), literals, `+ - * // / %`, unary
`- + ~ not`, comparisons and chains of them (`in` too), `and`/`or`/`not`, `x if c else y`,
`default(expr, fallback)`, which gives `fallback` when `expr` names a field the config does not
have (or has as null), and for per-layer lists: `range(n)` / `range(a, b)`, one-`for` list
comprehensions (`[i for i in range(num_hidden_layers) if i not in mlp_only_layers]`) and
indexing (`x[i]`). Nothing else parses: no other calls, no `**`, no bitwise `& | ^ << >>`, no
`is`, no slices, no dict or set displays, no lambdas or f-strings, no literals but numbers,
strings, true, false and null.

What parses evaluates as Python evaluates it: operators on Python's values with Python's
semantics (`//` and `%` floor, `~5` is -6), `and`/`or` give the operand that decides, as Python's
do, and evaluate their right side only when it decides (so `false and x.y` is false even where
the config has no `x`), `x if c else y` evaluates only the branch it takes, a comparison chain
stops at its first false link, `(a, b)` is a tuple. Where the language is not Python: `true`,
`false` and `null` are its names for True, False and None; a name is a config field, and one the
config lacks or holds as null is missing (MissingField, which `default` catches); `a.b` is the
field `b` of the object `a` (missing where `a` holds no object with `b`); `range(...)` gives a
list.

`Expr.fields()` names every config field an expression reads (dotted for nested fields), which
is how a spec's expressions count as understanding those fields (`mapgen.compiler.config`). It
reads an expression whole: both sides of an `and`/`or`, both branches of an `if`, whichever
one an evaluation takes.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from mapgen.common.limits import (
    MAX_EXPR_CHARS,
    MAX_EXPR_DEPTH,
    MAX_EXPR_INT_BITS,
    MAX_EXPR_LIST,
    MAX_EXPR_STEPS,
    MAX_EXPR_STRING,
    MAX_FORMAT_WIDTH,
)

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
_UNARYOPS: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
    ast.Invert: operator.invert,
}
_CONSTANTS = {"true": True, "false": False, "null": None}
# the calls an expression may make, with the numbers of arguments each takes
_CALLS = {"default": (2,), "range": (1, 2)}
# the types of the literals an expression may hold (no bytes, complex numbers or `...`)
_LITERALS = (bool, int, float, str, type(None))
# Python's operators the language does not have, as the messages refusing them name them
_REFUSED_OPS: dict[type[ast.AST], str] = {
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Is: "is",
    ast.IsNot: "is not",
}
# Python's other syntax, as the messages refusing it name it (others by their `ast` class name)
_REFUSED_SYNTAX: dict[type[ast.AST], str] = {
    ast.Slice: "a slice",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.DictComp: "a dict comprehension",
    ast.SetComp: "a set comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.Lambda: "a lambda",
    ast.JoinedStr: "an f-string",
    ast.NamedExpr: "':='",
    ast.Starred: "'*' unpacking",
}


class MissingField(Exception):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class ExprSyntaxError(Exception):
    pass


class ExprValueError(ValueError):
    """An expression that cannot be evaluated over a config: a type error, a division by
    zero, or a value over the limits of `mapgen.common.limits`."""


@dataclass(frozen=True)
class Expr:
    source: str
    tree: ast.expr

    @staticmethod
    def parse(source: str) -> Expr:
        if len(source) > MAX_EXPR_CHARS:
            raise ExprSyntaxError(f"expression of {len(source):,} characters: at most {MAX_EXPR_CHARS:,} are allowed")
        try:
            tree = ast.parse(source.strip(), mode="eval").body
        except SyntaxError as exc:
            raise ExprSyntaxError(f"invalid expression {source!r}: {exc.msg}") from None
        except (ValueError, RecursionError, MemoryError) as exc:  # null bytes; nesting CPython refuses
            raise ExprSyntaxError(f"invalid expression {source[:80]!r}: {type(exc).__name__}: {exc}") from None
        depth = _depth(tree)
        if depth > MAX_EXPR_DEPTH:
            raise ExprSyntaxError(
                f"invalid expression {source[:80]!r}: nested {depth} deep, at most {MAX_EXPR_DEPTH} levels are allowed"
            )
        _check(tree, source)
        return Expr(source, tree)

    def evaluate(self, config: Mapping[str, Any], reads: list[str] | None = None) -> Any:
        """The expression's value over `config`. Raises MissingField for a field the config
        lacks, ExprValueError (a ValueError) for anything else that goes wrong, including
        going past the limits of `mapgen.common.limits`. `reads`, if given, receives the fields the
        evaluation read (dotted for nested ones; a field `default` fell back from is not read,
        nor a comprehension variable)."""
        try:
            return _Evaluation(reads).eval(self.tree, config, {})
        except (MissingField, ExprValueError):
            raise
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, IndexError, KeyError) as exc:
            raise ExprValueError(str(exc)) from None

    def fields(self) -> frozenset[str]:
        """The config fields the expression reads, nested ones dotted (`rope_scaling.factor`);
        a field read whole is its bare name. Comprehension variables and constants are not
        fields."""
        found: set[str] = set()
        _collect_fields(self.tree, frozenset(), found)
        return frozenset(found)

    def __str__(self) -> str:
        return self.source


def _depth(tree: ast.AST) -> int:
    """How deeply the syntax tree nests (without recursing: it may be deep)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


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
        elif isinstance(child, ast.ListComp):
            target = child.generators[0].target
            if len(child.generators) != 1 or child.generators[0].is_async or not isinstance(target, ast.Name):
                raise ExprSyntaxError(
                    f"invalid expression {source!r}: a list comprehension takes one 'for <name> in ...'"
                )
            if target.id in _CONSTANTS or target.id in _CALLS:
                raise ExprSyntaxError(
                    f"invalid expression {source!r}: '{target.id}' cannot be a comprehension variable"
                )
        elif isinstance(child, ast.BinOp) and type(child.op) not in _BINOPS:
            raise ExprSyntaxError(
                f"invalid expression {source!r}: operator {_REFUSED_OPS.get(type(child.op), '')!r} not allowed"
            )
        elif isinstance(child, ast.Compare) and any(type(op) not in _CMPOPS for op in child.ops):
            refused = next(op for op in child.ops if type(op) not in _CMPOPS)
            raise ExprSyntaxError(
                f"invalid expression {source!r}: comparison {_REFUSED_OPS.get(type(refused), '')!r} not allowed"
            )
        elif isinstance(child, ast.Constant) and type(child.value) not in _LITERALS:
            raise ExprSyntaxError(
                f"invalid expression {source!r}: literal {ast.unparse(child)[:20]} not allowed "
                "(literals are numbers, strings, true, false and null)"
            )
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
            what = _REFUSED_SYNTAX.get(type(child), type(child).__name__)
            raise ExprSyntaxError(f"invalid expression {source!r}: {what} not allowed")


class _Evaluation:
    """One evaluation, bounded: at most MAX_EXPR_STEPS steps (a node evaluated, an element
    compared by `in`), and no value beyond the size limits of `mapgen.common.limits`.

    `eval` takes the config and the comprehension variables in scope (`local`): a variable
    shadows a config field of its name, may hold null, and is no field read."""

    def __init__(self, reads: list[str] | None = None) -> None:
        self.steps = 0
        self.reads = reads

    def step(self, count: int = 1) -> None:
        self.steps += count
        if self.steps > MAX_EXPR_STEPS:
            raise ExprValueError(f"takes more than {MAX_EXPR_STEPS:,} steps to evaluate")

    def eval(self, node: ast.expr, config: Mapping[str, Any], local: Mapping[str, Any]) -> Any:
        self.step()
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in local:
                return local[node.id]
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            if node.id not in config or config[node.id] is None:
                raise MissingField(node.id)
            if self.reads is not None:
                self.reads.append(node.id)
            return config[node.id]
        if isinstance(node, ast.Attribute):
            base = self.eval(node.value, config, local)
            path = ast.unparse(node)
            if not isinstance(base, dict) or base.get(node.attr) is None:
                raise MissingField(path)
            if self.reads is not None and path.split(".", 1)[0] not in local:
                self.reads.append(path)
            return base[node.attr]
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            if node.func.id == "range":
                bounds = [self.eval(a, config, local) for a in node.args]
                if not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
                    raise TypeError(f"range() takes integers, got {', '.join(repr(b) for b in bounds)}")
                span = _check_size(range(*bounds))
                self.step(len(span))
                return list(span)
            try:
                return self.eval(node.args[0], config, local)
            except MissingField:
                return self.eval(node.args[1], config, local)
        if isinstance(node, ast.ListComp):
            loop = node.generators[0]
            assert isinstance(loop.target, ast.Name)
            iterable = self.eval(loop.iter, config, local)
            if not isinstance(iterable, (list, tuple, str, dict)):
                raise TypeError(f"cannot loop over {iterable!r}")
            found = []
            for value in iterable:
                scope = {**local, loop.target.id: value}
                # all() stops at the first false condition, as Python's `if`s do
                if all(self.eval(condition, config, scope) for condition in loop.ifs):
                    found.append(self.eval(node.elt, config, scope))
            return _check_size(found)
        if isinstance(node, ast.Subscript):
            base, index = self.eval(node.value, config, local), self.eval(node.slice, config, local)
            try:
                return base[index]
            except (IndexError, KeyError, TypeError):
                raise ValueError(f"{ast.unparse(node)}: cannot index {base!r} by {index!r}") from None
        if isinstance(node, ast.BinOp):
            left, right = self.eval(node.left, config, local), self.eval(node.right, config, local)
            _check_operands(type(node.op), left, right)
            return _check_size(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return _check_size(_UNARYOPS[type(node.op)](self.eval(node.operand, config, local)))
        if isinstance(node, ast.BoolOp):
            # the first operand that decides, else the last; the rest are not evaluated
            stops_on = not isinstance(node.op, ast.And)  # `and` stops at a false one, `or` at a true one
            for operand in node.values[:-1]:
                value = self.eval(operand, config, local)
                if bool(value) is stops_on:
                    return value
            return self.eval(node.values[-1], config, local)
        if isinstance(node, ast.Compare):
            # `a < b < c` is `a < b and b < c` with `b` evaluated once
            left = self.eval(node.left, config, local)
            result: Any = True
            for op, right_node in zip(node.ops, node.comparators):
                right = self.eval(right_node, config, local)
                if isinstance(right, (list, tuple, str, dict)):
                    self.step(len(right))
                result = _CMPOPS[type(op)](left, right)
                if not result:
                    return result
                left = right
            return result
        if isinstance(node, ast.IfExp):
            taken = node.body if self.eval(node.test, config, local) else node.orelse
            return self.eval(taken, config, local)
        if isinstance(node, ast.List):
            return [self.eval(e, config, local) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self.eval(e, config, local) for e in node.elts)
        raise ExprSyntaxError(f"cannot evaluate {ast.unparse(node)}")


# a `%` conversion: optional (key), flags, width, precision, length modifier, type
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?.?", re.DOTALL)


def _check_operands(op: type[ast.operator], left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too large, before computing it."""
    if op is ast.Mult:
        for sized, count in ((left, right), (right, left)):
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int):
                _check_length(sized, len(sized) * count)
    elif op is ast.Add and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        _check_length(left, len(left) + len(right))
    elif op is ast.Mod and isinstance(left, str):
        for conversion in _CONVERSION.finditer(left):
            for part in conversion.groups():
                if part == "*":
                    raise ExprValueError(f"'%' formatting with a '*' width or precision is not allowed: {left[:50]!r}")
                if part and int(part) > MAX_FORMAT_WIDTH:
                    raise ExprValueError(
                        f"'%' formatting width or precision {int(part):,} is over {MAX_FORMAT_WIDTH}: {left[:50]!r}"
                    )


def _check_length(value: str | list[Any] | tuple[Any, ...] | range, length: int) -> None:
    """A string or list (or tuple, or range) of `length` must be within the limits."""
    is_string = isinstance(value, str)
    limit = MAX_EXPR_STRING if is_string else MAX_EXPR_LIST
    if length > limit:
        what = "a string of" if is_string else "a list of"
        unit = "characters" if is_string else "elements"
        raise ExprValueError(f"gives {what} {length:,} {unit}, over the limit of {limit:,}")


def _elements(value: list[Any] | tuple[Any, ...], limit: int) -> int:
    """How many elements `value` holds at every depth, counting a list shared by several
    elements once per place (as printing or comparing it would); stops past `limit`."""
    counted: dict[int, int] = {}

    def count(item: list[Any] | tuple[Any, ...]) -> int:
        if id(item) in counted:
            return counted[id(item)]
        total = len(item)
        for element in item:
            if total > limit:
                break
            if isinstance(element, (list, tuple)):
                total += count(element)
        counted[id(item)] = total
        return total

    return count(value)


def _check_size(value: Any) -> Any:
    """`value`, if within the limits on what an expression computes."""
    if isinstance(value, (list, tuple)):
        _check_length(value, _elements(value, MAX_EXPR_LIST))
    elif isinstance(value, (str, range)):
        _check_length(value, len(value))
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_EXPR_INT_BITS:
        raise ExprValueError(f"gives an integer of {value.bit_length():,} bits, over the limit of {MAX_EXPR_INT_BITS}")
    return value


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
