"""Drivers: an HF checkpoint into Megatron model chunks, Megatron chunks out as HF tensors, and
an HF checkpoint directory written atomically.

A generated module is the plan; these only walk it. `chunks` is the list of model chunks this
rank holds (one per virtual pipeline stage, in stage order). Which chunk holds which global
parameter follows from megatron-core's layer-offset rules (`ownership.py`), identically on
every rank, so the only collectives are the tensor gathers and broadcasts themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.collectives import agree_or_raise, all_gather_coalesced, broadcast_coalesced
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.ownership import (
    Owner,
    expert_owner,
    experts_per_rank,
    layer_owners,
    local_name,
    param_owner,
)
from mapgen.runtime.plan import ExportFn, HFTensorPlan, ImportFn, Loader, ParamPlan
from mapgen.runtime.vocab import VOCAB_PARAMS, padded_block, padded_rows_problem

DEFAULT_BUCKET_BYTES = 256 * 2**20


class MappingModule(Protocol):
    TARGET: str
    PARAMS: tuple[ParamPlan, ...]
    HF_TENSORS: tuple[HFTensorPlan, ...]
    IMPORTS: dict[str, ImportFn]
    EXPORTS: dict[str, ExportFn]
    TIED: dict[str, str]


Module = MappingModule | ModuleType


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def stacked_slice(name: str) -> tuple[str, int | None]:
    """`X[i]` -> (X, i): slice i of a stacked-experts HF tensor; other names -> (name, None)."""
    if name.endswith("]") and "[" in name:
        base, index = name[:-1].rsplit("[", 1)
        return base, int(index)
    return name, None


def hf_order(position: dict[str, int], name: str) -> tuple[int, int]:
    """Where an HF name (or a slice of a stacked tensor) stands in the module's HF order."""
    base, index = stacked_slice(name)
    return position[base], -1 if index is None else index


def num_experts(module: Module) -> int:
    return 1 + max((p.expert for p in module.PARAMS if p.expert is not None), default=-1)


