"""Copying a checkpoint's bytes from its file straight into a tensor, on a few threads.

An import reads the checkpoint through memory-mapped views (`checkpoint.HFCheckpoint`). Copying
from such a view into a parameter faults every page of the mapping into the process, one fault
per few pages, on one thread: at real widths that copy runs at about half the speed of a copy
between two tensors in memory. Where the source is a contiguous run of a mapped file and the
destination a contiguous tensor of the same dtype, `fill` instead asks the kernel to copy the
file's bytes into the tensor (`os.preadv`, which releases the GIL), in chunks spread over a small
thread pool: no page of the mapping is touched.

A checkpoint registers each file it maps (`register`); anything else, and anything small, is
copied by torch as before. Reads started inside `reading()` are waited for when it ends; outside
it, `fill` waits for its own reads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from mapgen.common.errors import MapgenError

MIN_BYTES = 1 << 20  # below this a copy from the mapping is as fast as a system call
CHUNK_BYTES = 16 << 20  # one read's share: enough to keep every thread busy on one big tensor
AVAILABLE = hasattr(os, "preadv")  # not on every platform: torch copies there


class FileReadError(MapgenError, OSError):
    """A checkpoint file gave fewer bytes than its header promised while it was read."""


class _Mapped:
    """A registered mapping: the file's descriptor and where its bytes lie in memory."""

    __slots__ = ("fd", "length", "path")

    def __init__(self, fd: int, length: int, path: str) -> None:
        self.fd, self.length, self.path = fd, length, path


_MAPPED: dict[int, _Mapped] = {}  # the mapping's first address -> its file
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_BATCHES: list[list[Future[None]]] = []  # the open `reading()` blocks, innermost last


def register(address: int, length: int, fd: int, path: str) -> None:
    """Say that the `length` bytes at `address` map the whole file open as `fd` (a descriptor of
    its own, which `unregister` closes) at `path`."""
    with _LOCK:
        _MAPPED[address] = _Mapped(fd, length, path)


def unregister(address: int) -> None:
    with _LOCK:
        mapped = _MAPPED.pop(address, None)
    if mapped is not None:
        os.close(mapped.fd)


def read_threads() -> int:
    """The pool's size: the CPUs this process may run on, at most 4. Not torch's thread count,
    which training processes often set to 1: these threads wait in the kernel's copy, not in torch."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _forget_pool() -> None:
    """In a forked child: the parent's threads are not there, so the pool is made anew."""
    global _POOL
    _POOL = None
    _BATCHES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(read_threads(), thread_name_prefix="mapgen-read")
        return _POOL


def _file_of(tensor: torch.Tensor) -> tuple[_Mapped, int] | None:
    """The registered file `tensor` views and the offset of its first byte, or None."""
    if not _MAPPED or not AVAILABLE:
        return None
    storage = tensor.untyped_storage().data_ptr()
    mapped = _MAPPED.get(storage)
    if mapped is None:
        return None
    offset = tensor.data_ptr() - storage
    if offset < 0 or offset + tensor.numel() * tensor.element_size() > mapped.length:
        return None
    return mapped, offset


def file_backed(tensor: torch.Tensor) -> bool:
    """Whether `fill` may read `tensor` from its file: large enough, and viewing a registered one."""
    return tensor.numel() * tensor.element_size() >= MIN_BYTES and _file_of(tensor) is not None


def fill(out: torch.Tensor, value: torch.Tensor) -> bool:
    """Copy `value` into `out` by reading its file, where `value` is a large contiguous view of a
    registered file and `out` a contiguous tensor of its dtype and size; False (nothing done)
    otherwise, for the caller to copy it."""
    nbytes = value.numel() * value.element_size()
    if (
        nbytes < MIN_BYTES
        or out.dtype != value.dtype
        or out.numel() != value.numel()
        or not value.is_contiguous()
        or not out.is_contiguous()
        or out.device.type != "cpu"
        or out.requires_grad and torch.is_grad_enabled()
    ):
        return False
    found = _file_of(value)
    if found is None:
        return False
    _start_reads(out, *found)
    return True


def read_into(out: torch.Tensor, fd: int, offset: int, path: str = "") -> None:
    """Read `out`'s bytes (a contiguous CPU tensor) from the open file `fd` at `offset` on the
    pool, as `fill` reads: the page-cache read alone, which benchmarks time."""
    _start_reads(out, _Mapped(fd, offset + out.numel() * out.element_size(), path or f"fd {fd}"), offset)


def _start_reads(out: torch.Tensor, mapped: _Mapped, offset: int) -> None:
    """`out`'s bytes read from `mapped` at `offset`, in chunks on the pool: waited for at the end
    of the open `reading()` block, or here outside one."""
    target = out.detach().view(-1).view(torch.uint8).numpy().data
    pool = _pool()
    reads = [
        pool.submit(_read, mapped, target[start : start + CHUNK_BYTES], offset + start)
        for start in range(0, len(target), CHUNK_BYTES)
    ]
    if _BATCHES:
        _BATCHES[-1].extend(reads)
    else:
        _wait(reads)


def _read(mapped: _Mapped, target: memoryview, offset: int) -> None:
    done = 0
    while done < len(target):
        got = os.preadv(mapped.fd, [target[done:]], offset + done)
        if got <= 0:
            raise FileReadError(
                f"{mapped.path}: no bytes at offset {offset + done} ({len(target) - done} still to read): "
                "the file shrank while it was read"
            )
        done += got


def _wait(reads: list[Future[None]]) -> None:
    failures = [f.exception() for f in reads]
    for failure in failures:
        if failure is not None:
            raise failure


@contextmanager
def reading() -> Iterator[None]:
    """Let the `fill`s inside run in the background; every one has finished (or raised) when the
    block ends, also when it ends by an exception."""
    batch: list[Future[None]] = []
    _BATCHES.append(batch)
    try:
        yield
    except BaseException:
        _BATCHES.remove(batch)
        for read in batch:  # the block's own exception is the one to report
            read.exception()
        raise
    _BATCHES.remove(batch)
    _wait(batch)
