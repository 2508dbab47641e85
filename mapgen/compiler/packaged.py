"""Files mapgen reads besides its Python code: the module template, the family specs, and the spec a
built module names (`module_spec`).

In a wheel they are package data: pyproject.toml maps the repository's `templates/` and `specs/`
folders into the package as `mapgen/templates` and `mapgen/specs` (without `specs/targets.yaml`,
which names the repository's generated/ files), and they are read with `importlib.resources`.
A checkout run without installing it (`PYTHONPATH=.`) or an editable install has no such folders
inside `mapgen/`; there they are the folders of the source tree the imported `mapgen` lives in,
so a checkout never reads another checkout's template.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

from mapgen.common.errors import MapgenError

TEMPLATE = "module.py.j2"
TARGETS_FILE = "specs/targets.yaml"  # the checked-in targets, in a checkout


def _source_tree() -> Path | None:
    """The source tree holding the imported `mapgen` package, if it is one (not site-packages)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def folder(name: str) -> Path | None:
    """`mapgen/<name>` shipped in the package, else `<name>/` of the source tree, else None.
    (mapgen is installed as files: its specs are handed to `mapgen build` as paths.)"""
    shipped = resources.files("mapgen") / name
    if isinstance(shipped, Path) and shipped.is_dir():
        return shipped
    root = _source_tree()
    if root is not None and (root / name).is_dir():
        return root / name
    return None


def template_text(name: str = TEMPLATE) -> str:
    """The text of a jinja2 template of templates/."""
    templates = folder("templates")
    if templates is None or not (templates / name).is_file():
        raise MapgenError(
            f"mapgen's template {name} is missing: neither mapgen/templates (package data of an "
            f"installed mapgen) nor templates/ of a source tree is beside {Path(__file__).parents[1]}; "
            "reinstall mapgen"
        )
    return (templates / name).read_text(encoding="utf-8")


def specs_folder() -> Path:
    """The family specs (`<family>.yaml`) and model configs (`configs/<target>.json`) this mapgen
    ships, to give `mapgen build` as SPEC and CONFIG."""
    specs = folder("specs")
    if specs is None:
        raise MapgenError(f"this mapgen ({Path(__file__).parents[1]}) ships no specs: reinstall mapgen")
    return specs


def find_root(start: Path) -> Path:
    """The repository folder (the one holding specs/targets.yaml) at or above `start`."""
    for place in (start, *start.parents):
        if (place / TARGETS_FILE).is_file():
            return place
    raise MapgenError(f"no {TARGETS_FILE} in {start} or any folder above it")


SPEC_LINE = re.compile(r"^# Spec: +(.+) sha256:([0-9a-f]{64})$", re.MULTILINE)


def module_spec(module_file: Path, written: str) -> Path:
    """The spec file `module_file` was built from. `written` is its SOURCES[0], relative to the
    folder the module was built in, which the module does not record: tried from the working
    directory, from the repository holding the module, then as a spec this mapgen ships (a wheel
    install); the first that exists and has the sha256 of the module's header wins."""
    with module_file.open(encoding="utf-8") as text:
        header = SPEC_LINE.search(text.read(4096))
    wanted = header.group(2) if header else None
    path = Path(written)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute():
        try:
            candidates.append(find_root(module_file.resolve().parent) / path)
        except MapgenError:
            pass  # not in a repository laid out like this one
    try:
        candidates.append(specs_folder() / path.name)
    except MapgenError:
        pass
    existing = [c for c in dict.fromkeys(c.resolve() for c in candidates) if c.is_file()]
    for candidate in existing:
        if wanted is None or hashlib.sha256(candidate.read_bytes()).hexdigest() == wanted:
            return candidate
    differ = f" ({', '.join(map(str, existing))} differ from it)" if existing else ""
    raise MapgenError(
        f"{module_file}: its spec {written}" + (f" sha256:{wanted}" if wanted else "")
        + f" is needed to build the local-layout twin that verify and convert run on CPU, and is not found{differ}"
        f"; tried {', '.join(map(str, candidates))}. Run verify from the folder the module was built in,"
        " or verify a local-layout module: mapgen build SPEC CONFIG -o OUT.py --layout local"
    )