def _weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A chunk's parameters, then its weight buffers (the router's expert_bias)."""
    from mapgen.inventory import weight_buffers

    yield from model.named_parameters()
    yield from weight_buffers(model)


@dataclass(frozen=True)
class Placement:
    """Where every parameter of the module lives under this layout, and what this rank holds."""

    owners: dict[str, Owner]  # global megatron name -> owning (pp rank, vp stage)
    local: dict[str, torch.Tensor]  # global name -> this rank's parameter (or weight buffer)
    tied: dict[str, torch.Tensor]  # tied copies this rank holds (global name -> param)
    dtype: torch.dtype
    expert_ranks: dict[str, tuple[int, int]] | None = None  # expert param -> (EP rank, local index)
    vocab: frozenset[str] = frozenset()  # vocabulary parameters (see `vocab_params`)


def vocab_params(module: Module) -> frozenset[str]:
    """The module's parameters whose dim 0 is the vocabulary, which a Megatron model may pad:
    the embedding and output layer, split over TP by rows, `DIMS.vocab_size` rows in the plan."""
    dims = getattr(module, "DIMS", None)
    if dims is None:
        return frozenset()
    return frozenset(
        p.megatron_name
        for p in module.PARAMS
        if p.megatron_name in VOCAB_PARAMS and p.split_dim == 0 and p.shape[0] == dims.vocab_size
    )


def place(
    module: Module, chunks: list[Any], ctx: ParallelContext, make_vocab_size_divisible_by: int = 1
) -> tuple[Placement, list[str]]:
    """Match this rank's chunks against the module; problems instead of raising. The
    vocabulary parameters may have more rows than the module's plan: Megatron-LM's padding to a
    multiple of `make_vocab_size_divisible_by` x TP, which is checked here."""
    if make_vocab_size_divisible_by < 1:  # the same argument on every rank: all raise here
        raise ValueError(f"make_vocab_size_divisible_by must be positive, not {make_vocab_size_divisible_by}")
    problems: list[str] = []
    if len(chunks) != ctx.vpp_size:
        problems.append(f"{len(chunks)} model chunks given for virtual pipeline size {ctx.vpp_size}")
        return Placement({}, {}, {}, torch.float32), problems
    models = [_unwrap(c) for c in chunks]
    layers = layer_owners(models[0].config, ctx)
    plans = {p.megatron_name: p for p in module.PARAMS}
    num_layers = 1 + max((p.layer for p in module.PARAMS if p.layer is not None), default=-1)
    if len(layers) != num_layers:
        problems.append(
            f"the model has {len(layers)} decoder layers, {module.TARGET} has {num_layers}"
        )
        return Placement({}, {}, {}, torch.float32), problems
    try:
        per_rank = experts_per_rank(num_experts(module), ctx)
    except ValueError as exc:
        problems.append(f"{module.TARGET}: {exc}")
        return Placement({}, {}, {}, torch.float32), problems
    owners = {name: param_owner(plan, layers, ctx) for name, plan in plans.items()}
    expert_ranks = {n: expert_owner(p, per_rank) for n, p in plans.items() if p.expert is not None}
    expected: dict[tuple[int, str], str] = {}
    for name, plan in plans.items():
        owner = owners[name]
        mine = name not in expert_ranks or expert_ranks[name][0] == ctx.ep.rank
        if owner.pp_rank == ctx.pp.rank and mine:
            expected[(owner.vp_stage, local_name(plan, layers, per_rank))] = name
    local: dict[str, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}
    dtypes: set[torch.dtype] = set()
    vocab = vocab_params(module)

    def shape_problem(name: str, plan: ParamPlan, actual: tuple[int, ...]) -> str | None:
        if plan.megatron_name not in vocab:
            return _shape_problem(plan, actual, ctx, module.TARGET)
        if len(actual) != len(plan.shape) or actual[1:] != plan.shape[1:]:
            expected = ", ".join(map(str, plan.shape[1:]))
            return f"'{name}': the model's shard is {list(actual)}, {module.TARGET} expects [rows, {expected}]"
        return padded_rows_problem(name, actual[0], plan.shape[0], make_vocab_size_divisible_by, ctx.tp.size)
    for vp_stage, model in enumerate(models):
        parameters = {id(p) for p in model.parameters()}
        for name, param in _weights(model):
            if id(param) in parameters:
                dtypes.add(param.dtype)
            global_name = expected.pop((vp_stage, name), None)
            if global_name is None and name in module.TIED:
                tied[name] = param
                if (problem := shape_problem(name, plans[module.TIED[name]], tuple(param.shape))) is not None:
                    problems.append(problem)
                continue
            if global_name is None:
                problems.append(f"model parameter '{name}' (chunk {vp_stage}) has no mapping in {module.TARGET}")
                continue
            plan = plans[global_name]
            problem = shape_problem(global_name, plan, tuple(param.shape))
            if problem:
                problems.append(problem)
            local[global_name] = param
    for (vp_stage, name), global_name in sorted(expected.items()):
        problems.append(f"the model lacks '{name}' (chunk {vp_stage}), {global_name} in {module.TARGET}")
    if len(dtypes) > 1:
        problems.append(f"model parameters mix dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return Placement(owners, local, tied, dtype, expert_ranks, vocab), problems


def local_shape(plan: ParamPlan, ctx: ParallelContext) -> tuple[int, ...]:
    group = ctx.etp if plan.expert_parallel else ctx.tp
    if plan.split_dim is None:
        return plan.shape
    shape = list(plan.shape)
    shape[plan.split_dim] //= group.size
    return tuple(shape)


def _shape_problem(plan: ParamPlan, actual: tuple[int, ...], ctx: ParallelContext, target: str) -> str | None:
    group = ctx.etp if plan.expert_parallel else ctx.tp
    if plan.split_dim is not None and plan.shape[plan.split_dim] % group.size:
        which = "expert-TP" if plan.expert_parallel else "TP"
        return (
            f"{plan.megatron_name}: dim {plan.split_dim} of {list(plan.shape)} does not split "
            f"over {which} size {group.size}"
        )
    if actual != local_shape(plan, ctx):
        return (
            f"'{plan.megatron_name}': the model's shard is {list(actual)}, {target} expects "
            f"{list(local_shape(plan, ctx))} on this rank"
        )
    return None


def _layout_problems(module: Module, ctx: ParallelContext) -> list[str]:
    """Divisibility the generated functions rely on (query groups over TP)."""
    dims = getattr(module, "DIMS", None)
    if dims is None or dims.num_query_groups % ctx.tp.size == 0:
        return []
    return [
        f"TP size {ctx.tp.size} does not divide the {dims.num_query_groups} query groups "
        f"(KV heads) of {module.TARGET}"
    ]


class Converter:
    """One module's conversion plan for this rank's model chunks, decided once: which chunk
    holds each parameter, and the export buckets. Hold one for repeated exports (RL weight
    sync): after its first call nothing is looked up again.

    A model built with Megatron-LM's vocabulary padding (`make_vocab_size_divisible_by`, 128 in
    Megatron-LM's training scripts) has more embedding and output-layer rows than the HF
    checkpoint: say so here; import fills the pad rows with zeros and export drops them."""

    def __init__(
        self,
        module: Module,
        chunks: list[Any],
        ctx: ParallelContext | None = None,
        *,
        make_vocab_size_divisible_by: int = 1,
    ) -> None:
        self.module = module
        self.chunks = chunks
        self.ctx = ctx or ParallelContext.single()
        self.placement, found = place(module, chunks, self.ctx, make_vocab_size_divisible_by)
        self._problems = _layout_problems(module, self.ctx) + found
        self._agreed = False
        self._buckets: dict[int, list[tuple[Bucket, list[str]]]] = {}
        self._hf_shapes = {t.name: t.shape for t in module.HF_TENSORS}
        self._position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}

    def _shape(self, name: str) -> tuple[int, ...]:
        base, index = stacked_slice(name)
        shape = self._hf_shapes[base]
        return shape if index is None else shape[1:]

    def _order(self, name: str) -> tuple[int, int]:
        return hf_order(self._position, name)

    def _agree(self, extra: list[str], what: str) -> None:
        """Every rank calls this at the same point; after one agreement the placement is known
        good everywhere, so later calls need no collective unless they bring new checks."""
        if self._agreed and not extra:
            return
        agree_or_raise(self._problems + extra, what)
        self._agreed = True

    def load(self, hf_dir: str | Path) -> int:
        """Fill every parameter from the HF checkpoint in `hf_dir`; returns the count.

        Each rank reads only the tensors its own parameters need. Everything is checked first,
        on every rank, and agreed on before any weight is written: the model against the module,
        the checkpoint's names, shapes, dtypes and file sizes against the module's HF table."""
        module, placement = self.module, self.placement
        problems: list[str] = []
        checkpoint: HFCheckpoint | None = None
        try:
            checkpoint = HFCheckpoint(hf_dir)
            problems += _checkpoint_problems(module, checkpoint, placement)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            problems.append(str(exc))
        agree_or_raise(self._problems + problems, f"cannot load {hf_dir} into {module.TARGET}")
        self._agreed = True
        assert checkpoint is not None
        with torch.no_grad():
            for name, param in placement.local.items():
                _import(module, name, self.ctx, checkpoint.get, param.data, name in placement.vocab)
            for name, param in placement.tied.items():
                source = module.TIED[name]
                _import(module, source, self.ctx, checkpoint.get, param.data, source in placement.vocab)
        return len(placement.local) + len(placement.tied)

    def export(
        self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, all_stages: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for the whole model in HF order.

        Where no layout change is needed (TP 1, a replicated parameter), a yielded tensor is a
        view of the model's own parameter: copy it if you keep it past the next optimizer step.

        Parameters are gathered over TP (expert-TP) in coalesced buckets of up to
        `bucket_bytes`; with `all_stages`, each bucket is broadcast from the pipeline stage that
        owns it, so every rank sees the whole model; without, each stage yields what it owns."""
        self._agree([], f"cannot export with {self.module.TARGET}")
        ctx, placement = self.ctx, self.placement
        stacking: dict[str, dict[int, torch.Tensor]] = {}  # stacked-experts tensors in progress
        with torch.no_grad():
            for bucket, names in self._bucket_plan(bucket_bytes):
                tensors: list[torch.Tensor] | None = None
                if bucket.owner == ctx.pp.rank:
                    produced = _export_bucket(self.module, bucket.plans, placement, ctx)
                    tensors = [produced[n] for n in names]
                elif not all_stages:
                    continue
                if all_stages:
                    shapes = [self._shape(n) for n in names]
                    tensors = broadcast_coalesced(ctx.pp, bucket.owner, tensors, shapes, placement.dtype)
                assert tensors is not None
                for name, tensor in zip(names, tensors):
                    base, index = stacked_slice(name)
                    if index is None:
                        yield name, tensor
                        continue
                    pieces = stacking.setdefault(base, {})
                    pieces[index] = tensor
                    if len(pieces) == self._hf_shapes[base][0]:  # every expert's slice is here
                        del stacking[base]
                        yield base, torch.stack([pieces[i] for i in range(len(pieces))])

    def _bucket_plan(self, bucket_bytes: int) -> list[tuple[Bucket, list[str]]]:
        if bucket_bytes not in self._buckets:
            element_size = torch.empty((), dtype=self.placement.dtype).element_size()
            self._buckets[bucket_bytes] = [
                (bucket, sorted((n for p in bucket.plans for n in p.hf_names), key=self._order))
                for bucket in _buckets(self.module, self.placement, bucket_bytes, element_size)
            ]
        return self._buckets[bucket_bytes]


