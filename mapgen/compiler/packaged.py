"""Files mapgen reads besides its Python code: the module template and the family specs.

In a wheel they are package data: pyproject.toml maps the repository's `templates/` and `specs/`
folders into the package as `mapgen/templates` and `mapgen/specs` (without `specs/targets.yaml`,
which names the repository's generated/ files), and they are read with `importlib.resources`.
A checkout run without installing it (`PYTHONPATH=.`) or an editable install has no such folders
inside `mapgen/`; there they are the folders of the source tree the imported `mapgen` lives in,
so a checkout never reads another checkout's template.
"""

from __future__ import annotations

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
