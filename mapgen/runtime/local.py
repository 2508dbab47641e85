"""Gather-free export: each rank's own pieces of the HF tensors with their HF coordinates, without
any collective (`local_plan`, `local_param_pieces`); `drivers.Converter.export_local` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mapgen.runtime import transforms
from mapgen.runtime.buckets import hf_order
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.formats import ExportFormat, ExportFormatError, module_rules
from mapgen.runtime.plan import ParamPlan, RulePlan
from mapgen.runtime.shardmap import HFPiece, Run, shard_pieces

if TYPE_CHECKING:
    from mapgen.runtime.placement import Module, Placement


# --- gather-free export ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPiece:
    """A part of one HF tensor that this rank holds, in HF layout: `data` holds the HF tensor's
    values at the coordinates `piece` gives (every index whose coordinate in each dimension lies
    in one of that dimension's runs, in order), so a consumer can scatter it into its own buffer
    (`scatter`). `replicated`: every rank of the parameter's TP (expert-TP) group holds and
    yields the same piece (norms, the router); any one of them will do, and `primary` marks the
    one of group rank 0. With data parallelism, each data-parallel replica yields the same pieces
    as the others: take one replica's."""

    piece: HFPiece
    data: torch.Tensor
    replicated: bool
    megatron_name: str
    primary: bool = True  # not replicated, or this rank is rank 0 of the group: take these to cover each byte once

    @property
    def name(self) -> str:
        """The HF tensor (a stacked-experts tensor's own name for one expert's slice)."""
        return self.piece.name

    @property
    def expert(self) -> int | None:
        """The expert's index in a stacked-experts tensor, else None."""
        return self.piece.expert

    @property
    def runs(self) -> tuple[tuple[Run, ...], ...]:
        """Per dimension of the tensor (of the expert's slice), the [start, stop) runs held."""
        return self.piece.runs


def _indices(piece: HFPiece) -> list[torch.Tensor]:
    """Per dim of the whole HF tensor (the expert dim first for a slice), the indices held."""
    return [
        torch.cat([torch.arange(start, stop) for start, stop in runs]) if runs else torch.empty(0, dtype=torch.long)
        for runs in piece.full_runs()
    ]


def take(tensor: torch.Tensor, piece: HFPiece, *, sliced: bool = False) -> torch.Tensor:
    """The values of the whole HF tensor `tensor` at `piece`'s coordinates, in piece layout
    (`sliced`: `tensor` is already the expert's slice of a stacked tensor)."""
    indices = _indices(piece)
    if piece.expert is not None and sliced:
        indices = indices[1:]
    for dim, index in enumerate(indices):
        tensor = tensor.index_select(dim, index)
    return tensor.squeeze(0) if piece.expert is not None and not sliced else tensor


def scatter(into: torch.Tensor, piece: HFPiece, data: torch.Tensor) -> None:
    """Write a piece's data into the whole HF tensor `into` (a consumer's buffer), in place."""
    indices = _indices(piece)
    dims = len(indices)
    grid = tuple(index.view(*([1] * d), -1, *([1] * (dims - d - 1))) for d, index in enumerate(indices))
    into[grid] = data.unsqueeze(0) if piece.expert is not None else data


def _local_data(
    module: Module, rule: RulePlan, plan: ParamPlan, local: torch.Tensor, rank: int, size: int, pieces: tuple[HFPiece, ...]
) -> list[torch.Tensor]:
    """The HF values of this rank's shard at its pieces' coordinates, by the kind's inverse
    transform applied to the shard alone."""
    kind = rule.kind
    if kind in ("qkv", "kv", "concat_qkv", "vision_qkv") and rule.qkv is not None:
        g = rule.qkv
        count = g.groups // size if plan.split_dim is not None else g.groups
        heads = g.heads // g.groups * count
        if kind == "kv":
            return list(transforms.kv_split(local, groups=count, head_dim=g.head_dim))
        q, k, v = transforms.qkv_split(local, heads=heads, groups=count, head_dim=g.head_dim, gate=g.gate)
        return [q, k, v] if kind == "qkv" or len(rule.roles) == 3 else [torch.cat([q, k, v], dim=0)]
    if kind == "reshape" and plan.split_dim is not None and size > 1:
        # no inverse of a block of a reshape by itself: export with zeros for the other ranks'
        # shards (a local computation), then take this rank's coordinates
        shards = [torch.zeros_like(local) for _ in range(size)]
        shards[rank] = local
        whole = module.EXPORTS[plan.megatron_name](shards)
        return [take(whole[p.label], p, sliced=True) for p in pieces]
    exported = module.EXPORTS[plan.megatron_name]([local])  # whole-tensor kinds, gated_mlp: exact
    return [exported[p.label] for p in pieces]


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank as `export_local` takes it apart: what does not change from
    one export to the next (its plan, its TP (expert-TP) group and the HF coordinates of its
    pieces), made once per Converter."""

    plan: ParamPlan
    rule: RulePlan
    group: Group
    pieces: tuple[HFPiece, ...]
    vocab_rows: Run | None  # the HF rows of a padded vocabulary parameter's shard


def local_plan(module: Module, placement: Placement, ctx: ParallelContext) -> list[LocalParam]:
    """This rank's parameters in HF order with their pieces; a shard of padding rows only has
    no piece and is left out."""
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    plans = [p for p in module.PARAMS if p.megatron_name in placement.local]
    plans.sort(key=lambda p: min(hf_order(position, n) for n in p.hf_names))
    rules = module_rules(module)
    found: list[LocalParam] = []
    for plan in plans:
        group = ctx.etp if plan.expert_parallel else ctx.tp
        vocab_rows: Run | None = None
        if plan.megatron_name in placement.vocab and plan.split_dim is not None:
            rows = placement.local[plan.megatron_name].shape[0]
            first = group.rank * rows if group.size > 1 else 0
            vocab_rows = (min(first, plan.shape[0]), min(first + rows, plan.shape[0]))
        rule = rules[plan.rule]
        pieces = shard_pieces(rule, plan, shapes, group.rank, group.size, vocab_rows)
        if any(p.numel == 0 for p in pieces):  # a block of padding rows only
            continue
        found.append(LocalParam(plan, rule, group, pieces, vocab_rows))
    return found


def local_param_pieces(module: Module, entry: LocalParam, local: torch.Tensor, fmt: ExportFormat) -> list[LocalPiece]:
    """`entry`'s pieces with the values of `local` (its parameter, detached) in HF layout, in
    the export format's dtypes."""
    plan, group = entry.plan, entry.group
    if entry.vocab_rows is not None:
        local = local.narrow(0, 0, entry.vocab_rows[1] - entry.vocab_rows[0])
    data = _local_data(module, entry.rule, plan, local, group.rank, group.size, entry.pieces)
    found = []
    for piece, values in zip(entry.pieces, data):
        dtype = fmt.dtypes[piece.name]
        found.append(LocalPiece(
            piece,
            values if values.dtype == dtype else values.to(dtype),
            plan.split_dim is None,
            plan.megatron_name,
            plan.split_dim is not None or group.rank == 0,
        ))
    return found


def no_fp8_local(fmt: ExportFormat) -> None:
    if fmt.fp8:
        raise ExportFormatError(
            f"export_local writes no {fmt.scheme.upper()}: a block (or NVFP4's per-tensor scale) may span ranks; "
            f"quantize after assembling, or use export({fmt.scheme}=...)"
        )
