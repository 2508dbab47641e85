"""Lazy reading of HF safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mapgen.errors import MapgenError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(MapgenError):
    pass


class HFCheckpoint:
    """Tensor names, shapes and dtypes from the files' headers; a tensor's bytes only when asked."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._handles: dict[str, Any] = {}
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            self.file_of: dict[str, str] = dict(weight_map)
        elif (self.folder / SINGLE).is_file():
            self.file_of = {}
            for name in self._open(SINGLE).keys():
                self.file_of[name] = SINGLE
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX} nor {SINGLE} is there")

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            path = self.folder / file
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                problem = _truncation(path) or f"cannot read safetensors file: {exc}"
                raise CheckpointError(f"{path}: {problem}") from None
            self._handles[file] = handle
        return handle

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._open(self.file_of[name]).get_slice(name).get_dtype())

    def integrity_problems(self) -> list[str]:
        """Files that are missing or shorter than their own headers say (a truncated copy)."""
        problems: list[str] = []
        for file in sorted(set(self.file_of.values())):
            problem = _truncation(self.folder / file)
            if problem:
                problems.append(f"{self.folder / file}: {problem}")
        return problems

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: no tensor '{name}'")
        try:
            tensor: torch.Tensor = self._open(self.file_of[name]).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.folder / self.file_of[name]}: cannot read '{name}': {exc}"
            ) from None
        return tensor


def _truncation(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None if its size fits its header."""
    try:
        with path.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        actual = path.stat().st_size
    except (OSError, ValueError) as exc:
        return f"cannot read safetensors header: {exc}"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    needed = 8 + header_size + end
    return None if actual >= needed else f"truncated: {actual} bytes, its header needs {needed}"
