"""What is wrong with `mapgen verify`'s and `mapgen convert`'s folder arguments that is known
without torch: the input folder, the output folder (it exists, lies under a file, is the input,
contains it or lies inside it). The CLI says these before it imports torch and megatron-core
(seconds of start-up), as it says what is wrong with the parallel sizes (`mapgen.common.parallel`);
`convert` checks them again for callers of the Python API. Nothing here imports torch."""

from __future__ import annotations

import os
from pathlib import Path


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
