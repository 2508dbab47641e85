"""The bucket plan of a streamed export: which parameters travel together, in which flat buffers,
at what memory cost, identical on every rank (`plan_buckets`).

A bucket is a run of export units (a parameter, or one MoE layer's experts at one local index on
every EP rank) of one pipeline stage whose *cost* stays within `bucket_bytes`; a unit that alone
costs more travels alone. The cost counts every buffer the bucket holds at once, in the phase
where most are alive (see `BucketPlan`): the gathered shards with the gather's input and the
backend's own flat copy of its output, then the gathered shards with the bucket's HF tensors in
the export format, then those with the EP gather's backend copy. On top of one bucket, export
holds at most one parameter's export-function outputs and its quantization temporaries, the last
tensor yielded (a copy, so the consumer's reference does not pin the bucket) and, for a
stacked-experts checkpoint, one layer's stacked tensors being assembled: `ExportBound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from mapgen.common.layout import stacked_slice
from mapgen.runtime.context import ParallelContext
from mapgen.runtime.formats import FP8, ExportFormat, held_dtype
from mapgen.runtime.plan import ParamPlan

if TYPE_CHECKING:
    from mapgen.runtime.placement import Module, Placement


# bytes of bookkeeping per output of a bucket (where it lies in the flat buffers, the outputs
# kept aside, their tensor objects), counted in the bucket's cost
OUTPUT_BYTES = 256


# --- the bucket plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """One tensor a bucket yields: an HF tensor, one expert's slice `X[i]` of a stacked tensor,
    or a scale companion."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as yielded (float8_e4m3fn for a quantized weight)
    ep_rank: int | None  # the EP rank that produces it (an expert's, at EP > 1); None: every rank of the stage
    travels: bool  # it is sent (over EP, or from the owning stage over PP) in a flat buffer

    @cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @cached_property
    def strides(self) -> tuple[int, ...]:  # contiguous, in elements
        return tuple(math.prod(self.shape[dim + 1 :]) for dim in range(len(self.shape)))

    @cached_property
    def stacked(self) -> tuple[str, int | None]:  # `stacked_slice(name)`
        return stacked_slice(self.name)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def wire(self) -> torch.dtype:
        """The dtype it travels in (collectives do not take e4m3: its bytes as uint8)."""
        return torch.uint8 if self.dtype == FP8 else self.dtype


@dataclass(frozen=True)
class Flat:
    """One flat buffer of a bucket: what travels in one wire dtype. The outputs of the whole
    stage first, then one slot per EP rank for the experts each produces (EP-gathered in place)."""

    dtype: torch.dtype
    common: tuple[tuple[Out, int], ...]  # (output, offset)
    slots: tuple[tuple[tuple[Out, int], ...], ...]  # per EP rank: (output, offset in the slot)
    common_numel: int
    slot_numel: int

    @property
    def numel(self) -> int:
        return self.common_numel + len(self.slots) * self.slot_numel


@dataclass(frozen=True)
class BucketPlan:
    """What one bucket moves, identical on every rank. `cost` is the most bytes it holds at once
    on any rank: max(S + 2G, G + T, T + Te) + 256 N with G the shards it all-gathers (whole, in
    the model's dtype), S their inputs, T its outputs in the export format, Te those that travel
    over EP (the collectives keep a flat copy of an all_gather's output: 2G, + Te) and N the
    outputs (bookkeeping)."""

    owner: int  # pp rank
    plans: tuple[ParamPlan, ...]
    outs: tuple[Out, ...]  # in the order yielded (HF order; a scale after its weight)
    flats: tuple[Flat, ...]
    cost: int
    # per pipeline stage: the index of the stage's own bucket it makes while this one, another
    # stage's, travels (so that stages make their buckets side by side); -1: none (`_made_ahead`)
    ahead: tuple[int, ...] = ()

    @cached_property
    def by_name(self) -> dict[str, Out]:
        return {out.name: out for out in self.outs}

    @cached_property
    def where(self) -> dict[str, tuple[int, int]]:
        """Where each travelling output lies in the bucket's flat buffers: (flat, start)."""
        found: dict[str, tuple[int, int]] = {}
        for index, flat in enumerate(self.flats):
            for out, offset in flat.common:
                found[out.name] = (index, offset)
            for rank, slot in enumerate(flat.slots):
                for out, offset in slot:
                    found[out.name] = (index, flat.common_numel + rank * flat.slot_numel + offset)
        return found


