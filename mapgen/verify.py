"""`mapgen verify`: a generated module against transformers and the checkpoint's own bytes.

Runs tp x pp x dp processes on CPU over gloo (or the processes torchrun started), builds the
megatron-core model for the module's dims (local layout), imports the HF checkpoint through the
module, runs a pipeline forward pass and compares the logits with transformers' forward of the
same checkpoint, then exports back and compares every tensor bit for bit with the original files.
Both models run in the checkpoint's dtype; with Megatron-LM's vocabulary padding the model has
the padded vocabulary, and the logits are compared on the HF one.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections import Counter
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
from mapgen.runtime.checkpoint import DTYPES, HFCheckpoint

INPUT_SHAPE = (2, 7)  # batch, sequence
FLOAT32_TOLERANCE = 1e-5  # max abs logit difference in float32 (measured: 1.5e-7 to 2.4e-7)
HALF_EPSILONS = 16  # in bfloat16 or float16: this many epsilons of the largest logit (logit_tolerance)
_FLOATS = ("F32", "BF16", "F16")  # safetensors spellings a model's dtype can be taken from


@dataclass(frozen=True)
class Job:
    """One verification: a module file (local layout), an HF folder, a layout."""

    module_path: str
    hf_dir: str
    layout: ParallelLayout
    make_vocab_size_divisible_by: int = 1  # Megatron-LM's vocabulary padding, x TP


@dataclass
class Result:
    job: Job
    rank: int
    error: str | None = None
    tensors: int = 0
    bit_exact: int = 0
    mismatched: list[str] = field(default_factory=list)
    max_logit_diff: float = float("nan")
    dtype: str = "float32"
    tolerance: float = FLOAT32_TOLERANCE
    vocab: tuple[int, int] = (0, 0)  # HF vocabulary, the model's padded one
    max_pad_logit: float = 0.0  # largest |logit| of a pad row: zero rows give exactly 0

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.tensors > 0
            and self.bit_exact == self.tensors
            and self.max_logit_diff <= self.tolerance
            and self.max_pad_logit == 0.0
        )

    def summary(self) -> str:
        name = Path(self.job.module_path).stem
        if self.error is not None:
            return f"verify {name} {self.job.layout}: FAILED\n{self.error}"
        verdict = "OK" if self.ok else "FAILED"
        vocab, padded = self.vocab
        padding = f", vocab {vocab} padded to {padded} (pad logits max {self.max_pad_logit:.3g})" if padded > vocab else ""
        line = (
            f"verify {name} {self.job.layout}: {self.tensors} tensors checked, "
            f"{self.bit_exact} bit-exact, {self.dtype}{padding}, max logit diff "
            f"{self.max_logit_diff:.3g} (tolerance {self.tolerance:.3g}): {verdict}"
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
    from mapgen.runtime.drivers import Converter
    from mapgen.runtime.vocab import padded_vocab_size
    from mapgen.testing import hf_logits, prepare_cpu_megatron

    rank = dist.get_rank()
    result = Result(job, rank)
    try:
        module = _load_module(job.module_path)
        if module.LAYOUT != "local":
            raise MapgenError(f"{job.module_path} has the {module.LAYOUT} layout; verify runs local-layout modules")
        original = HFCheckpoint(job.hf_dir)
        dtype = checkpoint_dtype(original)
        vocab = module.DIMS.vocab_size
        padded = padded_vocab_size(vocab, job.make_vocab_size_divisible_by, job.layout.tp)
        result.dtype, result.vocab = str(dtype).removeprefix("torch."), (vocab, padded)
        initialize_parallel_state(job.layout)
        prepare_cpu_megatron()
        ctx = ParallelContext.from_parallel_state()
        torch.manual_seed(0)
        chunks = build_model_chunks(module.DIMS, job.layout, params_dtype=dtype, vocab_size=padded, model=module.MODEL)
        converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=job.make_vocab_size_divisible_by)
        converter.load(job.hf_dir)
        input_ids = torch.randint(0, vocab, INPUT_SHAPE, generator=torch.Generator().manual_seed(7))
        logits = pipeline_logits(chunks, input_ids, ctx, module.DIMS.hidden_size)
        found = torch.zeros(3)  # max logit diff, max |pad logit|, tolerance
        if logits is not None:  # only the last stage has them: whatever happens here, every
            try:  # rank must still reach the all_reduce below, or the others wait forever
                import transformers

                auto: Any = transformers.AutoModelForCausalLM
                reference = auto.from_pretrained(job.hf_dir, dtype=dtype).eval()
                expected = hf_logits(reference, input_ids).float()
                found[0] = (logits[..., :vocab].float() - expected).abs().max()  # pad logits dropped
                found[1] = logits[..., vocab:].float().abs().max() if padded > vocab else 0.0
                found[2] = logit_tolerance(dtype, expected)
            except Exception:  # noqa: BLE001 - reported below, after the collective
                result.error = traceback.format_exc()
                found[0] = float("inf")
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        result.max_logit_diff, result.max_pad_logit, result.tolerance = map(float, found)
        for name, tensor in converter.export():
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


def checkpoint_dtype(checkpoint: HFCheckpoint) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: the most common among its float tensors
    that are not FP8-quantized (a float32 router bias in a bf16 checkpoint does not count)."""
    stored = Counter(
        checkpoint.dtype(n) for n in checkpoint.names() if not checkpoint.quantized(n) and checkpoint.dtype(n) in _FLOATS
    )
    if not stored:
        raise MapgenError(f"{checkpoint.folder}: no float32, bfloat16 or float16 tensor to take the model's dtype from")
    return DTYPES[stored.most_common(1)[0][0]]


def logit_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """How far megatron-core's logits may be from transformers' `reference` logits, both computed
    in `dtype` on the same weights: FLOAT32_TOLERANCE in float32; in a 16-bit dtype,
    HALF_EPSILONS of its epsilons (bfloat16: 2**-7) times the largest reference logit.

    Each forward rounds every matmul, norm and residual sum to the dtype, in its own order, so
    each ends a few epsilons of the logit scale from the exact result. Measured on the bf16
    stand-ins against transformers in float32 on the same weights: megatron-core 0.7 to 1.4 and
    transformers 0.6 to 1.3 epsilons (Llama, Qwen3-MoE); up to 6.3 between the two for Mixtral,
    whose top-2 routing can break a near tie differently. A misplaced shard moves them by far
    more (a wrong column order of one o_proj: about 140); subtler mistakes that bf16 noise hides
    are what the float32 check is for."""
    if dtype == torch.float32:
        return FLOAT32_TOLERANCE
    return float(HALF_EPSILONS * torch.finfo(dtype).eps * reference.abs().max())


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
    processes = start_processes(  # type: ignore[no-untyped-call, unused-ignore]  # untyped in some torch releases
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
