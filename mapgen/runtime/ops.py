"""The operations generated import/export functions call: one per mapping kind and direction.

Import functions (`*_import`) take full HF tensors and return this rank's shard; they never
communicate: every rank computes its own shard from the HF tensors it loaded, so import costs no
collective at all. Export functions (`*_export`) take the shards of every rank of the group (TP,
or expert-TP for expert parameters), in rank order, and return full HF tensors; the drivers do
the gathering, bucketed, so these are pure too.
"""

from __future__ import annotations

import math

import torch
from collections.abc import Sequence

from mapgen.runtime import fileread, transforms
from mapgen.runtime.context import Group


def shard(group: Group, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's block of `tensor` along `dim` (TP-split column or row), as a view."""
    if group.size == 1:
        return tensor
    size = tensor.shape[dim]
    if size % group.size:
        raise ValueError(f"dim {dim} of size {size} does not split over {group.size} ranks")
    block = size // group.size
    return tensor.narrow(dim, group.rank * block, block)


def into(value: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`value` written into `out` (the parameter itself, so each byte is copied once), or, with
    no `out`, a tensor of its own (never a view of the input)."""
    if out is None:
        return value.clone(memory_format=torch.contiguous_format)
    if fileread.fill(out, value):
        return out
    return out.copy_(value)


def column_import(group: Group, hf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return into(shard(group, hf, 0), out)


def cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat of an export's parts; where they already lie one after another in one buffer,
    joined along dim 0 (a gather's parts of one tensor: `collectives.all_gather_coalesced`), the
    view that spans them, with no copy."""
    first = parts[0]
    if dim == 0 and all(p.is_contiguous() for p in parts):
        storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
        for part in parts:
            if part.untyped_storage().data_ptr() != storage or part.data_ptr() != end or part.dtype != first.dtype:
                break
            end += part.numel() * part.element_size()
        else:
            shape = [sum(p.shape[0] for p in parts), *first.shape[1:]]
            strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
            return first.as_strided(shape, strides, first.storage_offset())
    return torch.cat(list(parts), dim=dim)


def column_export(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else cat(parts, 0)


def row_import(group: Group, hf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return into(hf if hf.dim() == 1 else shard(group, hf, 1), out)


def row_export(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1 or parts[0].dim() == 1:
        return parts[0]
    return cat(parts, 1)


def _group_rows(group: Group, groups: int) -> tuple[int, int]:
    if groups % group.size:
        raise ValueError(f"{groups} query groups do not split over {group.size} TP ranks")
    per_rank = groups // group.size
    return group.rank * per_rank, per_rank


def qkv_import(
    group: Group,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int,
    groups: int,
    head_dim: int,
    gate: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's query groups of the merged QKV (equal to merging all, then a column split)."""
    first, count = _group_rows(group, groups)
    q_rows = heads // groups * head_dim * (2 if gate else 1)
    return transforms.qkv_merge(
        q.narrow(0, first * q_rows, count * q_rows),
        k.narrow(0, first * head_dim, count * head_dim),
        v.narrow(0, first * head_dim, count * head_dim),
        groups=count,
        head_dim=head_dim,
        gate=gate,
        out=out,
    )


def qkv_export(
    parts: Sequence[torch.Tensor],
    *,
    heads: int,
    groups: int,
    head_dim: int,
    gate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return transforms.qkv_split(
        column_export(parts), heads=heads, groups=groups, head_dim=head_dim, gate=gate
    )


def kv_import(
    group: Group,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    groups: int,
    head_dim: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    first, count = _group_rows(group, groups)
    return transforms.kv_merge(
        k.narrow(0, first * head_dim, count * head_dim),
        v.narrow(0, first * head_dim, count * head_dim),
        groups=count,
        head_dim=head_dim,
        out=out,
    )


def kv_export(
    parts: Sequence[torch.Tensor], *, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return transforms.kv_split(column_export(parts), groups=groups, head_dim=head_dim)


def concat_qkv_import(
    group: Group,
    qkv: torch.Tensor,
    *,
    heads: int,
    groups: int,
    head_dim: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    q, k, v = transforms.concat_qkv_parts(qkv, heads=heads, groups=groups, head_dim=head_dim)
    return qkv_import(group, q, k, v, heads=heads, groups=groups, head_dim=head_dim, out=out)


def concat_qkv_export(
    parts: Sequence[torch.Tensor], *, heads: int, groups: int, head_dim: int
) -> torch.Tensor:
    q, k, v = qkv_export(parts, heads=heads, groups=groups, head_dim=head_dim)
    return cat([q, k, v], 0)


def gated_mlp_import(
    group: Group, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank r holds [gate_r; up_r]: the r-th TP block of each, stacked."""
    return transforms.concat_into([shard(group, gate, 0), shard(group, up, 0)], 0, out)


def whole_import(hf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Replicated and direct parameters: every rank holds the whole tensor."""
    return into(hf, out)


def reshape_import(
    group: Group, hf: torch.Tensor, shape: tuple[int, ...], split_dim: int | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    reshaped = hf.reshape(shape)
    return into(reshaped if split_dim is None else shard(group, reshaped, split_dim), out)


def gated_mlp_export(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's [gate_r; up_r] split in halves; the gates and the ups concatenated."""
    halves = [part.chunk(2, dim=0) for part in parts]
    if len(halves) == 1:  # views: halves along dim 0 of a contiguous tensor are contiguous
        return halves[0][0], halves[0][1]
    return (
        cat([gate for gate, _ in halves], 0),
        cat([up for _, up in halves], 0),
    )


def halves(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[gate; up] -> (gate, up), as views: one fused gate_up tensor (Phi-3's gate_up_proj), or
    one expert's slice of a stacked gate_up tensor."""
    gate, up = stacked.chunk(2, dim=0)
    return gate, up


def alternate_rows(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0, 2, 4, ... and rows 1, 3, 5, ... of `fused`, as strided views: gate and up of a
    fused tensor that interleaves them (gpt-oss's gate_up_proj, once transposed)."""
    return fused[0::2], fused[1::2]


def interleaved_gated_mlp_export(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse of `alternate_rows` over the gathered [gate_r; up_r] shards: gate and up rows
    alternating, gate first."""
    gate, up = gated_mlp_export(parts)
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def fused_gated_mlp_export(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One HF tensor [gate; up] from its (expert-)TP shards: a fused gate_up tensor (Phi-3's
    gate_up_proj), or one expert's slice of a stacked gate_up tensor."""
    gate, up = gated_mlp_export(parts)
    return cat([gate, up], 0)


def named(values: Sequence[torch.Tensor], *names: str) -> dict[str, torch.Tensor]:
    """An export's HF tensors by name: `values` in the order of `names`."""
    if len(values) != len(names):
        raise ValueError(f"{len(values)} tensors for the {len(names)} HF names {', '.join(names)}")
    return dict(zip(names, values))