@dataclass(frozen=True)
class ExportBound:
    """The most memory an export holds beyond the model at any moment, in bytes: one bucket
    (`bucket`: the largest bucket cost, or at PP > 1 the largest pair a stage holds while it makes
    its next bucket ahead, at most bucket_bytes unless one unit alone costs more),
    one parameter's export-function outputs and quantization temporaries (`transient`), the last
    tensor yielded (`held`: the copy the consumer may keep until it asks for the next) and the
    stacked tensors of one layer being assembled (`stacking`; 0 for per-expert checkpoints)."""

    bucket: int
    transient: int
    held: int
    stacking: int
    buckets: int

    @property
    def total(self) -> int:
        return self.bucket + self.transient + self.held + self.stacking


def export_units(module: Module, placement: Placement) -> list[tuple[ParamPlan, ...]]:
    """What export moves together, in HF order: each parameter alone, except expert parameters:
    those of one MoE layer at the same local index on every EP rank form one unit, so that every
    EP rank contributes alike to the unit's gather."""
    assert placement.expert_ranks is not None
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    units: dict[tuple[object, ...], list[ParamPlan]] = {}
    for plan in module.PARAMS:
        if plan.expert is None:
            key: tuple[object, ...] = (plan.megatron_name,)
        else:
            key = (plan.layer, placement.expert_ranks[plan.megatron_name][1])
        units.setdefault(key, []).append(plan)

    def order(unit: tuple[ParamPlan, ...]) -> tuple[int, int]:
        return min(hf_order(position, n) for p in unit for n in p.hf_names)

    return sorted((tuple(u) for u in units.values()), key=order)


def _made_ahead(buckets: list[BucketPlan], stages: int, bucket_bytes: int) -> list[tuple[int, ...]]:
    """Which own bucket each pipeline stage makes while another stage's bucket travels: at
    bucket i of another stage, the stage's next own bucket j, when it has not been made yet and
    j held beside each bucket from i to j fits in bucket_bytes (the receiving stage holds both),
    so a stage does not sit idle while the others make theirs. Per bucket, per stage; -1: none."""
    ahead = [[-1] * stages for _ in buckets]
    for stage in range(stages):
        made = -1
        following = -1  # the stage's next own bucket after i, found walking backwards
        nexts = [-1] * len(buckets)
        for i in range(len(buckets) - 1, -1, -1):
            nexts[i] = following
            if buckets[i].owner == stage:
                following = i
        for i, bucket in enumerate(buckets):
            j = nexts[i]
            if bucket.owner == stage or j <= made:
                continue
            if all(buckets[k].cost + buckets[j].cost <= bucket_bytes for k in range(i, j)):
                ahead[i][stage] = made = j
    return [tuple(a) for a in ahead]


def hf_order(position: dict[str, int], name: str) -> tuple[int, int]:
    """Where an HF name (or a slice of a stacked tensor) stands in the module's HF order."""
    base, index = stacked_slice(name)
    return position[base], -1 if index is None else index


def _hf_shape(shapes: dict[str, tuple[int, ...]], label: str) -> tuple[int, ...]:
    base, index = stacked_slice(label)
    return shapes[base] if index is None else shapes[base][1:]


