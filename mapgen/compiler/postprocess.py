"""Gate on the rendered source: it must parse, compile, define each name once, name only what it
defines or imports, and its tables must name only functions it defines. A failure here is a bug
in mapgen, not in a spec.

The parse is CPython's own (`ast`): a 61-layer, 256-expert module is tens of megabytes, which
the stdlib parser reads about ten times faster than libcst. Compiling the whole text as well
would cost as much again (DeepSeek-V3's 36.8 MB: `compile()` 13-21 s, `ast.parse` 12-15 s, on
a shared 2-core machine), so the gate compiles each distinct *statement shape* once: a top-level
statement, or an element of a table longer than `_TABLE_ROWS`, with every digit read as 0 (the
shapes `mapgen.compiler.format` formats; DeepSeek-V3 has 204 among about 137,000 statements and table
rows, found and checked in under a second). Statements of one shape differ only in digits, and
a digit never decides whether parsed Python compiles: a decimal literal of zeros is valid, as
is an identifier with its digits replaced; what compiling a shape checks, it checks for all of
its statements. Each shape must also load only bound names: builtins, its own function's
parameters and comprehension variables, and names the module defines or imports (compared with
digits read as 0; the PARAMS rows are checked name for name, and top-level order is not
checked). Imports must exist (`from m import x`: `m` has `x`), as must `alias.attr` of an
imported module (`rt.qkv_import`). So `nan` in a literal, or a runtime function renamed under
the template, fails here rather than at the user's import. What cannot reach the gate is
refused where it is rendered: the target name must be an identifier, and paths in comments
and docstrings printable without quotes or backslashes (`mapgen.compiler.build`).
"""

from __future__ import annotations

import ast
import builtins
import importlib
from collections import Counter
from types import ModuleType
from typing import Any

from mapgen.common import gcpause
from mapgen.common.errors import MapgenError

_TABLE_ROWS = 8  # tables longer than this are checked (and formatted) element by element
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")


class GeneratedCodeError(MapgenError):
    pass


def _defined_names(module: ast.Module) -> list[str]:
    names: list[str] = []
    for statement in module.body:
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
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


def parse(source: str) -> ast.Module:
    with gcpause.paused():
        return ast.parse(source)


def check(source: str, what: str) -> ast.Module:
    try:
        module = parse(source)
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
    imported = _imports(module, what)
    bound = {_zeroed(n) for n in (*seen, *imported)} | set(imported) | set(dir(builtins))
    for text, mode in _shapes(source, module).items():
        _check_shape(text, mode, bound, imported, what)
    return module


def _zeroed(text: str) -> str:
    return text.encode().translate(_ZERO_DIGITS).decode()


def _imports(module: ast.Module, what: str) -> dict[str, Any]:
    """Each name the module's imports bind, and what it is bound to; the imports must be at the
    top (a `from __future__` first) and name what exists."""
    found: dict[str, Any] = {}
    for index, statement in enumerate(module.body):
        if isinstance(statement, ast.ImportFrom) and statement.module == "__future__":
            docstring = index == 1 and isinstance(module.body[0], ast.Expr)
            if index != 0 and not docstring:
                raise GeneratedCodeError(f"{what}: generated code has a 'from __future__' import after other code")
            continue
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                target = _import(alias.name, what)
                found[alias.asname or alias.name.split(".")[0]] = target if alias.asname else _import(alias.name.split(".")[0], what)
        elif isinstance(statement, ast.ImportFrom):
            if statement.level or statement.module is None:
                raise GeneratedCodeError(f"{what}: generated code has a relative import")
            source = _import(statement.module, what)
            for alias in statement.names:
                if not hasattr(source, alias.name):
                    try:  # a submodule
                        value: Any = _import(f"{statement.module}.{alias.name}", what)
                    except GeneratedCodeError:
                        raise GeneratedCodeError(
                            f"{what}: generated code imports {alias.name} from {statement.module}, which has no such name"
                        ) from None
                else:
                    value = getattr(source, alias.name)
                found[alias.asname or alias.name] = value
    return found


