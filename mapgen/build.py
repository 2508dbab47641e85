"""The orchestrator: spec + config -> formatted module source, and the checked-in target list."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mapgen import yamlsource
from mapgen.console import quiet_libraries
from mapgen.config import HFConfig, evaluate_in_context, read_hf_config, translate
from mapgen.dims import ModelDims
from mapgen.errors import ErrorSink, Location, MapgenError, SpecError
from mapgen.expand import expand
from mapgen.format import format_source
from mapgen.expr import MissingField
from mapgen.inventory import LAYOUTS, HFTensor, hf_inventory, megatron_inventory
from mapgen.ir import Source, Target
from mapgen.megatron_model import MODEL_CLASSES
from mapgen.postprocess import check
from mapgen.render import render
from mapgen.spec import Spec, parse_spec

TARGETS_FILE = "specs/targets.yaml"
TARGET_KEYS = ("spec", "config", "layout")
OPTIONAL_TARGET_KEYS = {"model": "gpt"}  # the megatron-core model class, GPTModel by default
HF_EXPERTS = ("per_expert", "stacked")


@dataclass(frozen=True)
class TargetEntry:
    """One line of specs/targets.yaml: builds generated/<name>.py."""

    name: str
    spec: str
    config: str
    layout: str
    model: str = "gpt"

    @property
    def output(self) -> str:
        return f"generated/{self.name}.py"


def display_path(path: str | Path) -> str:
    """The path as written in generated headers: relative to the working directory, never
    absolute, so the output is the same on every machine."""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        relative = os.path.relpath(absolute, Path.cwd().resolve())
        return Path(relative).as_posix()


def read_targets(root: Path) -> list[TargetEntry]:
    path = root / TARGETS_FILE
    node = yamlsource.load(TARGETS_FILE, path.read_text())
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
        if not name.isidentifier():
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
        values = {key: entry.value[key].value for key in TARGET_KEYS}
        values.update({key: entry.value[key].value if key in entry.value else default
                       for key, default in OPTIONAL_TARGET_KEYS.items()})
        if values["layout"] not in LAYOUTS:
            errors.add(entry.value["layout"].loc, f"layout must be one of {', '.join(LAYOUTS)}")
            continue
        if values["model"] not in MODEL_CLASSES:
            errors.add(entry.value["model"].loc, f"model must be one of {', '.join(MODEL_CLASSES)}")
            continue
        entries.append(
            TargetEntry(name, str(values["spec"]), str(values["config"]), str(values["layout"]), str(values["model"]))
        )
    errors.raise_if_any()
    return entries


def _source(path: Path, shown: str) -> tuple[str, Source]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MapgenError(f"{shown}: cannot read: {exc.strerror}") from None
    return data.decode(), Source(shown, hashlib.sha256(data).hexdigest())


def compile_target(
    name: str,
    spec_path: Path,
    config_path: Path,
    layout: str,
    regenerate: str,
    shown_paths: tuple[str, str] | None = None,
    formatted: bool = True,
    hf_experts: str = "per_expert",
    model: str = "gpt",
) -> str:
    """Build one module's source text; raises SpecError listing every problem found.

    `shown_paths` are the spec and config paths as headers and messages give them (default:
    relative to the working directory); `formatted=False` returns the template's output as it
    goes into black. `hf_experts` is how the checkpoint stores MoE experts: `per_expert`
    tensors (as published, and as transformers saves), or `stacked` along a leading expert dim
    (transformers' in-memory layout), which rules read through their `fused_hf`."""
    if model not in MODEL_CLASSES:
        raise MapgenError(f"model must be one of {', '.join(MODEL_CLASSES)}, got {model!r}")
    if hf_experts not in HF_EXPERTS:
        raise MapgenError(f"hf_experts must be one of {', '.join(HF_EXPERTS)}, got {hf_experts!r}")
    stacked = hf_experts == "stacked"
    shown_spec, shown_config = shown_paths or (display_path(spec_path), display_path(config_path))
    spec_text, spec_source = _source(spec_path, shown_spec)
    config_text, config_source = _source(config_path, shown_config)
    spec = parse_spec(spec_source.path, spec_text)
    config = read_hf_config(config_source.path, config_text)
    dims = translate(spec, config)
    try:
        hf = hf_inventory(spec.hf_architecture, config.fields, stacked_experts=stacked)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise SpecError(
            [
                f"{Location(spec.path, 1, 1)}: transformers cannot build {spec.hf_architecture} "
                f"from {config.path}: {exc}"
            ]
        ) from None
    megatron = megatron_inventory(dims, layout, model)
    mappings = expand(spec, config, dims, layout, megatron, hf, fused_experts=stacked)
    ignored_hf = _ignored_hf(spec, config, dims, hf)
    target = Target(
        name=name,
        family=spec.family,
        hf_architecture=spec.hf_architecture,
        layout=layout,
        model=model,
        spec=spec_source,
        config=config_source,
        dims=dims,
        mappings=mappings,
        hf_tensors=hf,
        ignored_hf=ignored_hf,
    )
    header = [
        "@generated by mapgen. DO NOT EDIT: change the spec or the config and rebuild.",
        f"Target: {name} ({layout} layout"
        + (", HybridModel" if model == "hybrid" else "")
        + (", HF experts stacked)" if stacked else ")"),
        f"Spec:   {spec_source.path} sha256:{spec_source.sha256}",
        f"Config: {config_source.path} sha256:{config_source.sha256}",
        f"Regenerate: {regenerate}",
    ]
    source = render(target, header)
    tree = check(source, name)
    return format_source(source, tree) if formatted else source


def _ignored_hf(spec: Spec, config: HFConfig, dims: ModelDims, hf: tuple[HFTensor, ...]) -> tuple[tuple[str, str], ...]:
    """(prefix, why) of each `ignore_hf` entry; a prefix must not cover a tensor the
    architecture has, which the rules map."""
    errors = ErrorSink()
    found: list[tuple[str, str]] = []
    for entry in spec.ignore_hf:
        try:
            prefix = evaluate_in_context(entry.prefix, dims, config)
        except MissingField as missing:
            errors.add(entry.loc, f"ignore_hf.prefix: config {config.path} lacks field '{missing.field}'")
            continue
        if not isinstance(prefix, str) or not prefix:
            errors.add(entry.loc, f"ignore_hf.prefix '{entry.prefix}' gives {prefix!r}, not a name prefix")
            continue
        covered = [t.name for t in hf if t.name.startswith(prefix)]
        if covered:
            errors.add(entry.loc, f"ignore_hf.prefix '{prefix}' covers tensors the rules map: {', '.join(covered[:5])}")
            continue
        found.append((prefix, entry.why))
    errors.raise_if_any()
    return tuple(found)


def _timed_compile(root: Path, entry: TargetEntry) -> tuple[str, float]:
    quiet_libraries()  # in a worker process of its own
    started = time.perf_counter()
    return compile_entry(root, entry), time.perf_counter() - started


def compile_entries(root: Path, entries: list[TargetEntry]) -> Iterator[tuple[TargetEntry, str, float]]:
    """(entry, source, seconds) for each entry, in order, built two at a time in processes of
    their own (the large MoE targets take tens of seconds each)."""
    if len(entries) < 2:
        for entry in entries:
            yield (entry, *_timed_compile(root, entry))
        return
    def previous_size(entry: TargetEntry) -> int:  # the largest (slowest) ones start first
        path = root / entry.output
        return path.stat().st_size if path.exists() else 0

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        futures = {e.name: pool.submit(_timed_compile, root, e) for e in sorted(entries, key=previous_size, reverse=True)}
        for entry in entries:
            yield (entry, *futures[entry.name].result())


def compile_entry(root: Path, entry: TargetEntry) -> str:
    return compile_target(
        entry.name,
        root / entry.spec,
        root / entry.config,
        entry.layout,
        "mapgen build",
        (entry.spec, entry.config),
        model=entry.model,
    )
