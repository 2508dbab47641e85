"""Weight sync: the whole model out as HF tensors in an export format (`formats`), streamed bucket
by bucket as `buckets` plans them (`stream_export`); `drivers.Converter.export` calls it.

Tensor views are made one at a time as they are yielded, and after a gloo collective the runtime
waits until gloo's worker thread has let go of the bucket's buffers (`collectives._Released`), so
that a bucket's buffers are gone before the next bucket's are made. A failure making a bucket on
one rank is agreed on by every rank that walks it (`_agree_bucket`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from mapgen.common import gcpause
from mapgen.common.layout import stacked_slice
from mapgen.runtime import mx
from mapgen.runtime.buckets import BucketPlan, Flat, Out
from mapgen.runtime.collectives import RankError, all_gather_coalesced, all_gather_slots, broadcast_flat
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.formats import FP8, ExportFormat, quantize_fp8

if TYPE_CHECKING:
    from mapgen.runtime.placement import Module, Placement


# --- streaming export ------------------------------------------------------------------------


def _view(flat: torch.Tensor, start: int, out: Out) -> torch.Tensor:
    part = flat.as_strided(out.shape, out.strides, flat.storage_offset() + start)
    return part.view(FP8) if out.dtype == FP8 else part


# a bucket on this rank: its flat buffers, where each travelling output lies in them, the
# outputs that do not travel, and what failed making it here (None: nothing)
_Made = tuple[list[torch.Tensor], dict[str, tuple[int, int]], dict[str, torch.Tensor], Exception | None]


def _travels_as_it_is(layout: Flat, out: Out, tensor: torch.Tensor) -> bool:
    """Whether `tensor`, an output's value, can be its flat buffer itself rather than be copied
    into it: the flat holds this output alone (often so at real widths, where a parameter fills a
    bucket) and gathers nothing over EP in place, and the tensor has the output's dtype and shape
    and is contiguous (the output's layout in the flat). A PP broadcast then sends it (often the
    parameter itself) as it is."""
    return (
        len(layout.common) == 1
        and layout.slot_numel == 0
        and tensor.dtype == out.dtype
        and tuple(tensor.shape) == tuple(out.shape)
        and tensor.is_contiguous()
    )


def _make_bucket(module: Module, bucket: BucketPlan, placement: Placement, ctx: ParallelContext, fmt: ExportFormat) -> _Made:
    """The bucket's outputs on this rank: produced (owning stage), else buffers to receive them
    in. An export function that raises does not stop the bucket's collectives here (the other
    ranks are in them): the failure is returned, for `_agree_bucket`."""
    flats = [torch.empty(f.numel, dtype=f.dtype) for f in bucket.flats]
    where = bucket.where
    kept: dict[str, torch.Tensor] = {}
    failure: Exception | None = None
    if bucket.owner == ctx.pp.rank:
        try:
            _produce(module, bucket, placement, ctx, fmt, flats, where, kept)
        except Exception as exc:  # noqa: BLE001 - agreed on by every rank after the bucket's collectives
            failure = exc
        for layout, buffer in zip(bucket.flats, flats):
            all_gather_slots(ctx.ep, buffer, layout.common_numel, layout.slot_numel)
    return flats, where, kept, failure


def _agree_bucket(failure: Exception | None, number: int, count: int, stage: Group | None) -> None:
    """Every rank that walks bucket `number`, after its collectives and before any of its
    tensors is yielded: if one failed making it, the failing rank raises its own error and every
    other rank a RankError naming it (one small all_reduce: over all ranks where every rank walks
    every bucket, `stage` None; else over the ranks of this pipeline stage, which walk the
    stage's own buckets and no other)."""
    single = stage.size == 1 if stage is not None else (not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1)
    if single:
        if failure is not None:
            raise failure
        return
    rank = torch.distributed.get_rank()
    status = torch.tensor([1 if failure is not None else 0, rank if failure is not None else -1], dtype=torch.int64)
    torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX, group=stage.handle if stage is not None else None)
    if failure is not None:
        raise failure
    if status[0]:
        raise RankError(
            f"export stopped at bucket {number + 1} of {count}: rank {int(status[1])} failed making it "
            "(its own error says why); every rank stops here"
        )


