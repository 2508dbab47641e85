"""Gate on the rendered source: it must parse, define each name once, and its tables must name
only functions it defines. A failure here is a bug in mapgen, not in a spec.

The parse is CPython's own (`ast`): a 61-layer, 256-expert module is tens of megabytes, which
the stdlib parser reads about ten times faster than libcst, and the gate needs nothing but the
syntax tree's top-level names."""

from __future__ import annotations

import ast
from collections import Counter

from mapgen.errors import MapgenError


class GeneratedCodeError(MapgenError):
    pass


def _defined_names(module: ast.Module) -> list[str]:
    names: list[str] = []
    for statement in module.body:
        if isinstance(statement, ast.FunctionDef):
            names.append(statement.name)
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names.append(statement.target.id)
        elif isinstance(statement, ast.Assign):
            names.extend(t.id for t in statement.targets if isinstance(t, ast.Name))
    return names


def _functions_named_in(module: ast.Module, table: str) -> list[str]:
    """The functions the rows of `table` name (PARAMS: each row's import and export function)."""
    for statement in module.body:
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and statement.target.id == table
            and isinstance(statement.value, ast.Tuple)
        ):
            return [
                arg.id
                for row in statement.value.elts
                if isinstance(row, ast.Call)
                for arg in row.args
                if isinstance(arg, ast.Name)
            ]
    return []


def check(source: str, what: str) -> ast.Module:
    try:
        module = ast.parse(source)
    except SyntaxError as exc:
        raise GeneratedCodeError(f"{what}: generated code does not parse: {exc}") from None
    names = _defined_names(module)
    seen = set(names)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise GeneratedCodeError(f"{what}: generated code defines twice: {', '.join(duplicates)}")
    missing = sorted(set(_functions_named_in(module, "PARAMS")) - seen)
    if missing:
        raise GeneratedCodeError(f"{what}: PARAMS names undefined functions: {', '.join(missing)}")
    return module
