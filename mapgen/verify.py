"""`mapgen verify`: a generated module against transformers and the checkpoint's own bytes.

Runs tp x pp x dp processes on CPU over gloo (or the processes torchrun started), builds the
megatron-core model for the module's dims (local layout), imports the HF checkpoint through the
module, runs a pipeline forward pass and compares the logits with transformers' forward of the
same checkpoint, then exports back and compares every tensor bit for bit with the original files.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

from mapgen.console import native_stdout_silenced, quiet_libraries
from mapgen.errors import MapgenError
from mapgen.megatron_model import (
    ParallelLayout,
    build_model_chunks,
    initialize_parallel_state,
)

INPUT_SHAPE = (2, 7)  # batch, sequence


@dataclass(frozen=True)
class Job:
    """One verification: a module file (local layout), an HF folder, a layout."""

    module_path: str
    hf_dir: str
    layout: ParallelLayout


@dataclass
class Result:
    job: Job
    rank: int
    error: str | None = None
    tensors: int = 0
    bit_exact: int = 0
    mismatched: list[str] = field(default_factory=list)
    max_logit_diff: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.error is None and self.tensors > 0 and self.bit_exact == self.tensors and self.max_logit_diff <= 1e-5

    def summary(self) -> str:
        name = Path(self.job.module_path).stem
        if self.error is not None:
            return f"verify {name} {self.job.layout}: FAILED\n{self.error}"
        verdict = "OK" if self.ok else "FAILED"
        line = (
            f"verify {name} {self.job.layout}: {self.tensors} tensors checked, "
            f"{self.bit_exact} bit-exact, max logit diff {self.max_logit_diff:.3g}: {verdict}"
        )
        if self.mismatched:
            line += "\n  differ: " + ", ".join(self.mismatched)
        return line


def pipeline_logits(chunks: list[Any], input_ids: torch.Tensor, ctx: Any, hidden_size: int) -> torch.Tensor | None:
    """Forward of one micro-batch through every (virtual) pipeline stage, by hand: megatron-core's
    schedules assume CUDA. Returns the logits on the rank that runs the last stage."""
    batch, seq = input_ids.shape
    positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    logits = None
    pp = ctx.pp
    dtype = next(chunks[0].parameters()).dtype
    with torch.no_grad():
        for vp_stage, chunk in enumerate(chunks):
            for stage in range(pp.size):
                if stage != pp.rank:
                    continue
                first = vp_stage == 0 and stage == 0
                last = vp_stage == len(chunks) - 1 and stage == pp.size - 1
                if not first:
                    received = torch.empty(seq, batch, hidden_size, dtype=dtype)
                    source = (stage - 1) % pp.size
                    dist.recv(received, src=dist.get_global_rank(pp.handle, source))
                    chunk.set_input_tensor(received)
                output = chunk(input_ids, positions, attention_mask=mask)
                if last:
                    logits = output
                else:
                    target = (stage + 1) % pp.size
                    dist.send(output.contiguous(), dst=dist.get_global_rank(pp.handle, target))
    return logits


def _load_module(path: str) -> ModuleType:
    from mapgen.testing import import_module_from_path

    return import_module_from_path(Path(path), f"mapgen_verify_{Path(path).stem}")


def run_job(job: Job) -> Result:
    """One verification in an initialised process group; every rank returns its Result."""
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.checkpoint import HFCheckpoint
    from mapgen.runtime.drivers import export_hf_tensors, load_hf_checkpoint
    from mapgen.testing import hf_logits, prepare_cpu_megatron

    rank = dist.get_rank()
    result = Result(job, rank)
    try:
        module = _load_module(job.module_path)
        if module.LAYOUT != "local":
            raise MapgenError(f"{job.module_path} has the {module.LAYOUT} layout; verify runs local-layout modules")
        initialize_parallel_state(job.layout)
        prepare_cpu_megatron()
        ctx = ParallelContext.from_parallel_state()
        torch.manual_seed(0)
        chunks = build_model_chunks(module.DIMS, job.layout, params_dtype=torch.float32, model=module.MODEL)
        load_hf_checkpoint(module, chunks, job.hf_dir, ctx)
        input_ids = torch.randint(0, module.DIMS.vocab_size, INPUT_SHAPE, generator=torch.Generator().manual_seed(7))
        logits = pipeline_logits(chunks, input_ids, ctx, module.DIMS.hidden_size)
        diff = torch.tensor([0.0])
        if logits is not None:  # only the last stage has them: whatever happens here, every
            try:  # rank must still reach the all_reduce below, or the others wait forever
                import transformers

                auto: Any = transformers.AutoModelForCausalLM
                reference = auto.from_pretrained(job.hf_dir, dtype=torch.float32).eval()
                diff[0] = (logits.float() - hf_logits(reference, input_ids)).abs().max()
            except Exception:  # noqa: BLE001 - reported below, after the collective
                result.error = traceback.format_exc()
                diff[0] = float("inf")
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        result.max_logit_diff = float(diff[0])
        original = HFCheckpoint(job.hf_dir)
        for name, tensor in export_hf_tensors(module, chunks, ctx):
            result.tensors += 1
            expected = original.get(name)
            if tensor.dtype == expected.dtype and torch.equal(tensor, expected):
                result.bit_exact += 1
            else:
                result.mismatched.append(name)
        missing = set(original.names()) - {t.name for t in module.HF_TENSORS}
        result.mismatched += sorted(f"{name} (in the checkpoint, never exported)" for name in missing)
    except MapgenError as exc:
        result.error = str(exc)
    except Exception:  # noqa: BLE001 - a verifier reports, it does not crash
        result.error = traceback.format_exc()
    return result


Task = tuple[Callable[..., Any], tuple[Any, ...]]


def _worker(rank: int, world_size: int, port: int, tasks: list[Task], queue: Any, timeout_s: float) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(timeout_s, exit=False)  # a hang shows where it waits
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    quiet_libraries()
    torch.set_num_threads(1)
    with native_stdout_silenced():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = []
    for function, args in tasks:
        try:
            results.append(function(*args))
        except Exception:  # noqa: BLE001 - reported to the parent, which fails loudly
            results.append(TaskFailed(traceback.format_exc()))
    buffer = io.BytesIO()
    torch.save(results, buffer)
    queue.put((rank, buffer.getvalue()))
    dist.barrier()
    dist.destroy_process_group()


@dataclass(frozen=True)
class TaskFailed:
    """A task that raised in a spawned process: its traceback."""

    traceback: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(tasks: list[Task], world_size: int, timeout_s: float = 1800) -> dict[int, list[Any]]:
    """Run `tasks` (module-level function, args) in order in `world_size` fresh gloo processes,
    so that many checks share one start-up; every rank's return values, by rank. A process
    that dies, or a run past `timeout_s`, raises here instead of waiting forever."""
    import queue as queue_module
    import time

    context = mp.get_context("spawn")
    results_queue = context.Queue()
    processes = start_processes(  # type: ignore[no-untyped-call]
        _worker,
        args=(world_size, _free_port(), tasks, results_queue, max(timeout_s - 30, 1)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    collected: dict[int, list[Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, data = results_queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p.exitcode for p in processes.processes if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    reason = f"exit codes {dead}" if dead else f"no result after {timeout_s:.0f} s"
                    raise MapgenError(f"spawned verification processes failed: {reason}") from None
                continue
            collected[rank] = torch.load(io.BytesIO(data), weights_only=False)
        while not processes.join():
            pass
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
    return collected


def verify(jobs: list[Job], world_size: int) -> list[Result]:
    """Rank 0's result of each job (all ranks agree on errors; rank 0 compares the tensors)."""
    for job in jobs:
        if problems := job.layout.problems():
            raise MapgenError(f"layout {job.layout}: " + "; ".join(problems))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        if not dist.is_initialized():
            with native_stdout_silenced():
                dist.init_process_group("gloo")
        return [run_job(job) for job in jobs]
    return list(spawn([(run_job, (job,)) for job in jobs], world_size)[0])