def _import(module: Module, name: str, ctx: ParallelContext, load: Loader, out: torch.Tensor, vocab: bool) -> None:
    """Parameter `name`'s import into `out`. A vocabulary parameter's shard is this rank's block
    of rows of the padded vocabulary (zeros past the HF rows): its import function, a row split,
    is given that block and a TP group of one."""
    if not vocab:
        module.IMPORTS[name](ctx, load, out=out)
        return
    rows = out.shape[0]
    first = ctx.tp.rank * rows

    def load_block(hf_name: str) -> torch.Tensor:
        return padded_block(load(hf_name), first, rows)

    module.IMPORTS[name](replace(ctx, tp=Group()), load_block, out=out)


def load_hf_checkpoint(
    module: Module,
    chunks: list[Any],
    hf_dir: str | Path,
    ctx: ParallelContext | None = None,
    *,
    make_vocab_size_divisible_by: int = 1,
) -> int:
    """`Converter(module, chunks, ctx, ...).load(hf_dir)`."""
    return Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by).load(hf_dir)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _checkpoint_problems(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """Names, shapes, file integrity, and the dtype of each tensor this rank loads against the
    tensor it loads into (an FP8 block-quantized weight is dequantized, so any model dtype)."""
    problems: list[str] = []
    plans = {p.megatron_name: p for p in module.PARAMS}
    into = {stacked_slice(n)[0]: t.dtype for name, t in placement.local.items() for n in plans[name].hf_names}
    for tensor in module.HF_TENSORS:
        if tensor.name not in checkpoint:
            problems.append(f"missing tensor '{tensor.name}'")
            continue
        shape = checkpoint.shape(tensor.name)
        if shape != tensor.shape:
            problems.append(
                f"tensor '{tensor.name}' has shape {list(shape)}, {module.TARGET} expects {list(tensor.shape)}"
            )
        stored, expected = checkpoint.dtype(tensor.name), into.get(tensor.name)
        if expected is None or checkpoint.quantized(tensor.name):
            continue
        if stored != _SAFETENSORS_DTYPES.get(expected, stored):
            model_dtype = str(expected).removeprefix("torch.")
            problems.append(f"tensor '{tensor.name}' is {stored}, the model is {model_dtype}")
    ignored = tuple(getattr(module, "IGNORED_HF", {}))
    known = {t.name for t in module.HF_TENSORS}
    unknown = sorted(n for n in checkpoint.names() if n not in known and not n.startswith(ignored))
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) in the checkpoint that {module.TARGET} does not map "
            f"(a checkpoint of another model?): {', '.join(unknown[:10])}"
        )
    problems += checkpoint.integrity_problems()
    return problems


