"""Target packages: a generated target cut into files (`PARTS`), and the views of it the runtime
works on, each importing only the files it covers.

A package's `__init__` holds the header, DIMS, RULES, the small tables and `PARTS`; each part
(`layer_007`, `layer_007_experts_032`, `embedding`, `output`, ...) holds its own parameters'
functions and its rows of `PARAMS` and `HF_TENSORS`. A `TargetView` has the attributes of a
one-file module (PARAMS, HF_TENSORS, IMPORTS, EXPORTS, and the package's own tables) over a
set of parts: `whole_view` over all of them, `rank_view` over those whose layers and experts a
rank holds. The package's `__getattr__` answers `PARAMS`, `HF_TENSORS`, `IMPORTS` and `EXPORTS`
from the whole view, so code written for one-file modules reads a package unchanged (and
imports every part the first time it does).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from mapgen.runtime.plan import ExportFn, HFTensorPlan, ImportFn, ParamPlan, PartPlan

# the form of generated code this runtime reads; a module without it was built by an older mapgen
FORMAT = 2
_SHARED = (
    "FORMAT", "TARGET", "LAYOUT", "MODEL", "HF_ARCHITECTURE", "SOURCES", "DIMS", "RULES", "IGNORED_HF", "TIED",
    "HYBRID_LAYER_PATTERN", "HF_COPIES", "HF_NAMINGS", "PARTS",
)
_WHOLE_TABLES = ("PARAMS", "HF_TENSORS", "IMPORTS", "EXPORTS")


def import_path(path: str | Path, name: str) -> ModuleType:
    """A generated module imported from its path under `name`: a one-file module, or a target
    package (its folder, or its `__init__.py`) whose parts then import as `name.<part>`. Always
    imported afresh (replacing what `name` held); nothing is left in `sys.modules` when importing
    it raises."""
    where = Path(path)
    file = where / "__init__.py" if where.is_dir() else where
    for held in [n for n in sys.modules if n.startswith(f"{name}.")]:  # the parts of an earlier import
        del sys.modules[held]
    folder = [str(file.parent)] if file.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=folder)
    if spec is None or spec.loader is None:
        raise ImportError(f"{file}: Python cannot load it")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def is_package(module: object) -> bool:
    """Whether `module` is a target package (it has PARTS), not a one-file module or a view."""
    return isinstance(module, ModuleType) and isinstance(module.__dict__.get("PARTS"), tuple)


class TargetView:
    """A target package's tables over some of its parts, with a one-file module's attributes."""

    PARAMS: tuple[ParamPlan, ...]
    HF_TENSORS: tuple[HFTensorPlan, ...]
    IMPORTS: dict[str, ImportFn]
    EXPORTS: dict[str, ExportFn]
    TARGET: str
    TIED: dict[str, str]

    def __init__(self, package: ModuleType, parts: tuple[PartPlan, ...]) -> None:
        self.__name__ = package.__name__
        self.package = package
        self.parts = parts
        for name in _SHARED:
            if name in package.__dict__:
                setattr(self, name, package.__dict__[name])
        modules = [importlib.import_module(f"{package.__name__}.{part.module}") for part in parts]
        dtype = package.DIMS.params_dtype
        self.PARAMS = tuple(plan for m, part in zip(modules, parts) for plan in _plans(m, part.layer, dtype))
        self.HF_TENSORS = tuple(sorted((t for m in modules for t in _tensors(m)), key=lambda t: t.at))
        self.IMPORTS = {p.megatron_name: p.importer for p in self.PARAMS}
        self.EXPORTS = {p.megatron_name: p.exporter for p in self.PARAMS}
        everything: tuple[PartPlan, ...] = package.PARTS
        self.partial = len(parts) < len(everything)
        self.NUM_LAYERS = 1 + max((p.layer for p in everything if p.layer is not None), default=-1)
        self.NUM_EXPERTS = getattr(package.DIMS, "num_moe_experts", None) or 0
        self.HF_COUNT = sum(p.hf_tensors for p in everything)


def _plans(part: ModuleType, layer: int | None, dtype: str) -> list[ParamPlan]:
    """A part's rows as ParamPlans: names after its PREFIX, HF indices read in its own table."""
    prefix, hf_prefix = part.PREFIX, part.HF_PREFIX
    names = [hf_prefix + t.name for t in part.HF_TENSORS]
    return [
        ParamPlan(
            prefix + row.name, row.shape, row.dtype or dtype, row.split_dim, row.expert is not None, layer, row.expert,
            row.rule, tuple(h if isinstance(h, str) else names[h] for h in row.hf), row.importer, row.exporter,
        )
        for row in part.PARAMS
    ]


def _tensors(part: ModuleType) -> list[HFTensorPlan]:
    hf_prefix = part.HF_PREFIX
    return [HFTensorPlan(hf_prefix + t.name, t.shape, t.float32, t.at) for t in part.HF_TENSORS]


_VIEWS: dict[tuple[int, tuple[str, ...]], TargetView] = {}


def _view(package: ModuleType, parts: Iterable[PartPlan]) -> TargetView:
    chosen = tuple(parts)
    key = (id(package), tuple(p.module for p in chosen))
    view = _VIEWS.get(key)
    if view is None or view.package is not package:
        view = _VIEWS[key] = TargetView(package, chosen)
    return view


def whole_view(package: ModuleType) -> TargetView:
    """Every part of the package (imports them all, once per process)."""
    return _view(package, package.PARTS)


def rank_view(package: ModuleType, layers: Iterable[int], experts: tuple[int, int]) -> TargetView:
    """The parts a rank needs: the decoder layers it holds (`layers`), of those only the expert
    ranges that meet its experts `[first, last + 1)`, and every part outside the decoder layers
    (embedding, output layer, MTP block, vision tower: small, and needed by the stage's tied
    copies), again only where their experts meet the rank's."""
    held = frozenset(layers)
    first, stop = experts

    def wanted(part: PartPlan) -> bool:
        if part.layer is not None and part.layer not in held:
            return False
        return part.experts is None or (part.experts[0] < stop and first < part.experts[1])

    return _view(package, (p for p in package.PARTS if wanted(p)))


def whole(module: Any) -> Any:
    """A one-file module or a view as it is; a package as its whole view."""
    return whole_view(module) if is_package(module) else module


def table(package_name: str, name: str) -> object:
    """A package's `__getattr__`: its whole PARAMS, HF_TENSORS, IMPORTS or EXPORTS."""
    if name in _WHOLE_TABLES:
        return getattr(whole_view(sys.modules[package_name]), name)
    raise AttributeError(f"module {package_name!r} has no attribute {name!r}")
