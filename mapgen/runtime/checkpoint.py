"""Lazy, zero-copy reading of HF safetensors checkpoints (single file, or sharded with an index).

Each open memory-maps a file once, on first use, and reads its header; what the index, the
headers and config.json say is parsed and checked once per process for the same bytes (opening
a checkpoint again costs those few small reads). `get` returns a tensor that views the mapped
bytes, so the only copy a tensor's bytes ever see on import is the one into the
Megatron parameter (safetensors' own `get_tensor` makes one more). The mapping is copy-on-write:
the file is never modified. Writing checkpoints uses the safetensors library.

Nothing in a header is trusted: it is checked as the safetensors library checks it before any
byte is viewed (header length within the file and safetensors' limit, a JSON object without
repeated keys, each entry's dtype, shape and data_offsets of the right types, the offsets
tiling the data from byte 0 without gaps or overlaps, each holding exactly its shape's bytes),
and a sharded checkpoint's index against its files (a tensor in two files, one the index does
not list, a file it names that is missing or outside the folder). Every error names the file
and the tensor.

FP8 block-quantized checkpoints (DeepSeek-V3's layout) are dequantized on import: a weight `X`
stored as F8 with a companion `X_scale_inv` (F32, one scale per block of `block_size` rows x
columns, shape [ceil(rows / B0), ceil(cols / B1)]) reads through `get` as the float32 tensor
`X.to(float32) * scale_inv[row // B0, col // B1]`. The companions are an encoding detail: `names`,
`in` and `get` do not show them (`scale_names` and `raw` do). The block size comes from the
constructor, else from `config.json`'s `quantization_config` (`quant_method: fp8`,
`weight_block_size`, default [128, 128]).

MXFP4 checkpoints (gpt-oss's experts, `quantization_config.quant_method: mxfp4`) store a tensor `X`
as `X_blocks` and `X_scales` (`mapgen.runtime.mxfp4`): `names`, `in`, `shape` and `get` show `X`
(dequantized, float32, in the shape transformers gives it) and hide the companions, which
`mxfp4_names` and `raw` show; `integrity_problems` checks them. `loader()` is what an import reads
through: like `get`, but a stacked MXFP4 tensor comes as `MXFP4Stacked`, whose `[i]` dequantizes
expert i alone.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, NamedTuple, cast

import torch

from mapgen.common.errors import MapgenError
from mapgen.runtime import fileread, mxfp4

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


# every dtype the safetensors format defines, with its size in bits (F4 and F6 pack elements)
FORMAT_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


Loader = Callable[[str], torch.Tensor]


class CheckpointError(MapgenError):
    pass


class _Entry(NamedTuple):  # one per tensor
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int
    strides: tuple[int, ...]  # contiguous, in elements
    element: int  # start in elements of the dtype (-1: not aligned to it, or not a readable dtype)


def _entry(file: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> _Entry:
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 0
    element = start // itemsize if itemsize and start % itemsize == 0 else -1
    return _Entry(file, dtype, shape, start, end, tuple(strides), element)


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


def _read_header(path: Path) -> tuple[int, bytes]:
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


def _parse_header(path: Path, text: bytes) -> tuple[dict[str, dict[str, Any]], int]:
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


_SERIALS = itertools.count()


@dataclass(frozen=True)
class _Described:
    """What a checkpoint's index, file headers and config.json say, parsed and checked: a pure
    function of their bytes and the block size asked for, so it is kept (`_DESCRIBED`) under
    those bytes and made again only when one of them changes."""

    files: dict[str, tuple[int, int]]  # file -> (data start, data size) from its header
    entries: dict[str, _Entry]
    scales: frozenset[str]
    fp8: bool
    block_size: tuple[int, int] | None
    mxfp4: dict[str, tuple[str, str]]  # X -> (X_blocks, X_scales)
    mxfp4_declared: bool
    visible: tuple[str, ...]
    config: dict[str, Any]  # config.json ({} when there is none or it is not an object)
    # (the module's prefix, the files' prefix) of each other naming the files use (`_renamed`)
    naming: tuple[tuple[str, str], ...] = ()
    # the stacked-experts tensors served one expert at a time (`_unstacked`), in the module's
    # naming, each with its count of experts
    unstacked: tuple[tuple[str, int], ...] = ()
    serial: int = field(default_factory=lambda: next(_SERIALS))  # never reused: a key for checks


# descriptions by the bytes they were made from, newest last; at most DESCRIBED_KEPT of them, and
# none whose bytes pass DESCRIBED_MAX_BYTES (a huge index or header is parsed on every open)
_DESCRIBED: OrderedDict[tuple[object, ...], _Described] = OrderedDict()
DESCRIBED_KEPT = 4
DESCRIBED_MAX_BYTES = 32 * 2**20


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


def _renamed(
    folder: Path, entries: dict[str, _Entry], namings: tuple[tuple[str, str], ...]
) -> tuple[dict[str, _Entry], tuple[tuple[str, str], ...]]:
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


def _unstacked(entries: dict[str, _Entry]) -> tuple[dict[str, _Entry], tuple[tuple[str, int], ...]]:
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
            out[f"{prefix}{e}.gate_proj.weight"] = _entry(gate_up.file, gate_up.dtype, (rows // 2, hidden), start, start + half)
            out[f"{prefix}{e}.up_proj.weight"] = _entry(gate_up.file, gate_up.dtype, (rows // 2, hidden), start + half, start + 2 * half)
            start = down.start + e * half
            out[f"{prefix}{e}.down_proj.weight"] = _entry(down.file, down.dtype, (hidden, rows // 2), start, start + half)
        del out[name], out[prefix + STACKED_DOWN]
        served += [(name, experts), (prefix + STACKED_DOWN, experts)]
    return out, tuple(served)


def _describe(
    folder: Path,
    weight_map: dict[str, str],
    headers: dict[str, bytes],
    config_text: bytes | None,
    block_size: tuple[int, int] | None,
    namings: tuple[tuple[str, str], ...] = (),
    unstack: bool = False,
) -> _Described:
    files: dict[str, tuple[int, int]] = {}
    entries: dict[str, _Entry] = {}
    found_in: dict[str, list[str]] = {}  # tensor -> every file whose header has it
    for file, text in headers.items():
        tensors, data_size = _parse_header(folder / file, text)
        data_start = 8 + len(text)
        files[file] = (data_start, data_size)
        for name, info in tensors.items():
            found_in.setdefault(name, []).append(file)
            if weight_map and weight_map.get(name) != file:
                continue
            start, end = info["data_offsets"]
            entries[name] = _entry(file, info["dtype"], tuple(info["shape"]), data_start + start, data_start + end)
    problems = [
        f"tensor '{name}' is in {len(where)} files ({', '.join(where)})"
        + (f"; {INDEX} places it in {weight_map[name]}" if name in weight_map else "")
        for name, where in found_in.items()
        if len(where) > 1
    ]
    problems += [
        f"{folder / where[0]}: has tensor '{name}', which {INDEX} does not list"
        for name, where in found_in.items()
        if weight_map and name not in weight_map and len(where) == 1
    ]
    problems += [
        f"{folder / file}: has no tensor '{name}' that {INDEX} places there"
        for name, file in weight_map.items()
        if name not in entries
    ]
    if problems:
        raise CheckpointError(f"{folder}: inconsistent checkpoint: " + "; ".join(problems[:10]))
    entries, naming = _renamed(folder, entries, namings)
    entries, unstacked = _unstacked(entries) if unstack else (entries, ())
    config, quantization = _config(folder / CONFIG, config_text)
    configured = _configured_block(folder / CONFIG, quantization)
    scales = frozenset(n for n in entries if n.endswith(SCALE_SUFFIX))
    # block-quantized: said so by the caller or config.json, or evident from scale companions
    fp8 = block_size is not None or configured is not None or bool(scales)
    block: tuple[int, int] | None = _block(block_size, "block_size") if block_size is not None else configured
    if block is None and fp8:
        block = DEFAULT_BLOCK
    # MXFP4: X_blocks with X_scales beside it (said so by config.json or evident from the pair)
    pairs: dict[str, tuple[str, str]] = {
        n[: -len(mxfp4.BLOCKS_SUFFIX)]: (n, n[: -len(mxfp4.BLOCKS_SUFFIX)] + mxfp4.SCALES_SUFFIX)
        for n in entries
        if n.endswith(mxfp4.BLOCKS_SUFFIX) and n[: -len(mxfp4.BLOCKS_SUFFIX)] + mxfp4.SCALES_SUFFIX in entries
    }
    companions = {c for pair in pairs.values() for c in pair}
    visible = []
    for n in entries:
        if n in scales or n in companions and not n.endswith(mxfp4.BLOCKS_SUFFIX):
            continue
        # a quantized tensor stands where its blocks stand
        visible.append(n[: -len(mxfp4.BLOCKS_SUFFIX)] if n in companions else n)
    declared = bool(pairs) or (quantization or {}).get("quant_method") == "mxfp4"
    return _Described(files, entries, scales, fp8, block, pairs, declared, tuple(visible), config, naming, unstacked)


def _unregister(addresses: list[int]) -> None:
    for address in addresses:
        fileread.unregister(address)


class HFCheckpoint:
    """Tensor names, shapes and dtypes from the files' headers; bytes only when asked for.

    Every open reads the index, config.json and each file's header afresh; what they say is
    parsed and checked once per process for the same bytes (`_Described`), so opening a
    checkpoint again costs a few small reads. Tensor bytes are always read from the files."""

    def __init__(
        self,
        folder: str | Path,
        block_size: tuple[int, int] | None = None,
        namings: tuple[tuple[str, str], ...] = (),
        unstack: bool = False,
    ) -> None:
        """`namings`: a module's HF_NAMINGS, (its prefix, another naming's prefix) pairs; where
        the files use the other naming, every method takes and gives the module's names, and
        `file_name` turns one back into the files'. `unstack`: serve a layer's stacked experts
        (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) as one tensor per
        expert (`experts.<e>.gate_proj.weight`, ...; `_unstacked`), for a module that maps them
        so (`per_expert_names`): Qwen3.5-MoE's published checkpoint stacks its decoder layers'
        experts but not its MTP layer's. `unstacked` names the stacked tensors so served (with
        their counts of experts)."""
        self.folder = Path(folder)
        index = self.folder / INDEX
        index_text: bytes | None = None
        if index.is_file():
            index_text = _read(index)
            weight_map = _weight_map(index, index_text)
        elif (self.folder / SINGLE).is_file():
            weight_map = {}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX} nor {SINGLE} is there")
        self._sizes: dict[str, int] = {}  # each file's size now (a copy may be truncated)
        headers: dict[str, bytes] = {}
        for file in sorted(set(weight_map.values())) or [SINGLE]:
            path = self.folder / file
            if not path.is_file():
                placed = sorted(n for n, f in weight_map.items() if f == file)
                raise CheckpointError(
                    f"{path}: missing, but {index} places {len(placed)} tensor(s) there ('{placed[0]}', ...)"
                )
            self._sizes[file], headers[file] = _read_header(path)
        config = self.folder / CONFIG
        config_text = _read(config) if config.is_file() else None
        key = (index_text, config_text, repr(block_size), namings, unstack, tuple(headers.items()))  # nothing names the folder
        described = _DESCRIBED.get(key)
        if described is None:
            described = _describe(self.folder, weight_map, headers, config_text, block_size, namings, unstack)
            if sum(len(t) for t in headers.values()) + len(index_text or b"") <= DESCRIBED_MAX_BYTES:
                _DESCRIBED[key] = described
                while len(_DESCRIBED) > DESCRIBED_KEPT:
                    _DESCRIBED.popitem(last=False)
        else:
            _DESCRIBED.move_to_end(key)
        self._described = described
        self._entries = described.entries
        self._scales = described.scales
        self._mxfp4 = described.mxfp4
        self.fp8 = described.fp8
        self.block_size = described.block_size
        self.mxfp4 = described.mxfp4_declared
        self.config = described.config
        self.naming = described.naming
        self.unstacked = described.unstacked
        self._maps: dict[str, mmap.mmap] = {}
        self._registered: list[int] = []  # the mappings `fileread` may read past (by their address)
        weakref.finalize(self, _unregister, self._registered)
        self._typed: dict[tuple[str, str], torch.Tensor] = {}  # (file, dtype) -> the file as that dtype

    @property
    def serial(self) -> int:
        """Identifies what the index, headers and config.json said: the same number for the same
        bytes (while this process keeps their description), never for other bytes."""
        return self._described.serial

    @property
    def sizes(self) -> tuple[tuple[str, int], ...]:
        """Each file's size when it was opened."""
        return tuple(self._sizes.items())

    def _view(self, entry: _Entry, name: str) -> torch.Tensor:
        """Tensor `name` viewing the mapped file (mapped on first use, copy-on-write)."""
        if entry.end > self._sizes[entry.file]:
            raise CheckpointError(
                f"{self.folder / entry.file}: tensor '{name}' ends at byte {entry.end}, past the end of the file "
                f"({self._sizes[entry.file]} bytes): truncated"
            )
        if entry.dtype not in DTYPES:
            raise CheckpointError(
                f"{self.folder / entry.file}: tensor '{name}' has dtype {entry.dtype}, which mapgen cannot read"
            )
        typed = self._typed.get((entry.file, entry.dtype))
        if typed is None:
            mapped, fd = self._maps.get(entry.file), None
            if mapped is None:
                path = self.folder / entry.file
                with path.open("rb") as handle:
                    mapped = self._maps[entry.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                    fd = os.dup(handle.fileno())
            whole = torch.frombuffer(mapped, dtype=torch.uint8)
            if fd is not None:  # imports may now read this file's runs straight into a parameter
                fileread.register(whole.data_ptr(), len(mapped), fd, str(path))
                self._registered.append(whole.data_ptr())
            itemsize = DTYPES[entry.dtype].itemsize
            typed = self._typed[(entry.file, entry.dtype)] = whole[: len(whole) - len(whole) % itemsize].view(
                DTYPES[entry.dtype]
            )
        if entry.element >= 0:
            return typed.as_strided(entry.shape, entry.strides, entry.element)
        dtype = DTYPES[entry.dtype]  # not aligned to its dtype in the file: a view of its own
        count = (entry.end - entry.start) // dtype.itemsize
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(self._maps[entry.file], dtype=dtype, count=count, offset=entry.start).view(entry.shape)

    def _truncation(self, file: str) -> str | None:
        """A file shorter or longer than its header's tensors (the header needs exactly)."""
        data_start, data_size = self._described.files[file]
        size, needed = self._sizes[file], data_start + data_size
        if size < needed:
            return f"truncated: {size} bytes, its header needs {needed}"
        if size > needed:
            return f"{size} bytes, {size - needed} more than its header's tensors take ({needed})"
        return None

    def file_name(self, name: str) -> str:
        """A tensor's name as the files have it (the module's name unless `naming` renamed it)."""
        return named_as(name, self.naming)

    def names(self) -> list[str]:
        """The model's tensors; the `*_scale_inv` companions of quantized weights are left out."""
        return list(self._described.visible)

    def __contains__(self, name: str) -> bool:
        return (name in self._entries and name not in self._scales and not self._is_companion(name)) or name in self._mxfp4

    def _is_companion(self, name: str) -> bool:
        if not self._mxfp4:
            return False
        for suffix in (mxfp4.BLOCKS_SUFFIX, mxfp4.SCALES_SUFFIX):
            if name.endswith(suffix) and name[: -len(suffix)] in self._mxfp4:
                return True
        return False

    def mxfp4_names(self) -> list[str]:
        """The MXFP4-quantized tensors (each stored as `X_blocks` and `X_scales`)."""
        return list(self._mxfp4)

    def scale_names(self) -> list[str]:
        """The `*_scale_inv` companions stored in the checkpoint (hidden from `names`)."""
        return [n for n in self._entries if n in self._scales]

    def quantized(self, name: str) -> bool:
        """Whether `get(name)` dequantizes: an F8 tensor with a `_scale_inv` companion. Its `dtype`
        stays the stored spelling (F8_E4M3); `get` returns float32 (see `loaded_dtype`)."""
        if name in self._mxfp4:
            return True
        entry = self._entries[name]
        return entry.dtype in FP8 and name + SCALE_SUFFIX in self._scales

    def loaded_dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name)` returns: float32 for a quantized weight, else the stored one."""
        return torch.float32 if self.quantized(name) else DTYPES[self._entries[name].dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            return mxfp4.dequantized_shape(self._entries[self._mxfp4[name][0]].shape)
        return self._entries[name].shape

    def file(self, name: str) -> Path:
        """The file that holds tensor `name` (an MXFP4 tensor's blocks)."""
        if name in self._mxfp4:
            name = self._mxfp4[name][0]
        return self.folder / self._entries[name].file

    def dtype(self, name: str) -> str:
        """The stored safetensors spelling: F32, BF16, F8_E4M3 (also for a quantized weight);
        MXFP4 for a tensor stored as blocks and scales."""
        if name in self._mxfp4:
            return "MXFP4"
        return self._entries[name].dtype

    def integrity_problems(self) -> list[str]:
        """Files shorter (a truncated copy) or longer than their own headers say, tensors of dtypes
        mapgen cannot read, and broken FP8 block quantization: an F8 weight without its scale
        companion (in a block-quantized checkpoint), a companion of the wrong shape or dtype, or
        one with no F8 weight. (Malformed headers and inconsistent shards are refused when the
        checkpoint is opened.)"""
        problems = [
            f"{self.folder / file}: {problem}" for file in self._sizes if (problem := self._truncation(file))
        ]
        problems += [
            f"{self.folder / e.file}: tensor '{name}' has dtype {e.dtype}, which mapgen cannot read"
            for name, e in self._entries.items()
            if e.dtype not in DTYPES
        ]
        problems += [
            f"{self.folder / self._entries[pair[0]].file}: {problem}"
            for name, pair in self._mxfp4.items()
            if (problem := self._mxfp4_problem(name))
        ]
        if self.mxfp4:
            problems += [
                f"{self.folder / e.file}: '{n}' has no companion '{n[: -len(suffix)]}{other}' (MXFP4 stores a tensor as both)"
                for n, e in self._entries.items()
                for suffix, other in ((mxfp4.BLOCKS_SUFFIX, mxfp4.SCALES_SUFFIX), (mxfp4.SCALES_SUFFIX, mxfp4.BLOCKS_SUFFIX))
                if n.endswith(suffix) and n[: -len(suffix)] not in self._mxfp4 and e.dtype == "U8"
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

    def _mxfp4_problem(self, name: str) -> str | None:
        blocks, scales = (self._entries[n] for n in self._mxfp4[name])
        return mxfp4.companion_problem(name, blocks.shape, blocks.dtype, scales.shape, scales.dtype)

    def _mxfp4_checked(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if problem := self._mxfp4_problem(name):
            raise CheckpointError(f"{self.folder / self._entries[self._mxfp4[name][0]].file}: {problem}")
        blocks, scales = self._mxfp4[name]
        return self.raw(blocks), self.raw(scales)

    def loader(self) -> Loader:
        """What an import reads through: `get`, except that an MXFP4 tensor with a leading expert
        dim comes as an `MXFP4Stacked`, so that a rank dequantizes only the experts it imports
        (the generated import functions read a stacked tensor as `load(X)[i]`)."""

        def load(name: str) -> torch.Tensor:
            if name in self._mxfp4 and len(self.shape(name)) == 3:
                return cast(torch.Tensor, MXFP4Stacked(*self._mxfp4_checked(name)))
            return self.get(name)

        if self._mxfp4 or self.fp8:
            return load
        entries, scales, view = self._entries, self._scales, self._view

        def load_plain(name: str) -> torch.Tensor:  # nothing quantized: `get` without its branches
            entry = entries.get(name)
            if entry is None or name in scales:
                return self.get(name)  # raises, naming the tensor
            return view(entry, name)

        return load_plain

    def raw(self, name: str) -> torch.Tensor:
        """Any stored tensor (scale companions too) as stored, viewing the mapped file."""
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.folder}: no tensor '{name}'")
        return self._view(entry, name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, viewing the mapped file (read-only use: copy before modifying); a quantized
        weight comes dequantized, as a new float32 tensor."""
        if name not in self:
            raise CheckpointError(f"{self.folder}: no tensor '{name}'")
        if name in self._mxfp4:
            return mxfp4.dequantize(*self._mxfp4_checked(name))
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
        return self._view(entry, name)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None


_WEIGHT_MAPS: OrderedDict[bytes, dict[str, str]] = OrderedDict()  # by the index's bytes: the last few


def _weight_map(index: Path, data: bytes) -> dict[str, str]:
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


class MXFP4Stacked:
    """A stacked-experts MXFP4 tensor [E, ...], read one expert at a time: `[i]` is expert i's
    float32 slice, dequantized from its own blocks and scales only."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        self.blocks, self.scales = blocks, scales
        self.shape = torch.Size(mxfp4.dequantized_shape(tuple(blocks.shape)))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        if not isinstance(index, int) or not -len(self) <= index < len(self):
            raise IndexError(f"expert {index!r} of a stacked MXFP4 tensor of {len(self)} experts")
        return mxfp4.dequantize(self.blocks[index], self.scales[index])


def _config(config: Path, text: bytes | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json (`text`, its bytes; None when there is none) as a dict ({} if it is not an
    object), and its `quantization_config` if that is a mapping."""
    if text is None:
        return {}, None
    try:
        content = json.loads(text)
        quantization = content.get("quantization_config")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config}: cannot read ({exc})") from None
    return content, quantization if isinstance(quantization, dict) else None


def _block(value: object, what: str) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise CheckpointError(f"{what}: expected two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _configured_block(config: Path, quantization: dict[str, Any] | None) -> tuple[int, int] | None:
    """The FP8 block size that `config.json`'s `quantization` declares, or None when it declares
    no fp8 quantization."""
    if quantization is None or quantization.get("quant_method") != "fp8":
        return None
    block = quantization.get("weight_block_size")
    return DEFAULT_BLOCK if block is None else _block(block, f"{config}: quantization_config.weight_block_size")
