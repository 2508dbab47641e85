"""What is wrong with `mapgen verify`'s and `mapgen convert`'s arguments that is known without
torch: the parallel sizes given (positive, within mapgen's limits), the input folder, the output
folder (it exists, lies under a file, is the input, contains it or lies inside it). The CLI says these before it imports torch
and megatron-core (seconds of start-up); `verify.jobs` and `convert` check them again for callers
of the Python API. Nothing here imports torch."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from mapgen.common.limits import layout_limit_problems

SIZES = ("tp", "pp", "vpp", "ep", "dp")  # always given; the others may be None


def size_problems(sizes: Mapping[str, object]) -> list[str]:
    """Each size that is not a positive integer, or lies beyond mapgen's limits
    (`mapgen.common.limits.layout_limit_problems`), by its flag: `sizes` maps tp, pp, vpp, ep, dp
    (required) and etp, first_stage_layers, last_stage_layers, make_vocab_size_divisible_by
    (None: not given) to values."""
    found = []
    for name, value in sizes.items():
        if value is None and name not in SIZES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            found.append(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return found or layout_limit_problems(dict(sizes))


def smallest_dp(tp: int, ep: int, etp: int | None) -> int:
    """The fewest data-parallel replicas megatron-core accepts for the layout: each pipeline
    stage's tp x dp ranks must hold the expert grid (expert-TP x EP)."""
    sizes = (tp, ep, etp or tp)
    if any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes):
        return 1  # size_problems says what is wrong with the sizes
    grid = ep * (etp or tp)
    return grid // math.gcd(tp, grid)


def folder_problems(folder: Path, what: str) -> list[str]:
    """`folder` (an input) must be an existing folder."""
    if not os.path.lexists(folder):
        return [f"{folder}: no such folder"]
    if not folder.is_dir():
        return [f"{folder}: not a folder ({what})"]
    return []


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def overlap_problems(out: Path, source: Path) -> list[str]:
    """The output folder must be neither the input, nor inside it, nor hold it: replacing OUT_DIR
    (--overwrite) would delete the input, and a checkpoint written into its own input is read
    while it is written. Symbolic links and `..` are followed."""
    real_out, real_source = _real(out), _real(source)
    if real_out == real_source or (out.exists() and source.exists() and os.path.samefile(out, source)):
        return [f"{out} is the input folder itself: write the output to another folder"]
    if real_out.is_relative_to(real_source):
        return [f"{out} lies inside the input folder {source}: write the output outside it"]
    if real_source.is_relative_to(real_out):
        return [f"{out} holds the input folder {source}: write the output to a folder that does not hold it"]
    return []


def output_problems(out: Path, overwrite: bool, source: Path | None = None) -> list[str]:
    """The output folder, checked as the writers check it: a missing parent is created (so the
    nearest existing folder above it must be a folder), an existing OUT_DIR is replaced only with
    `overwrite` and only when it is a folder; with `source`, `overlap_problems`."""
    if source is not None and (found := overlap_problems(out, source)):
        return found
    above = out.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if os.path.lexists(above) and not above.is_dir():
        return [f"{out}: {above} is not a folder"]
    if out.is_symlink() or out.exists():
        if not overwrite:
            return [f"{out} already exists (--overwrite replaces it once the new checkpoint is complete)"]
        if out.is_symlink() or not out.is_dir():
            return [f"{out} exists and is not a folder; --overwrite replaces folders only"]
    return []
