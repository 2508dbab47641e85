"""Writing an HF checkpoint folder from Megatron model chunks, atomically: sharded safetensors,
index and config.json into a hidden staging folder beside the target, renamed into place once
complete, every rank agreeing on each file's write (`save_hf_checkpoint`)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mapgen.common.files import host_tag, process_alive, share_tree, temporary_folder
from mapgen.runtime import mx
from mapgen.runtime.checkpoint import SCALE_SUFFIX
from mapgen.runtime.checkpoint_checks import hf_namings
from mapgen.runtime.collectives import RankError, agree_or_raise
from mapgen.runtime.context import ParallelContext
from mapgen.runtime.drivers import DEFAULT_BUCKET_BYTES, Converter, kept_float32
from mapgen.runtime.formats import DtypeArg, ExportFormat, FP8Arg, QuantArg, as_dtype, config_dtype
from mapgen.runtime.module_check import check_module
from mapgen.runtime.placement import Module
from mapgen.runtime.restack import Stacking, restacked_sizes, stacking_problems


def save_hf_checkpoint(
    module: Module,
    chunks: list[Any],
    out_dir: str | Path,
    hf_config: dict[str, Any],
    ctx: ParallelContext | None = None,
    *,
    max_shard_bytes: int = 2 * 2**30,
    writer_rank: int = 0,
    make_vocab_size_divisible_by: int = 1,
    overwrite: bool = False,
    dtype: DtypeArg = None,
    keep_float32: Iterable[str] | None = None,
    fp8: FP8Arg = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    naming: tuple[tuple[str, str], ...] = (),
    mxfp8: QuantArg = None,
    nvfp4: QuantArg = None,
    stacked_experts: Stacking = (),
) -> None:
    """Write an HF checkpoint directory (sharded safetensors, index, config.json) atomically.

    `naming`: the other namings of the module's HF_NAMINGS to write, as (its prefix, the other
    prefix) pairs (a Converter's `naming` after it loaded a checkpoint that uses them; () writes
    the module's own names). `stacked_experts`: the layers whose experts to write stacked
    (`gate_up_proj`, `down_proj`), for a module that maps them one tensor each (a Converter's
    `stacked` after it loaded a checkpoint that stores them so: Qwen3.5-MoE's published one);
    not with fp8, mxfp8 or nvfp4.

    `dtype`, `keep_float32` and `fp8` as in `Converter.export`, but `dtype="checkpoint"` means
    the checkpoint `hf_config` describes: its declared dtype (`dtype` / `torch_dtype`; tensors
    the HF model keeps in float32 stay float32) and, where its `quantization_config` says fp8,
    DeepSeek-V3's FP8 format in its block size. The config.json written says what the files
    hold: the export dtype (where the config names one) and, with FP8, the quantization_config
    (the given one's fields kept); without FP8, an fp8 quantization_config is left out, the
    weights being written dequantized. `mxfp8` and `nvfp4` as in `Converter.export`: config.json
    then carries the compressed-tensors MXFP8 or the ModelOpt W4A16_NVFP4 quantization_config
    (its `ignore` naming every unquantized 2-d weight's module), and an NVFP4 save also writes
    ModelOpt's `hf_quant_config.json`.

    All ranks take part in the export; global rank `writer_rank` writes into a hidden temporary
    folder beside `out_dir` (`.NAME.partial-HOST-PID-XXXX`) and renames it into place only once
    every file is complete. Before any collective the writer checks the target (its parent
    folder exists and takes a new folder, the target does not exist unless `overwrite`, the
    config is a JSON object) and every rank agrees on the outcome; each shard file's write is
    agreed on by every rank as soon as it is written, so any failure of the writer (an OSError,
    safetensors' SafetensorError on a full disk, anything else) stops every rank at the same
    point, none left in a collective, each raising the same report naming the rank and the file;
    the partial folder is removed. A save killed outright (SIGKILL, SIGTERM, a crash) cannot
    clean up: its partial folder is removed by the next save to the same target on the same
    host (`remove_stale_partials`). With `overwrite`, an existing target folder is replaced by
    the new one once that is complete."""
    ctx = ctx or ParallelContext.single()
    check_module(module, "save_hf_checkpoint")
    out = Path(out_dir)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    # the arguments: each checked on every rank, and every rank's agreed on (every rank passes
    # the same) in the one agreement before any collective; a refusal raises ValueError there
    refused: list[str] = []
    if isinstance(writer_rank, bool) or not isinstance(writer_rank, int) or not 0 <= writer_rank < world:
        refused.append(f"writer_rank {writer_rank!r} is not a rank of the {world} processes")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        refused.append(f"max_shard_bytes must be a positive integer, not {max_shard_bytes!r}")
    keep = kept_float32(keep_float32)
    same = (
        ("writer_rank", writer_rank), ("max_shard_bytes", max_shard_bytes), ("overwrite", overwrite),
        ("bucket_bytes", bucket_bytes), ("dtype", dtype), ("keep_float32", keep),
        ("fp8", fp8), ("naming", naming), ("mxfp8", mxfp8), ("nvfp4", nvfp4), ("stacked_experts", stacked_experts),
    )
    refused += stacking_problems(stacked_experts, (t.name for t in module.HF_TENSORS))
    what = f"cannot save {module.TARGET} to {out}"
    staging: Path | None = None
    problems: list[str] = []
    if rank == writer_rank and not refused:
        try:
            staging = staging_folder(out, hf_config, overwrite)
        except Exception as exc:  # noqa: BLE001 - agreed on by every rank just below
            problems.append(describe_error(exc))
    try:
        converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        fmt: ExportFormat | None = None
        try:
            unknown = set(naming) - set(hf_namings(module))
            if unknown:
                raise ValueError(f"naming {sorted(unknown)} is not among {module.TARGET}'s HF_NAMINGS")
            converter.naming = tuple(naming)
            if isinstance(dtype, str) and dtype == "checkpoint":
                if keep is not None or fp8 is not None or mxfp8 is not None or nvfp4 is not None:
                    raise ValueError(
                        "dtype='checkpoint' takes the config's own dtype and quantization: no fp8, mxfp8, nvfp4 or keep_float32"
                    )
                quantization = hf_config.get("quantization_config") if isinstance(hf_config, dict) else None
                declared = config_dtype(hf_config) if isinstance(hf_config, dict) else None
                fp8 = quantization if isinstance(quantization, dict) and quantization.get("quant_method") == "fp8" else None
                dtype = declared
            if not converter._problems:  # else agreed on below: a model not matching the module has no format
                fmt = converter.export_format(dtype=dtype, keep_float32=keep, fp8=fp8, mxfp8=mxfp8, nvfp4=nvfp4)
                if stacked_experts and fmt.fp8:
                    raise ValueError(f"stacked_experts with {fmt.scheme}: quantized experts are written one tensor each")
        except (ValueError, TypeError) as exc:
            refused.append(str(exc))
        try:  # the target, the model, the layout and the arguments: one agreement
            converter._agree(problems + [f"save_hf_checkpoint: {r}" for r in refused], what, same)
        except RankError:
            if refused:
                raise ValueError(f"save_hf_checkpoint: {refused[0]}") from None
            raise
        assert fmt is not None
        sizes = restacked_sizes(_written_sizes(module, fmt), stacked_experts) if stacked_experts else _written_sizes(module, fmt)
        shards = _shard_plan(sizes, max_shard_bytes, _companions(module, fmt))
        remaining = {f: sum(1 for v in shards.values() if v == f) for f in set(shards.values())}
        pending: dict[str, dict[str, torch.Tensor]] = {f: {} for f in remaining}
        failed: dict[str, str] = {}  # file -> what went wrong writing it (the writer's)
        # every rank sees every tensor in the same order (all_stages), so every rank knows when
        # a file is complete: the writer writes it, then all agree on how that went
        exported = converter._export(bucket_bytes, True, dtype, keep, fp8, mxfp8, nvfp4, stacked_experts)  # the module's names
        copies = set(getattr(module, "HF_COPIES", {}))
        for name, tensor in exported:
            file = shards[name]
            if staging is not None and file not in failed:
                try:  # an HF copy is its original's tensor, which safetensors will not write twice
                    copied = tensor.clone() if _original(name, fmt) in copies else tensor.contiguous()
                    pending[file][converter.hf_name(name)] = copied
                except Exception as exc:  # noqa: BLE001 - agreed on below
                    failed[file] = f"{out / file}: {describe_error(exc)}"
            remaining[file] -= 1
            if remaining[file]:
                continue
            tensors = pending.pop(file)
            if staging is not None and file not in failed:
                try:
                    save_file(tensors, str(staging / file), metadata={"format": "pt"})
                except Exception as exc:  # noqa: BLE001 - agreed on below
                    failed[file] = f"writing {out / file} (as {staging / file}): {describe_error(exc)}"
            del tensors
            agree_or_raise([failed[file]] if file in failed else [], what)
        final: list[str] = []
        if staging is not None:
            try:
                weight_map = {converter.hf_name(name): file for name, file in shards.items()}
                index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
                written = _written_config(hf_config, fmt, dtype)
                (staging / "config.json").write_text(json.dumps(written, indent=2, allow_nan=False) + "\n")
                modelopt = mx.hf_quant_config(fmt.quantization_config or {})
                if modelopt is not None:  # ModelOpt's own file beside config.json
                    (staging / "hf_quant_config.json").write_text(json.dumps(modelopt, indent=2) + "\n")
                share_tree(staging)  # safetensors writes its files private; a checkpoint is read by others
                move_into_place(staging, out, overwrite)
                staging = None
            except Exception as exc:  # noqa: BLE001 - agreed on below
                final.append(f"finishing {out}: {describe_error(exc)}")
        agree_or_raise(final, what)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


INDEX_FILE = "model.safetensors.index.json"


_PARTIAL = "partial"  # .NAME.partial-HOST-PID-XXXXXXXX: a save in progress (or killed)


_REPLACED = "replaced"  # .NAME.replaced-HOST-PID-XXXXXXXX: the folder an overwrite replaces


def describe_error(exc: BaseException) -> str:
    """An exception in a line: its type (SafetensorError, PermissionError, ...) and message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def _hidden(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{host_tag()}-{os.getpid()}-"


def staging_folder(out: Path, hf_config: object, overwrite: bool) -> Path:
    """The writer's checks of the target, then its new hidden staging folder beside it."""
    if not isinstance(hf_config, dict):
        raise ValueError(f"hf_config must be a dict (config.json's fields), not a {type(hf_config).__name__}")
    try:
        json.dumps(hf_config, allow_nan=False)  # NaN and Infinity are not JSON
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hf_config cannot be written as config.json: {exc}") from None
    parent = out.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"parent folder {parent} does not exist" if not parent.exists() else f"{parent} is not a folder")
    if out.is_symlink() or out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (overwrite=True replaces it)")
        if out.is_symlink() or not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; overwrite replaces folders only")
    remove_stale_partials(out)
    try:
        return temporary_folder(parent, _hidden(out, _PARTIAL))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create a folder in {parent}: {exc.strerror}") from None


def move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    if not (out.is_symlink() or out.exists()):
        os.rename(staging, out)  # atomic: the complete checkpoint appears at once
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared while saving; the new checkpoint is not moved there")
    aside = temporary_folder(out.parent, _hidden(out, _REPLACED))
    os.rename(out, aside / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside / out.name, out)  # put the old checkpoint back
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_partials(out_dir: str | Path) -> list[Path]:
    """Remove what saves to `out_dir` left behind when killed before they could clean up
    (SIGKILL, SIGTERM, a crash): hidden partial folders `.NAME.partial-HOST-PID-*` beside
    `out_dir` that a process of this host made and that no longer runs (and the copies an
    overwrite had set aside, `.NAME.replaced-HOST-PID-*`, once the new checkpoint stands in
    `out_dir`). A folder of a process that still runs, or of another host, is left alone.
    `save_hf_checkpoint` calls this before it writes; returns what was removed."""
    out = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({_PARTIAL}|{_REPLACED})-(.+)-(\d+)-[^-]*$")
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or match.group(2) != host_tag() or process_alive(int(match.group(3))):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if match.group(1) == _REPLACED and not out.is_dir():
            continue  # killed between the two renames of an overwrite: the old checkpoint is all there is
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def _written_sizes(module: Module, fmt: ExportFormat) -> dict[str, int]:
    """Bytes of every tensor a save writes, in HF order (scale companions after their weight)."""
    sizes: dict[str, int] = {}
    for tensor in module.HF_TENSORS:
        for name, shape, dtype in fmt.outputs(tensor.name, tuple(tensor.shape)):
            sizes[name] = int(torch.Size(shape).numel()) * dtype.itemsize
    return sizes


def _original(name: str, fmt: ExportFormat) -> str:
    """The weight a scale companion belongs to; any other name as it is."""
    for suffix in fmt.companions:
        if name.endswith(suffix) and name.removesuffix(suffix) in fmt.fp8:
            return name.removesuffix(suffix)
    return name


def _companions(module: Module, fmt: ExportFormat) -> frozenset[str]:
    """The scale companions a save writes (each goes in its weight's file)."""
    return frozenset(
        name for tensor in module.HF_TENSORS if tensor.name in fmt.fp8
        for name, _, _ in fmt.outputs(tensor.name, tuple(tensor.shape))[1:]
    )


def _written_config(hf_config: dict[str, Any], fmt: ExportFormat, dtype: DtypeArg) -> dict[str, Any]:
    """config.json as saved: the export dtype where the config declares one, the FP8
    quantization_config with FP8 weights, none claiming FP8 without them."""
    written = dict(hf_config)
    if fmt.quantization_config is not None:
        written["quantization_config"] = fmt.quantization_config
    elif isinstance(written.get("quantization_config"), dict) and written["quantization_config"].get("quant_method") in (
        "fp8",
        "mxfp4",  # MXFP4 is read (dequantized), never written: the tensors saved are not MXFP4
        "compressed-tensors",  # written only with the MXFP8 weights it describes
        "modelopt",  # written only with the NVFP4 weights it describes
    ):
        del written["quantization_config"]
    if dtype is not None and not (isinstance(dtype, str) and dtype == "checkpoint"):
        name = str(as_dtype(dtype, "dtype")).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in written:
                written[key] = name
    return written


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int, companions: frozenset[str] | None = None) -> dict[str, str]:
    """Tensor name -> file, filling files in order up to max_shard_bytes; a scale companion
    (`companions`; default: FP8's `<weight>_scale_inv`) goes in its weight's file."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if companions is not None:
            companion = name in companions
        else:
            companion = name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in sizes
        if groups[-1] and size + nbytes > max_shard_bytes and not companion:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    total = len(groups)
    return {
        name: f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        for i, names in enumerate(groups)
        for name in names
    }
