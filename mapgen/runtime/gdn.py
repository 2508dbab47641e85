"""Gated delta net (Qwen3-Next's linear attention) layouts: HF <-> megatron-core's GatedDeltaNet.

Notation: nk key heads, nv value heads, r = nv // nk value heads per key head, dk key head dim,
dv value head dim; value head j belongs to key head j // r on both sides (megatron-core repeats
each query/key head r times with `repeat_interleave`, transformers reshapes [nk, r*dv] to
[nk*r, dv]).

transformers' `Qwen3NextGatedDeltaNet` packs its input projection per key head h
(`fix_query_key_value_ordering`):

    in_proj_qkvz  [nk * (2*dk + 2*r*dv), H]: per h, [q_h (dk), k_h (dk), v_h (r*dv), z_h (r*dv)]
    in_proj_ba    [nk * 2*r, H]:             per h, [b_h (r), a_h (r)]

megatron-core's `GatedDeltaNet.in_proj` (a column-parallel linear) holds on TP rank t, whose key
heads are the t-th of TP blocks (and its value heads the matching block), one section after the
other (its forward splits them so; its `sharded_state_dict` names them query, key, value, z,
beta, alpha):

    in_proj.weight  rank t: [q_t (nk/TP*dk), k_t, v_t (nv/TP*dv), z_t, beta_t (nv/TP), alpha_t]

`conv1d.weight` [2*nk*dk + nv*dv, 1, K]: transformers' channels are [q (all heads), k, v];
megatron-core's rank t holds [q_t, k_t, v_t]. Both sides keep a head's pieces on one rank.

(The runtime functions' names carry no digit: the generated-code gate reads digits as 0.)
The import functions read only this rank's heads; the export functions take the shards of
every rank (or of one rank alone: the sizes come from the shards, so one rank's shard gives the
rows of its own heads, which `export_local` relies on).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mapgen.runtime.context import Group
from mapgen.runtime.transforms import concat_into


def _heads(rows: int, per_head: int, what: str) -> int:
    if per_head <= 0 or rows % per_head:
        raise ValueError(f"{what}: {rows} rows are no whole number of key heads of {per_head} rows")
    return rows // per_head


def _rank_heads(group: Group, heads: int) -> tuple[int, int]:
    if heads % group.size:
        raise ValueError(f"{heads} gated delta net key heads do not split over {group.size} TP ranks")
    count = heads // group.size
    return group.rank * count, count


def gdn_in_proj_import(
    group: Group,
    qkvz: torch.Tensor,
    ba: torch.Tensor,
    *,
    key_dim: int,
    value_dim: int,
    v_per_k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF in_proj_qkvz and in_proj_ba -> this rank's [q; k; v; z; beta; alpha] rows."""
    tail = qkvz.shape[1:]
    qkvz_rows, ba_rows = 2 * key_dim + 2 * v_per_k * value_dim, 2 * v_per_k
    heads = _heads(qkvz.shape[0], qkvz_rows, "in_proj_qkvz")
    if ba.shape[0] != heads * ba_rows or ba.shape[1:] != tail:
        raise ValueError(f"in_proj_ba {list(ba.shape)} does not fit {heads} key heads of in_proj_qkvz {list(qkvz.shape)}")
    first, count = _rank_heads(group, heads)
    per_head = qkvz.narrow(0, first * qkvz_rows, count * qkvz_rows).reshape(count, qkvz_rows, *tail)
    q, k, v, z = torch.split(per_head, [key_dim, key_dim, v_per_k * value_dim, v_per_k * value_dim], dim=1)
    gates = ba.narrow(0, first * ba_rows, count * ba_rows).reshape(count, ba_rows, *tail)
    b, a = torch.split(gates, [v_per_k, v_per_k], dim=1)
    return concat_into([t.reshape(-1, *tail) for t in (q, k, v, z, b, a)], 0, out)


def gdn_in_proj_export(
    parts: Sequence[torch.Tensor], *, key_dim: int, value_dim: int, v_per_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's in_proj shard, in rank order -> HF (in_proj_qkvz, in_proj_ba)."""
    qkvz_parts: list[torch.Tensor] = []
    ba_parts: list[torch.Tensor] = []
    for part in parts:
        tail = part.shape[1:]
        count = _heads(part.shape[0], 2 * key_dim + 2 * v_per_k * value_dim + 2 * v_per_k, "in_proj shard")
        q, k, v, z, b, a = torch.split(
            part,
            [count * key_dim, count * key_dim, count * v_per_k * value_dim, count * v_per_k * value_dim,
             count * v_per_k, count * v_per_k],
            dim=0,
        )
        qkvz_parts.append(torch.cat([t.reshape(count, -1, *tail) for t in (q, k, v, z)], dim=1).reshape(-1, *tail))
        ba_parts.append(torch.cat([t.reshape(count, -1, *tail) for t in (b, a)], dim=1).reshape(-1, *tail))
    return torch.cat(qkvz_parts, dim=0), torch.cat(ba_parts, dim=0)


def gdn_conv_import(
    group: Group,
    conv: torch.Tensor,
    *,
    key_dim: int,
    value_dim: int,
    v_per_k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF conv1d channels [q; k; v] (weight or bias) -> this rank's [q_t; k_t; v_t]."""
    heads = _heads(conv.shape[0], 2 * key_dim + v_per_k * value_dim, "conv1d")
    first, count = _rank_heads(group, heads)
    qk_total = heads * key_dim
    pieces = [
        conv.narrow(0, first * key_dim, count * key_dim),
        conv.narrow(0, qk_total + first * key_dim, count * key_dim),
        conv.narrow(0, 2 * qk_total + first * v_per_k * value_dim, count * v_per_k * value_dim),
    ]
    return concat_into(pieces, 0, out)


def gdn_conv_export(parts: Sequence[torch.Tensor], *, key_dim: int, value_dim: int, v_per_k: int) -> torch.Tensor:
    """Every rank's [q_t; k_t; v_t] channels, in rank order -> HF [q; k; v]."""
    sections: list[tuple[torch.Tensor, ...]] = []
    for part in parts:
        count = _heads(part.shape[0], 2 * key_dim + v_per_k * value_dim, "conv1d shard")
        sections.append(torch.split(part, [count * key_dim, count * key_dim, count * v_per_k * value_dim], dim=0))
    if len(sections) == 1:
        return parts[0]
    return torch.cat([piece for index in range(3) for piece in (s[index] for s in sections)], dim=0)