@dataclass(frozen=True)
class Bucket:
    owner: int  # pp rank
    plans: tuple[ParamPlan, ...]


def _units(module: Module, placement: Placement) -> list[tuple[ParamPlan, ...]]:
    """What export moves together, in HF order: each parameter alone, except expert
    parameters: those of one MoE layer at the same local index on every EP rank form one unit,
    so that every EP rank contributes alike to the unit's gather."""
    assert placement.expert_ranks is not None
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    units: dict[tuple[object, ...], list[ParamPlan]] = {}
    for plan in module.PARAMS:
        if plan.expert is None:
            key: tuple[object, ...] = (plan.megatron_name,)
        else:
            key = (plan.layer, placement.expert_ranks[plan.megatron_name][1])
        units.setdefault(key, []).append(plan)
    return sorted((tuple(u) for u in units.values()), key=lambda u: min(hf_order(position, n) for p in u for n in p.hf_names))


def _buckets(module: Module, placement: Placement, bucket_bytes: int, element_size: int) -> list[Bucket]:
    buckets: list[Bucket] = []
    current: list[ParamPlan] = []
    size = 0
    owner = -1
    for unit in _units(module, placement):
        unit_owner = placement.owners[unit[0].megatron_name].pp_rank
        nbytes = sum(int(torch.Size(p.shape).numel()) for p in unit) * element_size
        if current and (unit_owner != owner or size + nbytes > bucket_bytes):
            buckets.append(Bucket(owner, tuple(current)))
            current, size = [], 0
        current.extend(unit)
        size += nbytes
        owner = unit_owner
    if current:
        buckets.append(Bucket(owner, tuple(current)))
    return buckets