def _import(name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise GeneratedCodeError(f"{what}: generated code imports {name}, which does not import: {exc}") from None


def _shapes(source: str, module: ast.Module) -> dict[str, str]:
    """The distinct statement shapes (text with every digit read as 0) and the compile mode of
    each: a top-level statement ('exec'), or one element of a long table ('eval')."""
    lines = source.encode().translate(_ZERO_DIGITS).split(b"\n")
    found: dict[bytes, str] = {}
    for statement in module.body:
        value = statement.value if isinstance(statement, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) > _TABLE_ROWS:
            for element in value.elts:
                found.setdefault(b"(" + _segment(lines, element) + b",)", "eval")
            found.setdefault(_segment(lines, statement, upto=value) + b"()", "exec")  # the table's target
        elif isinstance(value, ast.Dict) and len(value.keys) > _TABLE_ROWS and all(k is not None for k in value.keys):
            for key, item in zip(value.keys, value.values):
                assert key is not None
                found.setdefault(b"{" + _segment(lines, key) + b": " + _segment(lines, item) + b"}", "eval")
            found.setdefault(_segment(lines, statement, upto=value) + b"{}", "exec")
        else:
            found.setdefault(_segment(lines, statement), "exec")
    return {text.decode(): mode for text, mode in found.items()}


def _segment(lines: list[bytes], node: ast.expr | ast.stmt, upto: ast.expr | None = None) -> bytes:
    """The source of `node` (its column offsets count UTF-8 bytes); with `upto`, only what
    stands before that node of it."""
    first, start = node.lineno - 1, node.col_offset
    if upto is None:
        assert node.end_lineno is not None and node.end_col_offset is not None
        last, end = node.end_lineno - 1, node.end_col_offset
    else:
        last, end = upto.lineno - 1, upto.col_offset
    if first == last:
        return lines[first][start:end]
    return b"\n".join([lines[first][start:], *lines[first + 1 : last], lines[last][:end]])


def _check_shape(text: str, mode: str, bound: set[str], imported: dict[str, Any], what: str) -> None:
    try:
        compile(text, "<generated>", mode, dont_inherit=True)
        tree = ast.parse(text, mode=mode)
    except SyntaxError as exc:
        raise GeneratedCodeError(f"{what}: generated code does not compile: {exc.msg}: {text[:200]!r}") from None
    for name, local in _loads(tree, frozenset()):
        if name not in bound and name not in local:
            raise GeneratedCodeError(f"{what}: generated code uses {name!r}, which nothing defines: {text[:200]!r}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and isinstance(imported.get(node.value.id), ModuleType)
            and not hasattr(imported[node.value.id], node.attr)
        ):
            raise GeneratedCodeError(
                f"{what}: generated code uses {node.value.id}.{node.attr}, which "
                f"{imported[node.value.id].__name__} does not have: {text[:200]!r}"
            )


def _loads(node: ast.AST, local: frozenset[str]) -> list[tuple[str, frozenset[str]]]:
    """(name, names bound around it) for every name `node` loads; a function's parameters and
    a comprehension's targets are bound inside it."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        arguments = node.args
        inner = local | {a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)}
        inner |= {a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None}
        found = [item for default in (*arguments.defaults, *arguments.kw_defaults) if default is not None
                 for item in _loads(default, local)]
        if not isinstance(node, ast.Lambda):
            found += [item for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)
                      if a.annotation is not None for item in _loads(a.annotation, local)]
            if node.returns is not None:
                found += _loads(node.returns, local)
            found += [item for decorator in node.decorator_list for item in _loads(decorator, local)]
            for statement in node.body:
                found += _loads(statement, inner)
        else:
            found += _loads(node.body, inner)
        return found
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        inner = local | {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        return [item for child in ast.iter_child_nodes(node) for item in _loads(child, inner)]
    if isinstance(node, ast.Name):
        return [(node.id, local)] if isinstance(node.ctx, ast.Load) else []
    return [item for child in ast.iter_child_nodes(node) for item in _loads(child, local)]
