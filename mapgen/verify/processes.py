"""Tasks run in fresh gloo processes on this machine: `spawn`, the worker each process runs, the failures it reports.

`mapgen verify` and `mapgen convert` start their ranks with it (where torchrun did not start
them); the tests and benchmarks run their distributed checks in it.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

from mapgen.common.console import native_stdout_silenced, quiet_libraries
from mapgen.common.errors import MapgenError

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


def spawn(tasks: list[Task], world_size: int, timeout_s: float = 1800, what: str = "verification") -> dict[int, list[Any]]:
    """Run `tasks` (module-level function, args) in order in `world_size` fresh gloo processes,
    so that many checks share one start-up; every rank's return values, by rank. A process
    that dies, or a run past `timeout_s`, raises here instead of waiting forever, naming `what`
    the processes were doing ("verification", "conversion")."""
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
                dead = [(rank, p.exitcode) for rank, p in enumerate(processes.processes) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    reason = ", ".join(map(_death, dead)) if dead else f"no result after {timeout_s:.0f} s"
                    raise MapgenError(f"the {what} processes failed: {reason}") from None
                continue
            collected[rank] = torch.load(io.BytesIO(data), weights_only=False)
        while not processes.join():
            pass
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
    return collected


def _death(rank_and_code: tuple[int, int]) -> str:
    rank, code = rank_and_code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return f"rank {rank} exited with code {code}"