def _produce(
    module: Module,
    bucket: BucketPlan,
    placement: Placement,
    ctx: ParallelContext,
    fmt: ExportFormat,
    flats: list[torch.Tensor],
    where: dict[str, tuple[int, int]],
    kept: dict[str, torch.Tensor],
) -> None:
    """Gather the bucket's shards over TP (expert-TP), apply the export functions and write each
    HF tensor in its export format: into its place in a flat buffer if it travels, else kept."""
    outs = bucket.by_name
    mine = [p for p in bucket.plans if p.megatron_name in placement.local]
    parts: dict[str, list[torch.Tensor]] = {}
    for expert_parallel in (False, True):
        group = ctx.etp if expert_parallel else ctx.tp
        if group.size == 1:
            continue
        split = [p for p in mine if p.expert_parallel == expert_parallel and p.split_dim is not None]
        gathered = all_gather_coalesced(group, [placement.local[p.megatron_name].detach() for p in split])
        parts.update({p.megatron_name: g for p, g in zip(split, gathered)})
        del gathered, split

    def target(name: str) -> torch.Tensor | None:
        if name not in where:
            return None
        index, start = where[name]
        return _view(flats[index], start, outs[name])

    for plan in mine:
        shards = parts.pop(plan.megatron_name, None) or [placement.local[plan.megatron_name].detach()]
        exported = module.EXPORTS[plan.megatron_name](shards)
        del shards
        shared: torch.Tensor | None = None  # NVFP4's per-tensor amax, shared by the parameter's tensors
        for label, tensor in exported.items():
            if plan.megatron_name in placement.vocab:  # the HF rows, without Megatron's padding
                tensor = tensor.narrow(0, 0, plan.shape[0])
            if fmt.fp8 and stacked_slice(label)[0] in fmt.fp8:
                names = [name for name, _, _ in fmt.outputs(label, tuple(tensor.shape))]
                if fmt.scheme == "fp8":
                    made: tuple[torch.Tensor, ...] = quantize_fp8(tensor, fmt.block, target(names[0]), target(names[1]))
                elif fmt.scheme == "mxfp8":
                    made = mx.quantize_mxfp8(tensor, target(names[0]), target(names[1]))
                else:  # one per-tensor scale over what the parameter exports (q, k, v; gate, up)
                    if shared is None:
                        shared = max(mx.amax(t) for l, t in exported.items() if stacked_slice(l)[0] in fmt.fp8)
                    made = mx.quantize_nvfp4(tensor, shared, target(names[0]), target(names[1]), target(names[2]))
                if label not in where:
                    kept.update(zip(names, made))
                del made
                continue
            spot = where.get(label)
            if spot is not None and _travels_as_it_is(bucket.flats[spot[0]], outs[label], tensor):
                flats[spot[0]] = tensor.view(-1)  # the flat itself (its empty buffer was never touched)
            elif spot is not None:  # it travels: into its place in a flat buffer
                _view(flats[spot[0]], spot[1], outs[label]).copy_(tensor)
            else:
                dtype = outs[label].dtype
                kept[label] = tensor if tensor.dtype == dtype else tensor.to(dtype)
        del exported


def stream_export(
    module: Module,
    buckets: list[BucketPlan],
    placement: Placement,
    ctx: ParallelContext,
    fmt: ExportFormat,
    all_stages: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) bucket by bucket; a bucket's buffers are released before the next
    is made, except that at PP > 1 a stage makes its next own bucket while another stage's
    travels where the plan says so (`BucketPlan.ahead`: the two fit in bucket_bytes). The last
    tensor of a bucket that views a flat buffer is yielded as a copy where it is under half of
    that buffer, so that the consumer's reference to it does not keep the whole bucket alive;
    a larger one (often the whole bucket, at real widths) is yielded as the view: copying it
    would cost more time and as much memory as what it frees."""
    shapes: dict[str, tuple[int, ...]] = {}  # of stacked-experts tensors, filled when one is met
    stacking: dict[str, tuple[torch.Tensor, set[int]]] = {}
    made: dict[int, _Made] = {}
    # a failure on one rank (an export function raising) is agreed on per bucket: the failing
    # rank still takes part in the bucket's collectives, then every rank that walks the bucket
    # raises before any of its tensors is yielded (all ranks, or without all_stages at PP > 1
    # the ranks of the owning stage: the others never wait on it)
    stage = None if all_stages or ctx.pp.size == 1 else ctx.stage
    for number, bucket in enumerate(buckets):
        if bucket.owner != ctx.pp.rank and not all_stages:
            continue
        with gcpause.paused():  # resumed while the caller has a tensor
            flats, where, kept, failure = made.pop(number) if number in made else _make_bucket(module, bucket, placement, ctx, fmt)
            if all_stages and ctx.pp.size > 1:
                ahead = bucket.ahead[ctx.pp.rank] if bucket.ahead else -1
                if ahead >= 0:  # made while this bucket travels from its stage (the receivers wait anyway)
                    made[ahead] = _make_bucket(module, buckets[ahead], placement, ctx, fmt)
                for buffer in flats:
                    broadcast_flat(ctx.pp, bucket.owner, buffer)
        _agree_bucket(failure, number, len(buckets), stage)
        last = len(bucket.outs) - 1
        for position, out in enumerate(bucket.outs):
            if not out.travels:
                tensor = kept.pop(out.name)
            else:  # a view of the flat buffer, made as it is yielded (not a bucket's worth at once)
                index, start = where[out.name]
                tensor = _view(flats[index], start, out)
                if position == last and out.stacked[1] is None and 2 * tensor.numel() < flats[index].numel():
                    tensor = tensor.clone()  # a copy costs less than the rest of the bucket held
            if position == last:
                del flats, where, kept  # the bucket's buffers go before the consumer takes the last
            base, slot = out.stacked
            if slot is None:
                yield out.name, tensor
            else:
                if base not in stacking:
                    if not shapes:
                        shapes.update((t.name, tuple(t.shape)) for t in module.HF_TENSORS)
                    stacking[base] = (torch.empty(shapes[base], dtype=tensor.dtype), set())
                whole, done = stacking[base]
                whole[slot].copy_(tensor)
                done.add(slot)
                if len(done) == shapes[base][0]:  # every expert's slice is there
                    del stacking[base]
                    yield base, whole
                del whole
            del tensor
