"""The few collectives conversion needs, all over plain tensors of statically known sizes.

No object collectives: shapes, dtypes and owners come from the generated plan, so no rank ever
asks another for them. Inputs are contiguous (gloo's scatter/gather send wrong bytes otherwise).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mapgen.common.errors import MapgenError
from mapgen.runtime.context import Group

_MESSAGE_BYTES = 8192


def all_gather_coalesced(group: Group, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """For each input tensor, every rank's version of it in rank order: one all_gather per call.

    All tensors must share a dtype; every rank passes tensors of the same shapes."""
    if group.size == 1 or not tensors:
        return [[t] for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(group.size)]
    dist.all_gather(gathered, flat, group=group.handle)
    sizes = [t.numel() for t in tensors]
    per_rank = [torch.split(part, sizes) for part in gathered]
    return [
        [per_rank[rank][index].view(t.shape) for rank in range(group.size)]
        for index, t in enumerate(tensors)
    ]


def broadcast_coalesced(
    group: Group,
    source: int,
    tensors: list[torch.Tensor] | None,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """`tensors` (given on group rank `source`) on every rank of the group, in one broadcast."""
    if group.size == 1:
        assert tensors is not None
        return tensors
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    if group.rank == source:
        assert tensors is not None
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    else:
        flat = torch.empty(sum(sizes), dtype=dtype)
    dist.broadcast(flat, src=dist.get_global_rank(group.handle, source), group=group.handle)
    if group.rank == source:
        assert tensors is not None
        return tensors
    return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), shapes)]


class RankError(MapgenError):
    """The same report, raised on every rank, of what any rank found wrong."""


def agree_or_raise(problems: list[str], what: str) -> None:
    """Raise on every rank if any rank has problems; the message lists each rank's.

    This is the one collective made before a conversion starts: every rank reaches it after
    checking what it can locally, so a bad input never leaves some ranks waiting on others."""
    mine = "\n  ".join(problems)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if problems:
            raise RankError(f"{what}:\n  {mine}")
        return
    data = mine.encode()[:_MESSAGE_BYTES]
    local = torch.zeros(_MESSAGE_BYTES + 4, dtype=torch.uint8)
    local[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    local[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else local[4:4]
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    reports: dict[str, list[int]] = {}
    for rank, buffer in enumerate(everyone):
        length = int.from_bytes(bytes(buffer[:4].tolist()), "little")
        if length:
            reports.setdefault(bytes(buffer[4 : 4 + length].tolist()).decode(errors="replace"), []).append(rank)
    if reports:
        lines = [
            f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}:\n  {text}"
            for text, ranks in reports.items()
        ]
        raise RankError(f"{what}:\n" + "\n".join(lines))
