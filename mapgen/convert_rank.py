"""One rank's part of `mapgen convert`: build the model, read one checkpoint into it, write the other.

hf-to-megatron imports the HF checkpoint through the module and has megatron-core write the
distributed checkpoint; megatron-to-hf has megatron-core load the distributed checkpoint and
exports the HF one; each counts its phases' time and its peak memory.

`run_convert` is what each process runs (spawned by `mapgen.convert.convert`, or started by
torchrun); every failure that can come on one rank only is agreed on by all before any goes on.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.distributed as dist

from mapgen.common.files import share_tree
from mapgen.common.errors import MapgenError
from mapgen.compiler.megatron_config import DTYPES
from mapgen.compiler.parallel_state import initialize_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.convert_job import ConvertJob, ConvertResult, dims_record
from mapgen.megatron_checkpoint import (
    CONFIG,
    RECORD,
    RELEASE,
    TRACKER,
    checkpoint_failure,
    damaged_files,
    first_line,
    iteration_folder,
    read_megatron_checkpoint,
    storage_metadata,
)
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.checkpoint_checks import hf_namings
from mapgen.runtime.collectives import RankError, agree_or_raise
from mapgen.runtime.drivers import Converter
from mapgen.runtime.hf_names import config_naming
from mapgen.runtime.save import describe_error, move_into_place, save_hf_checkpoint, staging_folder
from mapgen.runtime.vocab import VOCAB_PARAMS, padded_vocab_size
from mapgen.sharded_state import SHARDED_METADATA, model_problems, sharded_state, state_keys, unused_tensors, without_objects
from mapgen.verify.inputs import load_mapping_module
from mapgen.verify.megatron_cpu import prepare_cpu_megatron
from mapgen.verify.verdict import checkpoint_dtype

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current `checkpoint_version`


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    """This process's peak resident set: the kernel's high-water mark of its address space
    (VmHWM). Not `ru_maxrss`: a spawned process's starts at its parent's resident set, which
    the kernel carries over the fork and exec that start it."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Bar:
    """Rank 0's progress bars on stderr (rich draws them only where stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._progress.start()

    def phase(self, description: str, total: int | None = None) -> None:
        if self._progress is None:
            return
        if self._task is not None:  # each phase its own bar; a phase without a count pulses
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(description, total=total)

    def advance(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _Counted:
    """`module`, its import and export functions counted by `tick` (the progress bars)."""

    def __init__(self, module: ModuleType, tick: Callable[[], None]) -> None:
        self._module = module

        def counted(function: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                result = function(*args, **kwargs)
                tick()
                return result

            return call

        self.IMPORTS = {name: counted(f) for name, f in module.IMPORTS.items()}
        self.EXPORTS = {name: counted(f) for name, f in module.EXPORTS.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _done(result: ConvertResult, phase: str, started: float) -> None:
    """A phase's seconds, and this rank's peak resident set so far."""
    result.seconds[phase] = time.perf_counter() - started
    result.phase_peak_mib[phase] = _peak_mib()


def _cpu_dist_checkpointing() -> None:
    """megatron-core's torch_dist writer synchronises CUDA after staging tensors on the host;
    without CUDA there is nothing to wait for."""
    if not torch.cuda.is_available():
        setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


def _cast(chunks: list[Any], dtype: torch.dtype) -> None:
    """Every float parameter in `dtype`; weight buffers (the router's float32 expert_bias) stay."""
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)


