"""Pure tensor transforms between HF and Megatron layouts. None of them modifies its inputs.

Notation: nh query heads, ng query groups (KV heads), d head dim, hpg = nh // ng heads per
group. Megatron's fused `linear_qkv` holds, per query group g, the rows
`[q heads of g (hpg*d), k_g (d), v_g (d)]`; with an attention output gate, HF's q_proj holds
`[q_h; gate_h]` per head and Megatron's group is `[q heads, gate heads, k_g, v_g]`.
Every function works on weights `[rows, in]` and 1-D biases `[rows]` alike.
"""

from __future__ import annotations

import torch

from mapgen.common.layout import inverse_permutation
from mapgen.runtime import fileread

__all__ = ["inverse_permutation"]  # plus every function below


def concat_into(parts: list[torch.Tensor], dim: int, out: torch.Tensor | None) -> torch.Tensor:
    """torch.cat, written straight into `out` (of the same dtype) when given."""
    if out is None:
        return torch.cat(parts, dim=dim)
    if out.dtype == parts[0].dtype and out.is_contiguous():
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        whole = out.view(shape)
        if not _filled(parts, dim, whole):
            torch.cat(parts, dim=dim, out=whole)
        return out
    return out.copy_(torch.cat(parts, dim=dim).view(out.shape))


def _filled(parts: list[torch.Tensor], dim: int, whole: torch.Tensor) -> bool:
    """`torch.cat(parts, dim, out=whole)` done block by block, where a part views a checkpoint
    file: each block that is a contiguous run of the file is read straight into `whole`
    (`fileread.fill`). False, with nothing written, where no part is such a view."""
    if not any(fileread.file_backed(p) for p in parts):
        return False
    place = 0
    for part in parts:
        width = part.shape[dim]
        target = whole.narrow(dim, place, width)
        if dim:  # one block per leading index: contiguous in `whole`, and in a contiguous part
            blocks = zip(target.flatten(0, dim - 1).unbind(0), part.flatten(0, dim - 1).unbind(0))
        else:
            blocks = zip([target], [part])
        for block_out, block_in in blocks:
            if not fileread.fill(block_out, block_in):
                block_out.copy_(block_in)
        place += width
    return True


def qkv_merge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    groups: int,
    head_dim: int,
    gate: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Separate HF q, k, v (rows for `groups` whole query groups) -> Megatron group-major rows."""
    tail = q.shape[1:]
    if gate:
        per_head = q.reshape(-1, 2, head_dim, *tail)
        query = per_head[:, 0].reshape(groups, -1, *tail)
        gates = per_head[:, 1].reshape(groups, -1, *tail)
        parts = [query, gates]
    else:
        parts = [q.reshape(groups, -1, *tail)]
    parts += [k.reshape(groups, head_dim, *tail), v.reshape(groups, head_dim, *tail)]
    return concat_into(parts, 1, out).reshape(-1, *tail)


def qkv_split(
    qkv: torch.Tensor, *, heads: int, groups: int, head_dim: int, gate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `qkv_merge`: Megatron rows -> HF (q, k, v)."""
    tail = qkv.shape[1:]
    q_rows = heads // groups * head_dim
    per_group = qkv.reshape(groups, -1, *tail)
    q_width = 2 * q_rows if gate else q_rows
    query = per_group[:, :q_rows]
    k = per_group[:, q_width : q_width + head_dim].reshape(-1, *tail)
    v = per_group[:, q_width + head_dim :].reshape(-1, *tail)
    if gate:
        gates = per_group[:, q_rows:q_width]
        query = torch.stack(
            [query.reshape(heads, head_dim, *tail), gates.reshape(heads, head_dim, *tail)], dim=1
        )
    return query.reshape(-1, *tail).contiguous(), k.contiguous(), v.contiguous()


def kv_merge(
    k: torch.Tensor, v: torch.Tensor, *, groups: int, head_dim: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF k, v -> Megatron `linear_kv` rows `[k_g, v_g]` per query group."""
    tail = k.shape[1:]
    parts = [k.reshape(groups, head_dim, *tail), v.reshape(groups, head_dim, *tail)]
    return concat_into(parts, 1, out).reshape(-1, *tail)


def kv_split(kv: torch.Tensor, *, groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    tail = kv.shape[1:]
    per_group = kv.reshape(groups, 2, head_dim, *tail)
    return (
        per_group[:, 0].reshape(-1, *tail).contiguous(),
        per_group[:, 1].reshape(-1, *tail).contiguous(),
    )


def concat_qkv_parts(
    qkv: torch.Tensor, *, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One HF `[Q; K; V]` tensor -> its q, k, v blocks (views)."""
    q_rows, kv_rows = heads * head_dim, groups * head_dim
    q, k, v = torch.split(qkv, [q_rows, kv_rows, kv_rows], dim=0)
    return q, k, v


def permute(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return tensor.permute(dims).contiguous()


def zero_centered_from_hf(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """HF RMSNorm scale w (y = x*w) -> Megatron zero-centred gamma (y = x*(1+gamma))."""
    if out is None:
        return weight - 1
    return out.copy_(weight).sub_(1)


def zero_centered_to_hf(gamma: torch.Tensor) -> torch.Tensor:
    return gamma + 1
