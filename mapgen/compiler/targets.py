"""The checked-in target list (specs/targets.yaml), read and checked, and its packages built.

Each entry names a spec, a config, a layout and a model class; `compile_entries` builds them two
at a time, in processes of their own, and says which this megatron-core cannot build."""

from __future__ import annotations

import keyword
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mapgen.common.console import quiet_libraries
from mapgen.common.errors import ErrorSink, MapgenError, NeedsNewerMegatronCore, SpecError
from mapgen.common.layout import LAYOUTS, MODEL_CLASSES
from mapgen.compiler import yamlsource
from mapgen.compiler.build import compile_package, input_text, read_input
from mapgen.compiler.packaged import TARGETS_FILE
from mapgen.compiler.spec import StatedModels, stated_models


TARGET_KEYS = ("spec", "config", "layout")
# the megatron-core model class (None: the spec's default, `models:`); whether `mapgen build`
# writes the package into generated/ (a family's larger members are built on demand, by the
# tests and the bench)
OPTIONAL_TARGET_KEYS: dict[str, object] = {"model": None, "checked_in": True}


@dataclass(frozen=True)
class TargetEntry:
    """One line of specs/targets.yaml: builds the package generated/<name>/."""

    name: str
    spec: str
    config: str
    layout: str
    model: str = "gpt"
    checked_in: bool = True

    @property
    def output(self) -> str:
        return f"generated/{self.name}"


def read_targets(root: Path) -> list[TargetEntry]:
    path = root / TARGETS_FILE
    node = yamlsource.load(TARGETS_FILE, input_text(read_input(path, TARGETS_FILE), TARGETS_FILE))
    errors = ErrorSink()
    entries: list[TargetEntry] = []
    if not isinstance(node.value, dict) or set(node.value) != {"targets"}:
        errors.add(node.loc, "targets file must hold one key, 'targets'")
        errors.raise_if_any()
    assert isinstance(node.value, dict)
    targets = node.value["targets"]
    if not isinstance(targets.value, dict):
        errors.add(targets.loc, "'targets' must map module names to {spec, config, layout, model}")
        errors.raise_if_any()
    assert isinstance(targets.value, dict)
    for name, entry in targets.value.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            errors.add(targets.key_loc(name), f"target name '{name}' is not a Python module name")
            continue
        if not isinstance(entry.value, dict) or not set(TARGET_KEYS) <= set(entry.value) <= {
            *TARGET_KEYS, *OPTIONAL_TARGET_KEYS
        }:
            errors.add(
                entry.loc,
                f"target '{name}' needs the keys {', '.join(TARGET_KEYS)} and may have "
                f"{', '.join(OPTIONAL_TARGET_KEYS)}",
            )
            continue
        values: dict[str, object] = {key: entry.value[key].value for key in TARGET_KEYS}
        values.update({key: entry.value[key].value if key in entry.value else default
                       for key, default in OPTIONAL_TARGET_KEYS.items()})
        if values["layout"] not in LAYOUTS:
            errors.add(entry.value["layout"].loc, f"layout must be one of {', '.join(LAYOUTS)}")
            continue
        if values["model"] is not None and values["model"] not in MODEL_CLASSES:
            errors.add(entry.value["model"].loc, f"model must be one of {', '.join(MODEL_CLASSES)}")
            continue
        if not isinstance(values["checked_in"], bool):
            errors.add(entry.value["checked_in"].loc, "checked_in must be true or false")
            continue
        try:
            stated = _stated_models(root, str(values["spec"]))
        except SpecError as exc:
            errors.messages += exc.messages
            continue
        except MapgenError as exc:
            errors.add(entry.value["spec"].loc, f"target '{name}': {exc}")
            continue
        given = values["model"]
        if given is not None and stated is not None and given not in stated.names:
            errors.add(
                entry.value["model"].loc,
                f"target '{name}': model {given}: spec {values['spec']} builds {stated} (its models, line {stated.loc.line})",
            )
            continue
        values["model"] = given or (stated.default if stated else "gpt")
        entries.append(
            TargetEntry(
                name, str(values["spec"]), str(values["config"]), str(values["layout"]), str(values["model"]),
                bool(values["checked_in"]),
            )
        )
    errors.raise_if_any()
    return entries


def _stated_models(root: Path, spec: str) -> StatedModels | None:
    """The `models:` of a target's spec (a path relative to the repository root)."""
    return stated_models(spec, input_text(read_input(root / spec, spec), spec))


@dataclass(frozen=True)
class Skipped:
    """A target the installed megatron-core cannot build (`NeedsNewerMegatronCore`), and why."""

    reason: str


Package = dict[str, str]  # a target package: file name -> source


def _timed_compile(root: Path, entry: TargetEntry) -> tuple[Package | Skipped, float, list[str]]:
    quiet_libraries()  # in a worker process of its own
    started = time.perf_counter()
    notes: list[str] = []
    try:
        files: Package | Skipped = compile_entry(root, entry, notes)
    except NeedsNewerMegatronCore as exc:
        files = Skipped(str(exc))
    return files, time.perf_counter() - started, notes


def compile_entries(
    root: Path, entries: list[TargetEntry]
) -> Iterator[tuple[TargetEntry, Package | Skipped, float, list[str]]]:
    """(entry, its package's files, seconds, the build's note lines) for each entry, in order,
    built two at a time in processes of their own (the large MoE targets take tens of seconds
    each). A target this megatron-core cannot build gives `Skipped` (a later release can: the
    list serves every supported stack)."""
    if len(entries) < 2:
        for entry in entries:
            yield (entry, *_timed_compile(root, entry))
        return
    def previous_size(entry: TargetEntry) -> int:  # the largest (slowest) ones start first
        folder = root / entry.output
        return sum(f.stat().st_size for f in folder.glob("*.py")) if folder.is_dir() else 0

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        futures = {e.name: pool.submit(_timed_compile, root, e) for e in sorted(entries, key=previous_size, reverse=True)}
        for entry in entries:
            yield (entry, *futures[entry.name].result())


def compile_entry(root: Path, entry: TargetEntry, notes: list[str] | None = None) -> Package:
    return compile_package(
        entry.name,
        root / entry.spec,
        root / entry.config,
        entry.layout,
        "mapgen build",
        (entry.spec, entry.config),
        model=entry.model,
        notes=notes,
    )