def export_hf_tensors(
    module: Module,
    chunks: list[Any],
    ctx: ParallelContext | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    all_stages: bool = True,
    make_vocab_size_divisible_by: int = 1,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`Converter(module, chunks, ctx, ...).export(...)`: see `Converter.export`."""
    converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    return converter.export(bucket_bytes=bucket_bytes, all_stages=all_stages)


def _export_bucket(
    module: Module, plans: tuple[ParamPlan, ...], placement: Placement, ctx: ParallelContext
) -> dict[str, torch.Tensor]:
    """Every HF tensor of the bucket: shards gathered over TP (expert-TP), the export functions
    applied, then expert tensors gathered over EP."""
    mine = [p for p in plans if p.megatron_name in placement.local]
    parts: dict[str, list[torch.Tensor]] = {}
    for expert_parallel in (False, True):
        group = ctx.etp if expert_parallel else ctx.tp
        split = [p for p in mine if p.expert_parallel == expert_parallel and p.split_dim is not None]
        gathered = all_gather_coalesced(group, [placement.local[p.megatron_name].detach() for p in split])
        parts.update({p.megatron_name: g for p, g in zip(split, gathered)})
    produced: dict[str, torch.Tensor] = {}
    for plan in mine:
        shards = parts.get(plan.megatron_name) or [placement.local[plan.megatron_name].detach()]
        exported = module.EXPORTS[plan.megatron_name](shards)
        if plan.megatron_name in placement.vocab:  # the HF rows, without Megatron's padding
            exported = {n: t.narrow(0, 0, plan.shape[0]) for n, t in exported.items()}
        produced.update(exported)
    experts = [p for p in plans if p.expert is not None]
    if ctx.ep.size > 1 and experts:
        assert placement.expert_ranks is not None
        by_rank: list[list[str]] = [[] for _ in range(ctx.ep.size)]
        for plan in experts:
            by_rank[placement.expert_ranks[plan.megatron_name][0]].extend(plan.hf_names)
        gathered = all_gather_coalesced(ctx.ep, [produced[n] for n in by_rank[ctx.ep.rank]])
        for index, copies in enumerate(gathered):
            for rank, tensor in enumerate(copies):
                produced[by_rank[rank][index]] = tensor
    return produced


def save_hf_checkpoint(
    module: Module,
    chunks: list[Any],
    out_dir: str | Path,
    hf_config: dict[str, Any],
    ctx: ParallelContext | None = None,
    *,
    max_shard_bytes: int = 2 * 2**30,
    writer_rank: int = 0,
    make_vocab_size_divisible_by: int = 1,
) -> None:
    """Write an HF checkpoint directory (sharded safetensors, index, config.json) atomically.

    All ranks take part in the export; global rank `writer_rank` writes into a temporary folder
    beside `out_dir` and renames it into place only once every file is complete, so an
    interrupted save leaves no partial checkpoint behind."""
    ctx = ctx or ParallelContext.single()
    out = Path(out_dir)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    writing = rank == writer_rank
    problems = [f"{out} already exists"] if writing and out.exists() else []
    agree_or_raise(problems, f"cannot save {module.TARGET}")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent)) if writing else None
    try:
        element_size = next(_unwrap(chunks[0]).parameters()).element_size()
        shards = _shard_plan(module, max_shard_bytes, element_size)
        files = sorted(set(shards.values()))
        pending: dict[str, dict[str, torch.Tensor]] = {f: {} for f in files}
        expected = {f: sum(1 for v in shards.values() if v == f) for f in files}
        failure: str | None = None
        # every rank runs the whole export even after a write failed, so that no rank is left
        # waiting in a collective; the failure is then agreed on and raised everywhere
        converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        for name, tensor in converter.export():
            if staging is None or failure is not None:
                continue
            file = shards[name]
            pending[file][name] = tensor.contiguous()
            if len(pending[file]) == expected[file]:
                try:
                    save_file(pending.pop(file), str(staging / file), metadata={"format": "pt"})
                except OSError as exc:
                    failure = f"writing {out / file}: {exc}"
        agree_or_raise([failure] if failure else [], f"cannot save {module.TARGET} to {out}")
        if staging is not None:
            total = sum(int(torch.Size(t.shape).numel()) for t in module.HF_TENSORS) * element_size
            index = {"metadata": {"total_size": total}, "weight_map": shards}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            os.rename(staging, out)
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _shard_plan(module: Module, max_shard_bytes: int, element_size: int) -> dict[str, str]:
    """HF name -> file, filling files in HF order up to max_shard_bytes."""
    groups: list[list[str]] = [[]]
    size = 0
    for tensor in module.HF_TENSORS:
        nbytes = int(torch.Size(tensor.shape).numel()) * element_size
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor.name)
        size += nbytes
    total = len(groups)
    return {
        name: f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        for i, names in enumerate(groups)
        for name in names
    }
