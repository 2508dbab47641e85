"""What mapgen writes for others is readable as the umask allows, as transformers' save_pretrained
and torch.save make their files: stand-ins, generated packages, Megatron checkpoints from
`mapgen convert` and HF checkpoints from `save_hf_checkpoint` (through `convert megatron-to-hf`
and `mapgen.save_hf_pretrained`), under umask 022 and 077."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mapgen.verify import testing

MAPGEN = [sys.executable, "-m", "mapgen.cli"]


def _modes(folder: Path) -> dict[str, int]:
    """Every path under `folder` (itself as '.') -> its permission bits."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[path.relative_to(folder).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return found


def _run(args: list[str], cwd: Path, mask: int) -> None:
    result = subprocess.run(
        [*MAPGEN, *args], cwd=cwd, capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(mask)
    )
    assert result.returncode == 0, result.stderr


def _expect(folder: Path, mask: int) -> None:
    for name, mode in _modes(folder).items():
        path = folder / name
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode == want, f"{path}: {oct(mode)}, not {oct(want)} under umask {oct(mask)}"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    config = testing.ROOT / "specs/configs/llama3_2_1b.json"
    _run(["standin", str(config), "hf"], tmp_path, mask)
    _run(["build", str(testing.ROOT / "specs/llama.yaml"), "hf/config.json", "-o", "tiny", "--layout", "local"], tmp_path, mask)
    _expect(tmp_path / "hf", mask)
    _expect(tmp_path / "tiny", mask)
    if mask == 0o022:  # the converts each spawn a process: one umask is enough for them
        _run(["convert", "hf-to-megatron", "tiny", "hf", "mcore"], tmp_path, mask)
        _run(["convert", "megatron-to-hf", "tiny", "mcore", "back"], tmp_path, mask)
        _expect(tmp_path / "mcore", mask)
        _expect(tmp_path / "back", mask)
        modes = _modes(tmp_path / "back")
        assert all(mode & 0o044 == 0o044 for mode in modes.values())  # others can read every file