def plan_buckets(
    module: Module,
    placement: Placement,
    ctx: ParallelContext,
    fmt: ExportFormat,
    bucket_bytes: int,
    all_stages: bool,
) -> tuple[list[BucketPlan], ExportBound]:
    """The buckets of an export (identical on every rank: nothing rank-local goes in) and the
    bound on the memory it holds."""
    expert_ranks = placement.expert_ranks
    assert expert_ranks is not None
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    model_size = placement.dtype.itemsize
    ep = ctx.ep.size
    pipelined = ctx.pp.size > 1 and all_stages
    buckets: list[BucketPlan] = []
    transient = held = 0
    current: list[tuple[ParamPlan, ...]] = []
    sums = [0, 0, 0, 0, 0]  # S, G, T, Te and the outputs of the current bucket
    owner = -1

    def cost(s: int, g: int, t: int, te: int, n: int) -> int:
        return max(s + 2 * g, g + t, t + te) + n * OUTPUT_BYTES

    def close() -> None:
        plans = tuple(p for unit in current for p in unit)
        outs = _outs(plans)
        buckets.append(BucketPlan(owner, plans, outs, _flats(outs, ep), cost(*sums)))

    def _outs(plans: tuple[ParamPlan, ...]) -> tuple[Out, ...]:
        found: list[tuple[tuple[int, int, int], Out]] = []
        for plan in plans:
            rank = None
            if plan.expert is not None and ep > 1:
                rank = expert_ranks[plan.megatron_name][0]
            travels = pipelined or rank is not None
            for label in plan.hf_names:
                for k, (name, shape, dtype) in enumerate(fmt.outputs(label, _hf_shape(shapes, label))):
                    found.append(((*hf_order(position, label), k), Out(name, shape, dtype, rank, travels)))
        return tuple(out for _, out in sorted(found, key=lambda item: item[0]))

    for unit in export_units(module, placement):
        unit_owner = placement.owners[unit[0].megatron_name].pp_rank
        s = g = t = te = n = 0
        param_transient = 0
        for plan in unit:
            group = ctx.etp if plan.expert_parallel else ctx.tp
            representative = plan.expert is None or expert_ranks[plan.megatron_name][0] == 0
            if plan.split_dim is not None and group.size > 1 and representative:
                whole = math.prod(plan.shape) * model_size
                g += whole
                s += whole // group.size
            outputs = 0
            temporaries = 0
            for label in plan.hf_names:
                shape = _hf_shape(shapes, label)
                outputs += math.prod(shape) * held_dtype(plan.megatron_name, placement.dtype).itemsize
                for name, out_shape, dtype in fmt.outputs(label, shape):
                    nbytes = math.prod(out_shape) * dtype.itemsize
                    t += nbytes
                    n += 1
                    if plan.expert is not None and ep > 1:
                        te += nbytes
                    held = max(held, nbytes)
                    if name == label and stacked_slice(label)[0] in fmt.fp8:  # a quantized weight
                        temporaries = max(temporaries, fmt.temporaries(shape))
            param_transient = max(param_transient, outputs + temporaries)
        transient = max(transient, param_transient)
        grown = cost(sums[0] + s, sums[1] + g, sums[2] + t, sums[3] + te, sums[4] + n)
        if current and (unit_owner != owner or grown > bucket_bytes):
            close()
            current, sums = [], [0, 0, 0, 0, 0]
        current.append(unit)
        sums = [sums[0] + s, sums[1] + g, sums[2] + t, sums[3] + te, sums[4] + n]
        owner = unit_owner
    if current:
        close()
    ahead = _made_ahead(buckets, ctx.pp.size, bucket_bytes) if pipelined else [()] * len(buckets)
    buckets = [replace(b, ahead=a) for b, a in zip(buckets, ahead)]
    overlap = max((b.cost + buckets[j].cost for b in buckets for j in b.ahead if j >= 0), default=0)
    stacking: dict[object, int] = {}
    counted: set[str] = set()
    for plan in module.PARAMS:
        for label in plan.hf_names:
            base, index = stacked_slice(label)
            if index is not None and base not in counted:
                counted.add(base)
                stacking[plan.layer] = stacking.get(plan.layer, 0) + math.prod(shapes[base]) * fmt.dtypes[base].itemsize
    bound = ExportBound(
        max(max((b.cost for b in buckets), default=0), overlap), transient, held, max(stacking.values(), default=0),
        len(buckets),
    )
    return buckets, bound


def _flats(outs: tuple[Out, ...], ep: int) -> tuple[Flat, ...]:
    by_wire: dict[torch.dtype, list[Out]] = {}
    for out in outs:
        if out.travels:
            by_wire.setdefault(out.wire, []).append(out)
    flats: list[Flat] = []
    for wire, group in by_wire.items():
        common: list[tuple[Out, int]] = []
        offset = 0
        for out in group:
            if out.ep_rank is None:
                common.append((out, offset))
                offset += out.numel
        slots: list[tuple[tuple[Out, int], ...]] = []
        slot_numel = 0
        if any(out.ep_rank is not None for out in group):
            for rank in range(ep):
                slot: list[tuple[Out, int]] = []
                at = 0
                for out in group:
                    if out.ep_rank == rank:
                        slot.append((out, at))
                        at += out.numel
                slots.append(tuple(slot))
                slot_numel = max(slot_numel, at)
        flats.append(Flat(wire, tuple(common), tuple(slots), offset, slot_numel))
    return tuple(flats)
