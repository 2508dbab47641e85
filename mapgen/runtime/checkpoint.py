"""Lazy, zero-copy reading of HF safetensors checkpoints (single file, or sharded with an index).

Each file is memory-mapped once and its header parsed once; `get` returns a tensor that views
the mapped bytes, so the only copy a tensor's bytes ever see on import is the one into the
Megatron parameter (safetensors' own `get_tensor` makes one more). The mapping is copy-on-write:
the file is never modified. Writing checkpoints uses the safetensors library.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from mapgen.errors import MapgenError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names (the format's header spelling) -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(MapgenError):
    pass


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class _File:
    """One safetensors file: its header, and its bytes mapped on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_size))
            self.size = path.stat().st_size
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from None
        self.data_start = 8 + header_size
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}
        self._mapped: mmap.mmap | None = None

    def truncation(self) -> str | None:
        end = max((v["data_offsets"][1] for v in self.header.values()), default=0)
        needed = self.data_start + end
        return None if self.size >= needed else f"truncated: {self.size} bytes, its header needs {needed}"

    def view(self, entry: _Entry) -> torch.Tensor:
        if self._mapped is None:
            with self.path.open("rb") as handle:
                self._mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = DTYPES[entry.dtype]
        count = (entry.end - entry.start) // dtype.itemsize
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        flat = torch.frombuffer(self._mapped, dtype=dtype, count=count, offset=entry.start)
        return flat.view(entry.shape)


class HFCheckpoint:
    """Tensor names, shapes and dtypes from the files' headers; bytes only when asked for."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = {}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX} nor {SINGLE} is there")
        files = sorted(set(weight_map.values())) or [SINGLE]
        self._files: dict[str, _File] = {}
        self._entries: dict[str, _Entry] = {}
        for file in files:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            parsed = _File(path)
            self._files[file] = parsed
            for name, info in parsed.header.items():
                if weight_map and weight_map.get(name) != file:
                    continue
                start, end = info["data_offsets"]
                self._entries[name] = _Entry(
                    file, info["dtype"], tuple(info["shape"]), parsed.data_start + start, parsed.data_start + end
                )
        for name, file in weight_map.items():
            if name not in self._entries:
                raise CheckpointError(f"{self.folder / file}: has no tensor '{name}' that {INDEX} places there")

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        """The safetensors spelling: F32, BF16, ..."""
        return self._entries[name].dtype

    def integrity_problems(self) -> list[str]:
        """Files shorter than their own headers say (a truncated copy), or of unknown dtypes."""
        problems = [
            f"{f.path}: {problem}" for f in self._files.values() if (problem := f.truncation())
        ]
        problems += [
            f"{self.folder / e.file}: tensor '{name}' has dtype {e.dtype}, which mapgen cannot read"
            for name, e in self._entries.items()
            if e.dtype not in DTYPES
        ]
        return problems

    def get(self, name: str) -> torch.Tensor:
        """The tensor, viewing the mapped file (read-only use: copy before modifying)."""
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.folder}: no tensor '{name}'")
        return self._files[entry.file].view(entry)
