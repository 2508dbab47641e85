"""Gate on the rendered source with libcst: it must parse, define each name once, and its
tables must name only functions it defines. A failure here is a bug in mapgen, not in a spec."""

from __future__ import annotations

from collections import Counter

import libcst as cst

from mapgen.errors import MapgenError


class GeneratedCodeError(MapgenError):
    pass


def _defined_names(module: cst.Module) -> list[str]:
    names: list[str] = []
    for statement in module.body:
        if isinstance(statement, cst.FunctionDef):
            names.append(statement.name.value)
        elif isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name):
                    names.append(small.target.value)
                elif isinstance(small, cst.Assign):
                    names.extend(
                        t.target.value for t in small.targets if isinstance(t.target, cst.Name)
                    )
    return names


def _table_values(module: cst.Module, table: str) -> list[str]:
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if (
                isinstance(small, cst.AnnAssign)
                and isinstance(small.target, cst.Name)
                and small.target.value == table
                and isinstance(small.value, cst.Dict)
            ):
                return [
                    e.value.value
                    for e in small.value.elements
                    if isinstance(e, cst.DictElement) and isinstance(e.value, cst.Name)
                ]
    return []


def check(source: str, what: str) -> cst.Module:
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise GeneratedCodeError(f"{what}: generated code does not parse: {exc}") from None
    names = _defined_names(module)
    seen = set(names)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise GeneratedCodeError(f"{what}: generated code defines twice: {', '.join(duplicates)}")
    for table in ("IMPORTS", "EXPORTS"):
        missing = sorted(set(_table_values(module, table)) - seen)
        if missing:
            raise GeneratedCodeError(f"{what}: {table} names undefined functions: {', '.join(missing)}")
    return module