def _broadcast_path(path: Path | None) -> Path:
    """Rank 0's staging folder, on every rank (a tensor broadcast of its bytes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert path is not None
        return path
    buffer = torch.zeros(4 + 4096, dtype=torch.uint8)
    if dist.get_rank() == 0:
        assert path is not None
        data = os.fsencode(path)
        buffer[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
        buffer[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    length = int.from_bytes(bytes(buffer[:4].tolist()), "little")
    return Path(os.fsdecode(bytes(buffer[4 : 4 + length].tolist())))


def _start(job: ConvertJob) -> tuple[ModuleType, Any, int]:
    from mapgen.runtime import ParallelContext
    module = load_mapping_module(job.module_path)
    if module.LAYOUT != "local":
        raise MapgenError(f"{job.module_path} has the {module.LAYOUT} layout; the model runs on CPU with the local layout (give its local twin)")
    initialize_parallel_state(job.layout)
    prepare_cpu_megatron()
    _cpu_dist_checkpointing()
    return module, ParallelContext.from_parallel_state(), dist.get_rank() if dist.is_initialized() else 0


def _hf_to_megatron(job: ConvertJob, result: ConvertResult, bar: _Bar) -> None:
    from megatron.core import dist_checkpointing

    started = time.perf_counter()
    module, ctx, rank = _start(job)
    dtype = checkpoint_dtype(HFCheckpoint(job.source))
    rows = padded_vocab_size(module.DIMS.vocab_size, job.make_vocab_size_divisible_by, job.layout.tp)
    bar.phase(f"building the model ({job.layout})")
    torch.manual_seed(0)
    chunks = build_model_chunks(module.DIMS, job.layout, params_dtype=dtype, vocab_size=rows, model=module.MODEL)
    _done(result, "build", started)
    started = time.perf_counter()
    counted: Any = _Counted(module, bar.advance) if rank == 0 else module
    converter = Converter(counted, chunks, ctx, make_vocab_size_divisible_by=job.make_vocab_size_divisible_by)
    bar.phase(f"importing {job.source}", len(converter.placement.local) + len(converter.placement.tied))
    result.params = converter.load(job.source)
    target = DTYPES[job.dtype] if job.dtype else dtype
    _cast(chunks, target)
    result.dtype, result.vocab_rows = str(target).removeprefix("torch."), rows
    _done(result, "import", started)

    started = time.perf_counter()
    out = Path(job.out)
    what = f"cannot write {module.TARGET} to {out}"
    staging: Path | None = None
    problems: list[str] = []
    if rank == 0:
        try:
            staging = staging_folder(out, job.hf_config, job.overwrite)
            (staging / iteration_folder(job.iteration)).mkdir()
            problems += _space_problems(module, staging, target, rows)
        except Exception as exc:  # noqa: BLE001 - agreed on by every rank just below
            problems.append(describe_error(exc))
    try:
        agree_or_raise(problems, what)
        folder = _broadcast_path(staging) / iteration_folder(job.iteration)
        bar.phase(f"writing the distributed checkpoint ({iteration_folder(job.iteration)})")
        state: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": job.iteration or 0}
        state["num_floating_point_operations_so_far"] = 0
        failed: list[str] = []
        try:
            state.update(sharded_state(chunks, job.key_style))
        except Exception as exc:  # noqa: BLE001 - megatron-core failing on one rank: agreed before its save
            failed.append(f"megatron-core cannot give this rank's sharded state: {first_line(exc)}")
        agree_or_raise(failed, what)
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            dist_checkpointing.save(state, str(folder), content_metadata=dict(SHARDED_METADATA))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a BaseException, raised on every rank: agreed below
            failed.append(f"writing {out}: {checkpoint_failure(exc)}{_free_space(out.parent)}")
        agree_or_raise(failed, what)
        final: list[str] = []
        if staging is not None:
            try:
                tracker = RELEASE if job.iteration is None else str(job.iteration)
                (staging / TRACKER).write_text(tracker)
                (staging / CONFIG).write_text(json.dumps(job.hf_config, indent=2) + "\n")
                record = {
                    "written_by": "mapgen convert hf-to-megatron",
                    "target": module.TARGET,
                    "hf_architecture": getattr(module, "HF_ARCHITECTURE", None),
                    "dims": dims_record(module),
                    "layout": str(job.layout),
                    "dtype": result.dtype,
                    "vocab_size": module.DIMS.vocab_size,
                    "vocab_rows": rows,
                    "make_vocab_size_divisible_by": job.make_vocab_size_divisible_by,
                    "tensor_names": job.key_style,
                    "checkpoint": iteration_folder(job.iteration),
                }
                (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
                result.tensors = len(read_megatron_checkpoint(staging).model_tensors())
                share_tree(staging)  # the checkpoint's files as the umask makes new files, for other readers
                move_into_place(staging, out, job.overwrite)
                staging = None
            except Exception as exc:  # noqa: BLE001 - agreed on below
                final.append(f"finishing {out}: {describe_error(exc)}")
        agree_or_raise(final, what)
    finally:
        if staging is not None:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    _done(result, "write", started)


def _space_problems(module: ModuleType, folder: Path, dtype: torch.dtype, vocab_rows: int) -> list[str]:
    """A filesystem that cannot hold the checkpoint's tensors (their bytes in `dtype`, the
    vocabulary padded to `vocab_rows`) is said before megatron-core writes a byte of them."""
    import shutil

    elements = 0
    for plan in module.PARAMS:
        shape = list(plan.shape)
        if plan.megatron_name in VOCAB_PARAMS and shape and shape[0] == module.DIMS.vocab_size:
            shape[0] = vocab_rows
        elements += math.prod(shape)
    needed = elements * dtype.itemsize
    free = shutil.disk_usage(folder).free
    if free >= needed:
        return []
    return [f"{folder.parent}: {free / 2**20:,.1f} MiB free on its filesystem, the checkpoint's tensors take {needed / 2**20:,.1f} MiB"]


def _free_space(folder: Path) -> str:
    """`; N MiB free on its filesystem`, said with a failed write (a full filesystem fails in
    torch's own words), or nothing."""
    import shutil

    try:
        return f"; {shutil.disk_usage(folder).free / 2**20:,.1f} MiB free on its filesystem"
    except OSError:
        return ""


def _megatron_to_hf(job: ConvertJob, result: ConvertResult, bar: _Bar) -> None:
    from megatron.core import dist_checkpointing

    started = time.perf_counter()
    module, ctx, rank = _start(job)
    checkpoint = read_megatron_checkpoint(job.source)
    rows = checkpoint.vocab_rows or module.DIMS.vocab_size
    dtype = checkpoint.dtype
    bar.phase(f"building the model ({job.layout})")
    torch.manual_seed(0)
    chunks = build_model_chunks(module.DIMS, job.layout, params_dtype=dtype, vocab_size=rows, model=module.MODEL)
    _done(result, "build", started)
    started = time.perf_counter()
    divisible_by = max(1, rows // job.layout.tp)  # the checkpoint's rows, whatever padding made them
    counted: Any = _Counted(module, bar.advance) if rank == 0 else module
    converter = Converter(counted, chunks, ctx, make_vocab_size_divisible_by=divisible_by)
    what = f"cannot load {checkpoint.root} into {module.TARGET}"
    try:
        state = sharded_state(chunks, job.key_style, set(checkpoint.tensors))
        without_objects(state)
        problems, used = model_problems(state, checkpoint)
    except Exception as exc:  # noqa: BLE001 - megatron-core failing on one rank: agreed just below
        state, used, problems = {}, set(), [f"megatron-core cannot give this rank's sharded state: {first_line(exc)}"]
    converter._agree(problems, what)  # the model against the module and the checkpoint, agreed
    unused = unused_tensors(checkpoint, used)
    if unused:  # the same list on every rank (one all_reduce): every rank raises alike
        raise RankError(
            f"{what}:\n  {checkpoint.folder}: a checkpoint of another model? {len(unused)} of its tensors have no "
            f"place in {module.TARGET}: " + ", ".join(unused[:6])
        )
    bar.phase(f"loading {checkpoint.folder}")
    from torch.distributed.checkpoint.api import CheckpointException

    failed: list[str] = []
    try:
        loaded = dist_checkpointing.load(state, str(checkpoint.folder))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's CheckpointException comes on every rank alike,
        # anything else megatron-core raises may come on one rank only: agreed below, so no rank goes on alone
        metadata = storage_metadata(checkpoint.folder)
        named = damaged_files(checkpoint.folder, metadata, contents=True) if metadata is not None else []
        failed = named or [f"{checkpoint.folder}: {checkpoint_failure(exc)}"]
    agree_or_raise(failed, what)
    left: list[str] = []
    for key, chunk in zip(state_keys(chunks), chunks):
        outcome = chunk.load_state_dict(loaded[key], strict=False)
        left += [n for n in [*outcome.missing_keys, *outcome.unexpected_keys] if not n.endswith("._extra_state")]
    # after the checks above nothing is left; said plainly, and agreed, if something is
    agree_or_raise([f"megatron-core loaded no value for {', '.join(left[:6])}"] if left else [], what)
    target = DTYPES[job.dtype] if job.dtype else dtype
    _cast(chunks, target)
    result.dtype, result.vocab_rows = str(target).removeprefix("torch."), rows
    _done(result, "load", started)
    started = time.perf_counter()
    config = dict(job.hf_config)
    if config.get("dtype", config.get("torch_dtype")) != result.dtype:  # what the files hold
        config["dtype"] = result.dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = result.dtype
    bar.phase(f"exporting to {job.out}", len(converter.placement.local))
    # the tensors named as config.json's model names them (Qwen3.5's published vision-language config: its names)
    naming = config_naming(hf_namings(module), getattr(module, "HF_ARCHITECTURE", ""), config)
    save_hf_checkpoint(
        counted, chunks, job.out, config, ctx, make_vocab_size_divisible_by=divisible_by, overwrite=job.overwrite, naming=naming
    )
    result.params = len(converter.placement.local) + len(converter.placement.tied)
    result.tensors = len(module.HF_TENSORS)
    _done(result, "export", started)


def run_convert(job: ConvertJob) -> ConvertResult:
    """One conversion in an initialised process group; every rank returns its result, rank 0's
    with every rank's peak memory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = ConvertResult(job, rank)
    import megatron.core.dist_checkpointing  # noqa: F401 - imported before the start is measured
    import megatron.core.models.gpt  # noqa: F401

    start = _rss_mib()
    bar = _Bar(job.progress and rank == 0 and sys.stderr.isatty())
    try:
        (_hf_to_megatron if job.direction == "hf-to-megatron" else _megatron_to_hf)(job, result, bar)
    except MapgenError as exc:
        result.error, result.bad_input = str(exc), True
    except Exception:  # noqa: BLE001 - reported, not raised: the parent says what failed
        result.error = traceback.format_exc()
    finally:
        bar.close()
    if result.error is None:  # every rank got here: one gather of the peaks
        mine = torch.tensor([_peak_mib(), start], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, mine)
        else:
            everyone = [mine]
        result.peak_mib = [float(t[0]) for t in everyone]
        result.start_mib = [float(t[1]) for t in everyone]
    return result
