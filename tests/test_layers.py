"""Issue 12, item 4: the three parts do not reach into each other.

    compiler -> common <- runtime <- verification;  generated modules -> runtime only

The runtime imports nothing of the compiler or of verification; the compiler imports nothing of
the runtime or of verification; `common` imports no other part and no torch; a generated module
imports only the runtime (and torch, typing)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mapgen.verify import testing

PACKAGE = testing.ROOT / "mapgen"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mapgen" and len(parts) > 1 else None


TOP = {  # mapgen/*.py: the commands' own modules
    "cli", "explain", "convert", "convert_job", "convert_rank", "sharded_state", "megatron_checkpoint", "standin", "twin",
}
FORBIDDEN = {
    "common": {"compiler", "runtime", "verify", *TOP},
    "runtime": {"compiler", "verify", *TOP},
    "compiler": {"runtime", "verify", *TOP},
    "verify": TOP,
}


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_a_part_imports_only_what_lies_below_it(part: str) -> None:
    bad = [
        f"{path.relative_to(testing.ROOT)} imports {module}"
        for path in sorted((PACKAGE / part).glob("*.py"))
        for module in sorted(_imports(path))
        if _part(module) in FORBIDDEN[part]
    ]
    assert bad == []


def test_common_is_torch_free() -> None:
    code = (
        "import sys, mapgen.common.dims, mapgen.common.errors, mapgen.common.layout, mapgen.common.limits, "
        "mapgen.common.console; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=testing.ROOT)


def test_generated_modules_import_only_the_runtime() -> None:
    allowed = {"__future__", "collections.abc", "typing", "torch", "mapgen", "mapgen.runtime"}
    for path in sorted((testing.ROOT / "generated").glob("*.py")):
        if path.name == "__init__.py":
            continue
        with path.open() as handle:  # the imports are at the top; do not parse 37 MB
            head = "".join(line for _, line in zip(range(60), handle))
        modules = _imports_of_text(head[: head.index("\nTARGET: Final")])
        assert modules <= allowed and "mapgen" in modules, (path.name, sorted(modules - allowed))


def _imports_of_text(text: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_folder_listing_shows_the_three_parts() -> None:
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == ["common", "compiler", "runtime", "verify"]


@pytest.mark.parametrize(
    "body",
    [
        "from mapgen.dims import ModelDims\n",  # before the layers were split
        "from mapgen.runtime import ParamPlan\nPARAMS = (ParamPlan('x', (1,), 'float32', None, False, None, None, ('h',), len, len),)\n",
    ],
    ids=["old-import", "old-paramplan"],
)
def test_a_module_of_another_mapgen_version_is_told_to_rebuild(tmp_path: Path, body: str) -> None:
    from mapgen.common.errors import MapgenError
    from mapgen.verify.inputs import load_mapping_module

    module = tmp_path / "old.py"
    module.write_text(body)
    with pytest.raises(MapgenError, match="built by another mapgen version: rebuild it"):
        load_mapping_module(module)


# ---------------------------------------------------------------- no import circles (issue 28)


def _module_name(path: Path) -> str:
    parts = path.relative_to(testing.ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """mapgen's own modules -> the mapgen modules each imports, at any depth (function-level and
    TYPE_CHECKING imports included: each is an arrow a reader follows). `from mapgen.runtime
    import mx` is an arrow to the module `mapgen.runtime.mx`, not to the package."""
    modules = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                if len(submodules) < len(node.names):  # some names are the module's own
                    found.add(node.module)
                found |= submodules
        found.discard(name)
        graph[name] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circles_among_mapgen_modules() -> None:
    """No module of mapgen/ reaches itself through its imports (function-level ones included)."""
    graph = import_graph()
    assert "mapgen.runtime.save" in graph and "mapgen.runtime.mx" in graph["mapgen.runtime.save"]
    assert circles(graph) == []
