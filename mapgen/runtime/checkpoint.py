"""Lazy, zero-copy reading of HF safetensors checkpoints (single file, or sharded with an index).

Each open memory-maps a file once, on first use, and reads its header; what the index, the
headers and config.json say is parsed and checked once per process for the same bytes (opening
a checkpoint again costs those few small reads). `get` returns a tensor that views the mapped
bytes, so the only copy a tensor's bytes ever see on import is the one into the
Megatron parameter (safetensors' own `get_tensor` makes one more). The mapping is copy-on-write:
the file is never modified. Writing checkpoints uses the safetensors library.

Nothing in a header or index is trusted (`safetensors_files.py` checks them as the safetensors
library does, every error naming the file and the tensor); other namings and stacked experts are
`hf_names.py`'s.

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
import mmap
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch

from mapgen.runtime import fileread, mxfp4
from mapgen.runtime.hf_names import renamed_entries, unstacked_entries, named_as
from mapgen.runtime.safetensors_files import (
    DESCRIBED_KEPT,
    DESCRIBED_MAX_BYTES,
    DTYPES,
    CheckpointError,
    Entry,
    make_entry,
    parse_header,
    read_bytes,
    read_header,
    index_weight_map,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3's name for a block-quantized weight's scales
DEFAULT_BLOCK = (128, 128)
FP8 = frozenset({"F8_E4M3", "F8_E5M2"})


Loader = Callable[[str], torch.Tensor]


_SERIALS = itertools.count()


@dataclass(frozen=True)
class _Described:
    """What a checkpoint's index, file headers and config.json say, parsed and checked: a pure
    function of their bytes and the block size asked for, so it is kept (`_DESCRIBED`) under
    those bytes and made again only when one of them changes."""

    files: dict[str, tuple[int, int]]  # file -> (data start, data size) from its header
    entries: dict[str, Entry]
    scales: frozenset[str]
    fp8: bool
    block_size: tuple[int, int] | None
    mxfp4: dict[str, tuple[str, str]]  # X -> (X_blocks, X_scales)
    mxfp4_declared: bool
    visible: tuple[str, ...]
    config: dict[str, Any]  # config.json ({} when there is none or it is not an object)
    # (the module's prefix, the files' prefix) of each other naming the files use (`renamed_entries`)
    naming: tuple[tuple[str, str], ...] = ()
    # the stacked-experts tensors served one expert at a time (`unstacked_entries`), in the module's
    # naming, each with its count of experts
    unstacked: tuple[tuple[str, int], ...] = ()
    serial: int = field(default_factory=lambda: next(_SERIALS))  # never reused: a key for checks


# descriptions by the bytes they were made from, newest last; at most DESCRIBED_KEPT of them, and
# none whose bytes pass DESCRIBED_MAX_BYTES (a huge index or header is parsed on every open)
_DESCRIBED: OrderedDict[tuple[object, ...], _Described] = OrderedDict()


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
    entries: dict[str, Entry] = {}
    found_in: dict[str, list[str]] = {}  # tensor -> every file whose header has it
    for file, text in headers.items():
        tensors, data_size = parse_header(folder / file, text)
        data_start = 8 + len(text)
        files[file] = (data_start, data_size)
        for name, info in tensors.items():
            found_in.setdefault(name, []).append(file)
            if weight_map and weight_map.get(name) != file:
                continue
            start, end = info["data_offsets"]
            entries[name] = make_entry(file, info["dtype"], tuple(info["shape"]), data_start + start, data_start + end)
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
    entries, naming = renamed_entries(folder, entries, namings)
    entries, unstacked = unstacked_entries(entries) if unstack else (entries, ())
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
        expert (`experts.<e>.gate_proj.weight`, ...; `unstacked_entries`), for a module that maps them
        so (`per_expert_names`): Qwen3.5-MoE's published checkpoint stacks its decoder layers'
        experts but not its MTP layer's. `unstacked` names the stacked tensors so served (with
        their counts of experts)."""
        self.folder = Path(folder)
        index = self.folder / INDEX
        index_text: bytes | None = None
        if index.is_file():
            index_text = read_bytes(index)
            weight_map = index_weight_map(index, index_text)
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
            self._sizes[file], headers[file] = read_header(path)
        config = self.folder / CONFIG
        config_text = read_bytes(config) if config.is_file() else None
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

    def _view(self, entry: Entry, name: str) -> torch.Tensor:
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
