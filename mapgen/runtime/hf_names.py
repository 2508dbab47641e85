"""How a checkpoint names its tensors against a module's names: another naming's prefixes
(HF_NAMINGS), and layers whose experts are stored stacked where the module names one tensor per
expert (served one expert at a time)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mapgen.runtime.safetensors_files import DTYPES, CheckpointError, Entry, make_entry


def named_as(name: str, naming: tuple[tuple[str, str], ...]) -> str:
    """A module's HF name in another naming: (the module's prefix, the other's) pairs, the first
    that applies; the name itself where none does."""
    for ours, theirs in naming:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def config_naming(
    namings: tuple[tuple[str, str], ...], architecture: str, config: dict[str, Any]
) -> tuple[tuple[str, str], ...]:
    """The naming that goes with the config.json `config` of a module of `architecture` with
    HF_NAMINGS `namings`, for writing a checkpoint that has no files to take it from (`mapgen
    convert megatron-to-hf`): every other naming where `config` is that of a model around the
    module's (Qwen3.5's published vision-language config: `text_config` nested, `architectures`
    naming another class, its tensors the published names), else the module's own (())."""
    architectures = config.get("architectures")
    wrapped = (
        isinstance(config.get("text_config"), dict)
        and isinstance(architectures, list) and bool(architectures) and architecture not in architectures
    )
    return namings if wrapped else ()


def renamed_entries(
    folder: Path, entries: dict[str, Entry], namings: tuple[tuple[str, str], ...]
) -> tuple[dict[str, Entry], tuple[tuple[str, str], ...]]:
    """`entries` under the module's names, and the namings that took: for each (ours, theirs)
    of the module's HF_NAMINGS, files with no tensor under `ours` and some under `theirs` name
    those tensors the other way (a LLaVA saved by transformers 5: `vision_tower.` for the
    published `vision_tower.vision_model.`)."""
    applied = tuple(
        (ours, theirs)
        for ours, theirs in namings
        if not any(n.startswith(ours) for n in entries) and any(n.startswith(theirs) for n in entries)
    )
    if not applied:
        return entries, ()

    def ours_of(name: str) -> str:
        for ours, theirs in applied:
            if name.startswith(theirs):
                return ours + name[len(theirs):]
        return name

    renamed = {ours_of(n): e for n, e in entries.items()}
    if len(renamed) != len(entries):
        clash = sorted(n for n in entries if ours_of(n) != n and ours_of(n) in entries)
        raise CheckpointError(f"{folder}: tensor '{clash[0]}' and '{ours_of(clash[0])}' name the same tensor in two namings")
    return renamed, applied


# transformers' in-memory layout of a layer's experts (Qwen2-MoE's lineage: Qwen3.5-MoE's published
# decoder layers store it): P + gate_up_proj [E, 2I, H] (expert e's gate rows, then its up rows),
# P + down_proj [E, H, I]; P ends in "experts.". One tensor per expert: P + "<e>.gate_proj.weight" ...
# (`restack` writes the stacked pair back from the per-expert tensors)
STACKED_GATE_UP, STACKED_DOWN = "gate_up_proj", "down_proj"


PER_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<expert>\d+)\.(?P<which>gate|up|down)_proj\.weight$")


def per_expert_names(names: Iterable[str]) -> bool:
    """Whether a module's HF names hold experts one tensor each (`<P>.experts.<e>.gate_proj.weight`):
    such a module reads a stacked pair one expert at a time (`HFCheckpoint(unstack=True)`)."""
    return any(PER_EXPERT_RE.match(n) for n in names)


def unstacked_entries(entries: dict[str, Entry]) -> tuple[dict[str, Entry], tuple[tuple[str, int], ...]]:
    """`entries` with each stacked pair of a layer's experts (`STACKED_GATE_UP` [E, 2I, H] and
    `STACKED_DOWN` [E, H, I] of one dtype, no per-expert tensor beside them) replaced by one
    entry per expert and projection: expert e's gate rows, its up rows and its down matrix are
    contiguous bytes of the stacked tensors, so each is a byte range of the file (no copy); and
    the stacked tensors so served, each with its count of experts. A pair of other shapes (or
    dtypes) stays as it is."""
    per_expert = {m["prefix"] for n in entries if (m := PER_EXPERT_RE.match(n))}
    out = dict(entries)
    served: list[tuple[str, int]] = []
    for name, gate_up in entries.items():
        if not name.endswith(".experts." + STACKED_GATE_UP):
            continue
        prefix = name[: -len(STACKED_GATE_UP)]  # ends in "experts."
        down = entries.get(prefix + STACKED_DOWN)
        if down is None or prefix in per_expert or len(gate_up.shape) != 3 or gate_up.dtype != down.dtype:
            continue
        experts, rows, hidden = gate_up.shape
        if rows % 2 or down.shape != (experts, hidden, rows // 2) or gate_up.dtype not in DTYPES:
            continue
        size = DTYPES[gate_up.dtype].itemsize
        half = rows // 2 * hidden * size  # bytes of one expert's gate (or up) rows, and of its down matrix
        for e in range(experts):
            start = gate_up.start + e * 2 * half
            out[f"{prefix}{e}.gate_proj.weight"] = make_entry(gate_up.file, gate_up.dtype, (rows // 2, hidden), start, start + half)
            out[f"{prefix}{e}.up_proj.weight"] = make_entry(gate_up.file, gate_up.dtype, (rows // 2, hidden), start + half, start + 2 * half)
            start = down.start + e * half
            out[f"{prefix}{e}.down_proj.weight"] = make_entry(down.file, down.dtype, (hidden, rows // 2), start, start + half)
        del out[name], out[prefix + STACKED_DOWN]
        served += [(name, experts), (prefix + STACKED_DOWN, experts)]
    return out, tuple(served)
