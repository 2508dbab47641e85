"""Lazy, zero-copy reading of HF safetensors checkpoints (single file, or sharded with an index).

Each file is memory-mapped once and its header parsed once; `get` returns a tensor that views
the mapped bytes, so the only copy a tensor's bytes ever see on import is the one into the
Megatron parameter (safetensors' own `get_tensor` makes one more). The mapping is copy-on-write:
the file is never modified. Writing checkpoints uses the safetensors library.

FP8 block-quantized checkpoints (DeepSeek-V3's layout) are dequantized on import: a weight `X`
stored as F8 with a companion `X_scale_inv` (F32, one scale per block of `block_size` rows x
columns, shape [ceil(rows / B0), ceil(cols / B1)]) reads through `get` as the float32 tensor
`X.to(float32) * scale_inv[row // B0, col // B1]`. The companions are an encoding detail: `names`,
`in` and `get` do not show them (`scale_names` and `raw` do). The block size comes from the
constructor, else from `config.json`'s `quantization_config` (`quant_method: fp8`,
`weight_block_size`, default [128, 128]).
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
CONFIG = "config.json"
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3's name for a block-quantized weight's scales
DEFAULT_BLOCK = (128, 128)
FP8 = frozenset({"F8_E4M3", "F8_E5M2"})

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

    def __init__(self, folder: str | Path, block_size: tuple[int, int] | None = None) -> None:
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
        configured = _configured_block(self.folder / CONFIG)
        self._scales = frozenset(n for n in self._entries if n.endswith(SCALE_SUFFIX))
        # block-quantized: said so by the caller or config.json, or evident from scale companions
        self.fp8 = block_size is not None or configured is not None or bool(self._scales)
        self.block_size: tuple[int, int] | None = (
            _block(block_size, "block_size") if block_size is not None else configured
        )
        if self.block_size is None and self.fp8:
            self.block_size = DEFAULT_BLOCK
        self._visible = [n for n in self._entries if n not in self._scales]

    def names(self) -> list[str]:
        """The model's tensors; the `*_scale_inv` companions of quantized weights are left out."""
        return list(self._visible)

    def __contains__(self, name: str) -> bool:
        return name in self._entries and name not in self._scales

    def scale_names(self) -> list[str]:
        """The `*_scale_inv` companions stored in the checkpoint (hidden from `names`)."""
        return [n for n in self._entries if n in self._scales]

    def quantized(self, name: str) -> bool:
        """Whether `get(name)` dequantizes: an F8 tensor with a `_scale_inv` companion. Its `dtype`
        stays the stored spelling (F8_E4M3); `get` returns float32 (see `loaded_dtype`)."""
        entry = self._entries[name]
        return entry.dtype in FP8 and name + SCALE_SUFFIX in self._scales

    def loaded_dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name)` returns: float32 for a quantized weight, else the stored one."""
        return torch.float32 if self.quantized(name) else DTYPES[self._entries[name].dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        """The stored safetensors spelling: F32, BF16, F8_E4M3 (also for a quantized weight)."""
        return self._entries[name].dtype

    def integrity_problems(self) -> list[str]:
        """Files shorter than their own headers say (a truncated copy), tensors of unknown dtypes,
        and broken FP8 block quantization: an F8 weight without its scale companion (in a
        block-quantized checkpoint), a companion of the wrong shape or dtype, or one with no F8
        weight."""
        problems = [
            f"{f.path}: {problem}" for f in self._files.values() if (problem := f.truncation())
        ]
        problems += [
            f"{self.folder / e.file}: tensor '{name}' has dtype {e.dtype}, which mapgen cannot read"
            for name, e in self._entries.items()
            if e.dtype not in DTYPES
        ]
        if not self.fp8:
            return problems
        for name, entry in self._entries.items():
            where = self.folder / entry.file
            if name in self._scales:
                weight = self._entries.get(name[: -len(SCALE_SUFFIX)])
                if weight is None:
                    problems.append(f"{where}: scale '{name}' has no weight '{name[: -len(SCALE_SUFFIX)]}'")
                elif weight.dtype not in FP8:
                    problems.append(f"{where}: scale '{name}' belongs to a {weight.dtype} weight, not an F8 one")
            elif entry.dtype in FP8:
                if name + SCALE_SUFFIX not in self._scales:
                    problems.append(f"{where}: F8 tensor '{name}' has no scale '{name}{SCALE_SUFFIX}'")
                elif problem := self._scale_problem(name):
                    problems.append(f"{self.folder / self._entries[name + SCALE_SUFFIX].file}: {problem}")
        return problems

    def _scale_problem(self, name: str) -> str | None:
        """What is wrong with quantized weight `name`'s scale companion, if anything."""
        weight, scale = self._entries[name], self._entries[name + SCALE_SUFFIX]
        assert self.block_size is not None
        if len(weight.shape) != 2:
            return f"F8 tensor '{name}' has shape {list(weight.shape)}; block scales need a 2-d weight"
        expected = [-(-size // block) for size, block in zip(weight.shape, self.block_size)]
        if list(scale.shape) != expected:
            return (
                f"scale '{name}{SCALE_SUFFIX}' has shape {list(scale.shape)}, but weight '{name}' "
                f"{list(weight.shape)} in blocks of {list(self.block_size)} needs {expected}"
            )
        if scale.dtype not in ("F32", "BF16", "F16", "F64"):
            return f"scale '{name}{SCALE_SUFFIX}' has dtype {scale.dtype}, not a float"
        return None

    def raw(self, name: str) -> torch.Tensor:
        """Any stored tensor (scale companions too) as stored, viewing the mapped file."""
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.folder}: no tensor '{name}'")
        return self._files[entry.file].view(entry)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, viewing the mapped file (read-only use: copy before modifying); a quantized
        weight comes dequantized, as a new float32 tensor."""
        if name not in self:
            raise CheckpointError(f"{self.folder}: no tensor '{name}'")
        entry = self._entries[name]
        if entry.dtype in FP8 and self.fp8:
            if name + SCALE_SUFFIX not in self._scales:
                raise CheckpointError(
                    f"{self.folder / entry.file}: F8 tensor '{name}' has no scale '{name}{SCALE_SUFFIX}'"
                )
            if problem := self._scale_problem(name):
                raise CheckpointError(f"{self.folder}: {problem}")
            assert self.block_size is not None
            return dequantize(self.raw(name), self.raw(name + SCALE_SUFFIX), self.block_size)
        return self._files[entry.file].view(entry)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """`weight.float() * scale_inv[row // B0, col // B1]`, as a new float32 tensor.

    One float32 allocation the size of the result, plus the scales widened over rows
    ([rows, ceil(cols / B1)], 1/B1 of it); no loop over blocks. Each element is one float32
    product, so the result does not depend on how the blocks divide the shape."""
    rows, cols = weight.shape
    block_rows, block_cols = block_size
    out = weight.to(torch.float32)
    if out.numel() == 0:
        return out
    per_row = scale_inv.to(torch.float32).repeat_interleave(block_rows, dim=0)[:rows]  # [rows, nbc]
    whole = cols // block_cols  # column blocks that are complete
    if whole:
        out[:, : whole * block_cols].view(rows, whole, block_cols).mul_(per_row[:, :whole, None])
    if whole * block_cols < cols:  # the partial block at the right edge
        out[:, whole * block_cols :].mul_(per_row[:, whole : whole + 1])
    return out


def _block(value: object, what: str) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise CheckpointError(f"{what}: expected two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _configured_block(config: Path) -> tuple[int, int] | None:
    """The FP8 block size that `config.json` declares, or None when it declares no fp8 quantization."""
    if not config.is_file():
        return None
    try:
        quantization = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config}: cannot read ({exc})") from None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        return None
    block = quantization.get("weight_block_size")
    return DEFAULT_BLOCK if block is None else _block(block, f"{config}: quantization_config.weight_block_size")
