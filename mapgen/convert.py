"""`mapgen convert`: HF checkpoints to and from megatron-core distributed checkpoints.

The offline path of Megatron-LM users: `--ckpt-format torch_dist --load CKPT_DIR`. A checkpoint
here is Megatron-LM's layout, read as files by `mapgen.megatron_checkpoint`.

`common.pt` holds what Megatron-LM's `load_checkpoint` reads besides the tensors:
`checkpoint_version` 3.0, `iteration`, and the model's sharded state under `model` (or
`model0`, `model1`, ... one per virtual pipeline chunk), written by
`megatron.core.dist_checkpointing.save` from the model's own `sharded_state_dict()`. No `args`:
Megatron-LM's loader does without them (it says "could not find arguments in the checkpoint"
and takes TP and PP as 1 for its RNG decisions, which a release checkpoint skips anyway), while
a partial argument namespace would make its `check_checkpoint_args` fail on fields mapgen cannot
know (the tokenizer). A release checkpoint loads with iteration 0 and without optimizer or RNG
state, as a converted checkpoint should.

hf-to-megatron: every rank builds the megatron-core model for the layout (local layer spec, on
CPU), imports the HF checkpoint through the module (`Converter.load`), and megatron-core writes
the distributed checkpoint into a hidden folder beside CKPT_DIR that is renamed into place at
the end (the staging of `save_hf_checkpoint`): a failure leaves nothing. megatron-to-hf: the
model is built for the (any) layout, megatron-core loads and reshards the checkpoint into it,
and `save_hf_checkpoint` exports and writes the HF checkpoint.

The checkpoint's tensor names are megatron-core's: for a `te` module those of its
TransformerEngine layer spec (what Megatron-LM runs on GPUs), for a `local` module those of the
local spec. The two differ where the local spec does not map a norm to the TE name (the
pre-MLP norm of MoE layers, MLA's q/kv norms, MLA's pre-MLP norm of dense layers); the model
here is always local, so its keys are renamed to the TE ones for a `te` module
(`mapgen.compiler.inventory.to_te_layout`, the rename the compiler uses). Reading accepts either.

Everything that can be known before processes start is checked before (`preflight`): the
module, the layout against its DIMS, the HF checkpoint, the Megatron checkpoint's tracker,
folder, metadata and record, the output folder. The model against the checkpoint (every tensor
present with its global shape, every model tensor of the checkpoint used by some rank) is
checked on every rank and agreed on before megatron-core reads a byte.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.distributed as dist

from mapgen.common.console import native_stdout_silenced
from mapgen.common.files import module_label, share_tree
from mapgen.common.errors import MapgenError
from mapgen.common.layout import canonical_name
from mapgen.common.limits import MAX_SPAWNED
from mapgen.megatron_checkpoint import (
    CONFIG,
    RECORD,
    RELEASE,
    TRACKER,
    MegatronCheckpoint,
    checkpoint_failure,
    damaged_files,
    first_line,
    iteration_folder,
    read_megatron_checkpoint,
    storage_metadata,
)
from mapgen.compiler.megatron_model import DTYPES, ParallelLayout, build_model_chunks, initialize_parallel_state
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.hf_names import config_naming
from mapgen.runtime.collectives import RankError, agree_or_raise
from mapgen.runtime.checkpoint_checks import hf_namings
from mapgen.runtime.drivers import Converter
from mapgen.runtime.save import describe_error, move_into_place, save_hf_checkpoint, staging_folder
from mapgen.runtime.vocab import VOCAB_PARAMS, padded_vocab_size
from mapgen.verify.arguments import output_problems, size_problems
from mapgen.verify.jobs import checkpoint_dtype, hf_problems, layout_problems, load_mapping_module, spawn


CHECKPOINT_VERSION = 3.0  # Megatron-LM's current `checkpoint_version`
# the sharded-state metadata Megatron-LM builds for the model (without a distributed optimizer)
SHARDED_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
DIRECTIONS = ("hf-to-megatron", "megatron-to-hf")
# a decoder layer's prefix, or the MTP block's transformer layer's (whose TE names are a decoder layer's)
_LAYER_KEY = re.compile(r"^(?:decoder\.layers\.(?:\d+\.)?|mtp\.layers\.\d+\.transformer_layer\.)")
# (megatron-core 0.19 names the MTP layer's module mtp_model_layer; its keys say transformer_layer)
_LAYER_NAME = re.compile(r"^(?:decoder\.layers\.\d+\.|mtp\.layers\.\d+\.(?:transformer_layer|mtp_model_layer)\.)")


@dataclass(frozen=True)
class ConvertJob:
    """One conversion. `module_path`: a local-layout module (a `te` module's local twin);
    `key_style`: the layer spec whose tensor names the Megatron checkpoint has ("te", "local")."""

    direction: str
    module_path: str
    source: str  # the HF folder, or the Megatron checkpoint folder (CKPT_DIR)
    out: str
    layout: ParallelLayout
    hf_config: dict[str, Any] = field(default_factory=dict)  # config.json: recorded, or written
    dtype: str | None = None  # the output's dtype; None: the source's
    make_vocab_size_divisible_by: int = 1  # hf-to-megatron: Megatron-LM's padding, x TP
    iteration: int | None = None  # hf-to-megatron: None writes a release checkpoint
    overwrite: bool = False
    key_style: str = "local"
    progress: bool = True  # rank 0 draws progress bars on stderr (where it is a terminal)


@dataclass
class ConvertResult:
    job: ConvertJob
    rank: int
    error: str | None = None
    bad_input: bool = False  # error is a clear, agreed report (exit 2), not a crash
    params: int = 0  # parameters this rank converted
    tensors: int = 0  # HF tensors (megatron-to-hf) or checkpoint tensors (hf-to-megatron)
    dtype: str = ""
    vocab_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: list[float] = field(default_factory=list)  # every rank's peak resident set
    start_mib: list[float] = field(default_factory=list)  # every rank's resident set at the start
    phase_peak_mib: dict[str, float] = field(default_factory=dict)  # this rank's peak after each phase
    created: list[str] = field(default_factory=list)  # folders made above the output folder (`convert`)

    def summary(self) -> str:
        job = self.job
        name = module_label(job.module_path)
        if self.error is not None:
            return f"convert {job.direction} {name} {job.layout}: FAILED\n{self.error}"
        total = sum(self.seconds.values())
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.seconds.items())
        what = (
            f"{job.out} ({iteration_folder(job.iteration)}, torch_dist, {self.tensors} tensors, {job.key_style} names)"
            if job.direction == "hf-to-megatron"
            else f"{job.out} ({self.tensors} HF tensors)"
        )
        peaks = ", ".join(f"{p:.0f}" for p in self.peak_mib)
        above = ", ".join(f"+{p - s:.0f}" for p, s in zip(self.peak_mib, self.start_mib))
        return (
            f"convert {job.direction} {name} {job.layout}: wrote {what}, {self.dtype}, vocabulary rows "
            f"{self.vocab_rows}, in {total:.1f} s ({steps}); peak resident set per rank {peaks} MiB "
            f"({above} MiB during the conversion)"
        )


def dims_record(module: ModuleType) -> dict[str, Any]:
    """The module's DIMS as JSON gives them back."""
    value: dict[str, Any] = json.loads(json.dumps(asdict(module.DIMS)))
    return value


# --- before any process starts ---


def preflight(job: ConvertJob, world_size: int | None = None) -> list[str]:
    """What is wrong with `job` that is known before any process starts (the module is loaded
    once: a DeepSeek-V3 module is 37 MB of Python)."""
    if job.direction not in DIRECTIONS:
        return [f"direction must be one of {', '.join(DIRECTIONS)}, not {job.direction!r}"]
    module = load_mapping_module(job.module_path)
    if getattr(module, "MODEL", "gpt") not in ("gpt", "mamba"):
        return [
            f"{module.TARGET} maps megatron-core's {module.MODEL} model; mapgen convert writes and reads GPTModel "
            "checkpoints (and Nemotron-H's Mamba model)"
        ]
    if job.dtype is not None and job.dtype not in DTYPES:
        return [f"--dtype must be one of {', '.join(DTYPES)}, not {job.dtype!r}"]
    found = output_problems(Path(job.out), job.overwrite, Path(job.source))  # also the CLI's, before torch
    found += [f"layout {job.layout}: {problem}" for problem in layout_problems(module, job.layout)]
    dims = module.DIMS
    if job.layout.pp > 1 and dims.share_embeddings_and_output_weights and dims.mtp_num_layers:
        found.append(
            f"layout {job.layout}: {module.TARGET} ties its embeddings to its output layer and has an MTP layer; "
            "megatron-core's GPTModel cannot checkpoint such a model at PP > 1 (its last stage holds an output "
            "weight that its sharded_state_dict asserts is absent, in 0.16 and 0.19 alike): convert at --pp 1"
        )
    if world_size is not None and world_size != job.layout.world_size:
        found.append(f"layout {job.layout} needs tp x pp x dp = {job.layout.world_size} processes, torchrun started {world_size}")
    elif world_size is None and job.layout.world_size > MAX_SPAWNED:
        found.append(f"layout {job.layout} needs {job.layout.world_size} processes; mapgen convert starts at most {MAX_SPAWNED} (use torchrun)")
    if job.direction == "hf-to-megatron":
        found += size_problems({"make_vocab_size_divisible_by": job.make_vocab_size_divisible_by})
        if job.iteration is not None and job.iteration < 0:
            found.append(f"--iteration must be 0 or more, not {job.iteration}")
        return found + hf_problems(module, Path(job.source))
    try:
        checkpoint = read_megatron_checkpoint(job.source)
    except MapgenError as exc:
        return found + [str(exc)]
    return found + checkpoint_problems(module, checkpoint, job.layout)


def checkpoint_problems(module: ModuleType, checkpoint: MegatronCheckpoint, layout: ParallelLayout) -> list[str]:
    """The Megatron checkpoint against the module, from its files: mapgen's record of the model
    it was written for, its vocabulary rows against the HF vocabulary and TP."""
    found: list[str] = []
    where = checkpoint.root
    if checkpoint.record is not None:
        theirs, ours = checkpoint.record.get("dims"), dims_record(module)
        if isinstance(theirs, dict) and theirs != ours:
            differ = [f"{k} {theirs.get(k)!r} (module: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
            found.append(
                f"{where}: a checkpoint of another model: written for {checkpoint.record.get('target')}, whose dims "
                f"differ from {module.TARGET}'s: " + "; ".join(differ[:8])
            )
    if not checkpoint.model_tensors():
        found.append(f"{checkpoint.folder}: holds no model tensors (embedding.*, decoder.*, output_layer.*)")
    rows = checkpoint.vocab_rows
    vocab = module.DIMS.vocab_size
    if rows is not None and rows < vocab:
        found.append(
            f"{where}: a checkpoint of another model: its vocabulary has {rows} rows, fewer than the {vocab} of {module.TARGET}"
        )
    elif rows is not None and rows % layout.tp:
        found.append(f"layout {layout}: --tp {layout.tp} does not divide the checkpoint's {rows} vocabulary rows")
    hidden = checkpoint.tensors.get("embedding.word_embeddings.weight", ((0, module.DIMS.hidden_size), None))[0]
    if len(hidden) == 2 and hidden[1] != module.DIMS.hidden_size:
        found.append(
            f"{where}: a checkpoint of another model: hidden size {hidden[1]} "
            f"(embedding.word_embeddings.weight), {module.TARGET} has {module.DIMS.hidden_size}"
        )
    return found


# --- in every rank ---


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


def _state_keys(chunks: list[Any]) -> list[str]:
    """Megatron-LM's keys of the model chunks in its checkpoints: `model`, or `model0`, ..."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _leaves(state: Any) -> list[tuple[str, Any]]:
    """(state-dict name, sharded entry) of a chunk's sharded state dict, nested dicts flattened."""
    found: list[tuple[str, Any]] = []
    for name, value in state.items():
        if isinstance(value, dict):
            found += [(f"{name}.{n}", v) for n, v in _leaves(value)]
        elif hasattr(value, "key"):
            found.append((name, value))
    return found


def _te_key(name: str, key: str, te_names: dict[str, str]) -> str:
    """The checkpoint key megatron-core's TransformerEngine spec gives the parameter that the
    local spec names `name` and keys `key`: the same layer prefix (with or without the layer
    index, as megatron-core wrote it), the TE parameter's name within its layer."""
    te_name = canonical_name(te_names.get(name, name))  # 0.19's Mamba conv1d_weight keys as conv1d.weight
    prefix = _LAYER_KEY.match(key)
    if prefix is None or _LAYER_NAME.match(te_name) is None or ".local_experts." in name:
        return key  # outside the decoder layers, and experts (TEGroupedMLP keys as SequentialMLP)
    return prefix.group(0) + _LAYER_NAME.sub("", te_name, count=1)


def _te_names(names: list[str]) -> dict[str, str]:
    from mapgen.compiler.inventory import MegatronParam, to_te_layout

    params = tuple(MegatronParam(n, (), "", "", None, None) for n in names)
    return {p.name: t.name for p, t in zip(params, to_te_layout(params))}


def sharded_state(chunks: list[Any], key_style: str, available: set[str] | None = None) -> dict[str, Any]:
    """Megatron-LM's model part of a checkpoint: each chunk's `sharded_state_dict()` under its
    key. With `key_style` "te", decoder-layer tensors carry the TE spec's keys. When reading
    (`available`: the checkpoint's keys), each tensor takes whichever of its local and TE keys
    the checkpoint has."""
    state: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        sharded = chunk.sharded_state_dict(metadata=dict(SHARDED_METADATA))
        leaves = _leaves(sharded)
        te_names = _te_names([name for name, _ in leaves])
        for name, entry in leaves:
            te_key = _te_key(name, entry.key, te_names)
            if te_key == entry.key:
                continue
            if available is None:
                if key_style == "te":
                    entry.key = te_key
            elif entry.key not in available and te_key in available:
                entry.key = te_key
        state[_state_keys(chunks)[index]] = sharded
    return state


def _without_objects(state: dict[str, Any]) -> None:
    """Drop the chunks' sharded objects (the linear layers' `_extra_state`): the local layers
    hold nothing in them, and a checkpoint of TransformerEngine layers has its own."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    for chunk in state.values():
        for name in [n for n, v in chunk.items() if isinstance(v, ShardedObject)]:
            del chunk[name]


def _model_problems(state: dict[str, Any], checkpoint: MegatronCheckpoint) -> tuple[list[str], set[str]]:
    """This rank's sharded tensors against the checkpoint: (problems, the keys it reads)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    missing: list[str] = []
    shapes: list[str] = []
    used: set[str] = set()
    for chunk in state.values():
        for _, entry in _leaves(chunk):
            built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry
            for tensor in built if isinstance(built, (list, tuple)) else [built]:
                if not isinstance(tensor, ShardedTensor):
                    continue
                stored = checkpoint.tensors.get(tensor.key)
                if stored is None:
                    missing.append(tensor.key)
                elif stored[0] != tuple(tensor.global_shape):
                    shapes.append(f"{tensor.key} is {list(stored[0])} in the checkpoint, {list(tensor.global_shape)} in the model")
                else:
                    used.add(tensor.key)
    problems = []
    if missing:
        unique = sorted(set(missing))
        problems.append(
            f"{checkpoint.folder}: a checkpoint of another model? it lacks {len(unique)} tensor(s) the model has: "
            + ", ".join(unique[:6])
        )
    if shapes:
        problems.append(f"{checkpoint.folder}: a checkpoint of another model? {len(set(shapes))} tensor(s) differ: " + "; ".join(sorted(set(shapes))[:6]))
    return problems, used


def _unused_tensors(checkpoint: MegatronCheckpoint, used: set[str]) -> list[str]:
    """The checkpoint's model tensors that no rank reads: one all_reduce of a flag per tensor
    (every rank has the same sorted list of the checkpoint's keys)."""
    keys = checkpoint.model_tensors()
    flags = torch.tensor([key in used for key in keys], dtype=torch.uint8)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [key for key, flag in zip(keys, flags.tolist()) if not flag]


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
    from mapgen.verify.testing import prepare_cpu_megatron

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
        _without_objects(state)
        problems, used = _model_problems(state, checkpoint)
    except Exception as exc:  # noqa: BLE001 - megatron-core failing on one rank: agreed just below
        state, used, problems = {}, set(), [f"megatron-core cannot give this rank's sharded state: {first_line(exc)}"]
    converter._agree(problems, what)  # the model against the module and the checkpoint, agreed
    unused = _unused_tensors(checkpoint, used)
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
    for key, chunk in zip(_state_keys(chunks), chunks):
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


def convert(job: ConvertJob) -> ConvertResult:
    """Run `job` on the layout's processes: started here (gloo on CPU), or the ones torchrun
    started. Raises MapgenError for what `preflight` finds, before any process starts; returns
    rank 0's result (this rank's under torchrun). Missing folders above the output folder are
    created (by rank 0), and removed again when the conversion fails."""
    from mapgen.compiler.write import make_folders

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if problems := preflight(job, int(os.environ["WORLD_SIZE"]) if torchrun else None):
        raise MapgenError(f"cannot convert {job.source} with {job.module_path}:\n  " + "\n  ".join(problems))
    created = make_folders(Path(job.out).parent) if os.environ.get("RANK", "0") == "0" else []
    result: ConvertResult | None = None
    try:
        if torchrun:
            if not dist.is_initialized():
                with native_stdout_silenced():
                    dist.init_process_group("gloo")
            result = run_convert(job)
        else:
            result = spawn([(run_convert, (job,))], job.layout.world_size, what="conversion")[0][0]
        result.created = [str(folder) for folder in created]
    finally:
        if result is None or result.error is not None:
            for folder in reversed(created):  # innermost first; a folder someone filled since stays
                try:
                    folder.rmdir()
                except OSError:
                    break
    return result
