"""The few collectives conversion needs, all over plain tensors of statically known sizes.

No object collectives: shapes, dtypes and owners come from the generated plan, so no rank ever
asks another for them. Inputs are contiguous (gloo's scatter/gather send wrong bytes otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from mapgen.common.errors import MapgenError
from mapgen.runtime.context import Group

_MESSAGE_BYTES = 8192
_RELEASE_WAIT_S = 1.0


def _use_count(tensor: torch.Tensor) -> int:
    """How many tensors reference `tensor`'s storage (torch's own count; 0 if unavailable)."""
    counter: Any = getattr(torch._C, "_storage_Use_Count", None)
    return int(counter(tensor.untyped_storage()._cdata)) if counter is not None else 0


class _Released:
    """Waits, after a collective on a gloo group, until gloo's worker thread has dropped its
    references to the collective's tensors. The call returns once the work is marked done, and
    the thread lets go of the work (and the tensors it holds) a moment later (about 60 us, longer
    on a busy machine); a buffer freed in between would stay allocated until then, beside the
    next bucket's. Bounded: at most a second, then it goes on."""

    def __init__(self, group: Group, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors if group.size > 1 and dist.get_backend(group.handle) == "gloo" else []
        self.counts = [_use_count(t) for t in self.tensors]

    def wait(self) -> None:
        deadline = time.monotonic() + _RELEASE_WAIT_S
        while any(_use_count(t) > c for t, c in zip(self.tensors, self.counts)) and time.monotonic() < deadline:
            time.sleep(0)


_GLOO_PIECE_BYTES = 4 << 20


def _pieces(group: Group, numel: int, itemsize: int) -> list[tuple[int, int]]:
    """(offset, length) in elements of the pieces one rank's part of a gather travels in: whole,
    except over gloo, where a gather of each rank's 4 MiB at a time moves more per second than
    one of tens of MiB (its copies stay in the cache: 1.2 GB a rank gathered in 1.13-1.27 s as
    4.7 MB gathers, 1.56-1.86 s as 14 MB ones, two processes here)."""
    if numel == 0 or dist.get_backend(group.handle) != "gloo":
        return [(0, numel)]
    step = max(1, _GLOO_PIECE_BYTES // itemsize)
    return [(offset, min(step, numel - offset)) for offset in range(0, numel, step)]


def all_gather_coalesced(group: Group, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """For each input tensor, every rank's version of it in rank order: one all_gather per call.

    All tensors must share a dtype; every rank passes tensors of the same shapes. The ranks'
    parts lie one after another in one buffer, so that a single tensor's parts, rank by rank,
    are adjacent there: joined along dim 0 they need no copy (`ops.cat`). A single contiguous
    tensor is sent as it is, not packed first."""
    if group.size == 1 or not tensors:
        return [[t] for t in tensors]
    if len(tensors) == 1 and tensors[0].is_contiguous():
        flat = tensors[0].view(-1)
    else:
        flat = torch.cat([t.reshape(-1) for t in tensors])
    whole = flat.new_empty(group.size * flat.numel())
    gathered = list(whole.chunk(group.size))
    released = _Released(group, [flat, whole])
    for offset, length in _pieces(group, flat.numel(), flat.element_size()):
        pieces = [part.narrow(0, offset, length) for part in gathered]
        dist.all_gather(pieces, flat.narrow(0, offset, length), group=group.handle)
    del pieces
    released.wait()
    del flat, whole, released
    sizes = [t.numel() for t in tensors]
    per_rank = [torch.split(part, sizes) for part in gathered]
    return [
        [per_rank[rank][index].view(t.shape) for rank in range(group.size)]
        for index, t in enumerate(tensors)
    ]


def all_gather_slots(group: Group, flat: torch.Tensor, start: int, slot: int) -> None:
    """Fill `flat[start + r * slot : start + (r + 1) * slot]` on every rank r of the group with
    rank r's own values there, in one all_gather and in place (each rank's slot is its input and
    the slots are the outputs: no copy of the input is made)."""
    if group.size == 1 or slot == 0:
        return
    released = _Released(group, [flat])
    for offset, length in _pieces(group, slot, flat.element_size()):
        slots = [flat.narrow(0, start + rank * slot + offset, length) for rank in range(group.size)]
        dist.all_gather(slots, slots[group.rank], group=group.handle)
    del slots
    released.wait()


def broadcast_flat(group: Group, source: int, flat: torch.Tensor) -> None:
    """`flat` of group rank `source` into `flat` of every rank of the group, in place."""
    if group.size > 1:
        released = _Released(group, [flat])
        dist.broadcast(flat, src=dist.get_global_rank(group.handle, source), group=group.handle)
        released.wait()


class RankError(MapgenError):
    """The same report, raised on every rank, of what any rank found wrong."""


_ARGUMENT_CHARS = 200  # of each argument's repr, compared and quoted


def agree_or_raise(problems: list[str], what: str, same: Sequence[tuple[str, object]] = ()) -> None:
    """Raise on every rank if any rank has problems; the message lists each rank's.

    This is the one collective made before a conversion starts: every rank reaches it after
    checking what it can locally, so a bad input never leaves some ranks waiting on others.
    `same`: (name, value) of the arguments that shape the collectives to come, which every rank
    must pass alike (compared by their repr): one that differs is a problem naming it and the
    value on each rank."""
    mine = "\n  ".join(problems)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if problems:
            raise RankError(f"{what}:\n  {mine}")
        return
    arguments = "\x1f".join(f"{name}\x1e{repr(value)[:_ARGUMENT_CHARS]}" for name, value in same).encode()
    data = mine.encode()[: _MESSAGE_BYTES - len(arguments)]
    # the problems' length and text, then the arguments' length and text
    message = bytearray(len(data).to_bytes(4, "little") + data + len(arguments).to_bytes(4, "little") + arguments)
    message.extend(bytes(_MESSAGE_BYTES + 8 - len(message)))
    local = torch.frombuffer(message, dtype=torch.uint8)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    reports: dict[str, list[int]] = {}
    given: dict[str, dict[str, list[int]]] = {}  # argument -> its repr -> the ranks passing it
    for rank, buffer in enumerate(everyone):
        raw = buffer.numpy().tobytes()
        length = int.from_bytes(raw[:4], "little")
        if length:
            reports.setdefault(raw[4 : 4 + length].decode(errors="replace"), []).append(rank)
        start = 8 + length
        passed = raw[start : start + int.from_bytes(raw[start - 4 : start], "little")].decode(errors="replace")
        for pair in passed.split("\x1f") if passed else ():
            name, _, value = pair.partition("\x1e")
            given.setdefault(name, {}).setdefault(value, []).append(rank)
    for name, values in given.items():
        if len(values) > 1:
            where = "; ".join(f"{value} on rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}" for value, r in values.items())
            reports.setdefault(f"{name} differs across ranks ({where}): every rank must pass the same", []).extend(
                range(dist.get_world_size())
            )
    if reports:
        lines = [
            f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}:\n  {text}"
            for text, ranks in reports.items()
        ]
        raise RankError(f"{what}:\n" + "\n".join(lines))
