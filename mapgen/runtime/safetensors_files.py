"""Reading safetensors headers and a sharded checkpoint's index, trusting nothing in them.

Each header is checked as the safetensors library checks it before any byte is viewed (header
length within the file and safetensors' limit, a JSON object without repeated keys, each entry's
dtype, shape and data_offsets of the right types, the offsets tiling the data from byte 0 without
gaps or overlaps, each holding exactly its shape's bytes), and a sharded checkpoint's index
against its files (a tensor in two files, one the index does not list, a file it names that is
missing or outside the folder). Every error names the file and the tensor."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import torch

from mapgen.common.errors import MapgenError

# parsed descriptions (and index weight maps) are kept by their bytes: at most DESCRIBED_KEPT of
# them, and none whose bytes pass DESCRIBED_MAX_BYTES (a huge index or header is parsed on every open)
DESCRIBED_KEPT = 4
DESCRIBED_MAX_BYTES = 32 * 2**20
_WEIGHT_MAPS: OrderedDict[bytes, dict[str, str]] = OrderedDict()  # by the index's bytes: the last few


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


# every dtype the safetensors format defines, with its size in bits (F4 and F6 pack elements)
FORMAT_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(MapgenError):
    pass


class Entry(NamedTuple):  # one per tensor
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int
    strides: tuple[int, ...]  # contiguous, in elements
    element: int  # start in elements of the dtype (-1: not aligned to it, or not a readable dtype)


def make_entry(file: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> Entry:
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 0
    element = start // itemsize if itemsize and start % itemsize == 0 else -1
    return Entry(file, dtype, shape, start, end, tuple(strides), element)


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's object hook: a key given twice is an error (json.loads keeps the last silently)."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"'{key}' appears twice in one object (a tensor given twice?)")
        seen[key] = value
    return seen


def read_header(path: Path) -> tuple[int, bytes]:
    """A safetensors file's size and its header's bytes (what follows the 8-byte length)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file: {size} bytes, fewer than the 8 that give the header's length"
                )
            header_size = int.from_bytes(prefix, "little")
            if header_size > min(MAX_HEADER_BYTES, size - 8):
                limit = "the file's" if header_size > size - 8 else "safetensors' limit of"
                bound = size - 8 if header_size > size - 8 else MAX_HEADER_BYTES
                raise CheckpointError(
                    f"{path}: not a safetensors file: its first 8 bytes give a header of {header_size} "
                    f"bytes, more than {limit} {bound} bytes"
                )
            text = handle.read(header_size)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return size, text


def parse_header(path: Path, text: bytes) -> tuple[dict[str, dict[str, Any]], int]:
    """A header's tensor entries, validated as the safetensors library validates them, and the
    bytes their data takes."""
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: header: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: header ({len(text)} bytes) is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: header: __metadata__ must map names to strings, got {metadata!r}")
    entries = {name: _entry_fields(path, name, info) for name, info in header.items()}
    return entries, _layout(path, entries)


_INT = {int}  # (a bool's type is bool)


def _entry_fields(path: Path, name: str, info: object) -> dict[str, Any]:
    """One header entry, its fields checked: dtype a format dtype, shape non-negative integers,
    data_offsets [start, end] with end - start the bytes of that many elements."""
    if (  # the common case, checked at once: exactly the three fields, each well formed
        type(info) is dict
        and len(info) == 3
        and type(dtype := info.get("dtype")) is str
        and dtype in FORMAT_BITS
        and type(shape := info.get("shape")) is list
        and (not shape or (set(map(type, shape)) == _INT and min(shape) >= 0))
        and type(offsets := info.get("data_offsets")) is list
        and len(offsets) == 2
        and set(map(type, offsets)) == _INT
        and 0 <= offsets[0] <= offsets[1]
        and FORMAT_BITS[dtype] * math.prod(shape) == 8 * (offsets[1] - offsets[0])
    ):
        return info
    where = f"{path}: header: tensor '{name}'"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry is a JSON {type(info).__name__}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise CheckpointError(f"{where}: entry lacks {', '.join(repr(k) for k in missing)}")
    extra = sorted(set(info) - {"dtype", "shape", "data_offsets"})
    if extra:
        raise CheckpointError(f"{where}: entry has unknown field(s) {', '.join(repr(k) for k in extra)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FORMAT_BITS:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a safetensors dtype ({', '.join(FORMAT_BITS)})")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two non-negative integers [start, end]")
    start, end = offsets
    if end < start:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] end before they start")
    bits = FORMAT_BITS[dtype] * math.prod(shape)
    if bits % 8 or end - start != bits // 8:
        need = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits, not whole bytes"
        raise CheckpointError(
            f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes, but {dtype} {shape} needs {need}"
        )
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _layout(path: Path, header: dict[str, dict[str, Any]]) -> int:
    """The bytes the tensors take: they must tile [0, end) exactly, without overlaps (two
    tensors sharing bytes) or gaps, as the safetensors library requires. Returns end."""
    position, previous, gap = 0, None, None
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, end = info["data_offsets"]
        if start < position:
            assert previous is not None
            raise CheckpointError(
                f"{path}: header: tensor '{name}' data_offsets [{start}, {end}] overlap tensor "
                f"'{previous}' {header[previous]['data_offsets']}: they would share bytes"
            )
        if start > position and gap is None:
            after = f"after tensor '{previous}' ends at {position}" if previous is not None else "from the start"
            gap = (
                f"{path}: header: tensor '{name}' data_offsets [{start}, {end}] leave a gap of "
                f"{start - position} bytes {after}"
            )
        position, previous = end, name
    if gap is not None:
        raise CheckpointError(gap)
    return position


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None


def index_weight_map(index: Path, data: bytes) -> dict[str, str]:
    """A sharded checkpoint's index (`data`, its bytes): `weight_map` from tensor names to files
    inside the folder. Read-only: the same bytes give the same dict."""
    if (known := _WEIGHT_MAPS.get(data)) is not None:
        return known
    weight_map = _parse_weight_map(index, data)
    if len(data) <= DESCRIBED_MAX_BYTES:
        _WEIGHT_MAPS[data] = weight_map
        while len(_WEIGHT_MAPS) > DESCRIBED_KEPT:
            _WEIGHT_MAPS.popitem(last=False)
    return weight_map


def _parse_weight_map(index: Path, data: bytes) -> dict[str, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{index}: cannot read: {exc}") from None
    try:
        content = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{index}: {exc}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a safetensors index: it needs a 'weight_map' object of tensor -> file")
    if not weight_map:
        raise CheckpointError(f"{index}: its weight_map is empty")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{index}: weight_map gives tensor '{name}' the file {file!r}, not a file name")
        relative = PurePosixPath(file)
        if relative.is_absolute() or ".." in relative.parts or not relative.name.endswith(".safetensors"):
            raise CheckpointError(
                f"{index}: weight_map places tensor '{name}' in {file!r}, not a .safetensors file inside the folder"
            )
    return weight_map
