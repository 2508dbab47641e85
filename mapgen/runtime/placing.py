"""Matching this rank's model chunks against a mapping module: which parameter each chunk holds,
its shard's shape, and what stops a module and a layout from going together (`place`).

A generated module is the plan; `place` only walks it. `chunks` is the list of model chunks this
rank holds (one per virtual pipeline stage, in stage order). Which chunk holds which global
parameter follows from megatron-core's layer-offset rules (`ownership.py`), identically on
every rank."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from mapgen.common.layout import canonical_name, model_weights
from mapgen.runtime import memo, package
from mapgen.runtime.context import ParallelContext
from mapgen.runtime.ownership import Owner, expert_owner, experts_per_rank, layer_owners, local_name, param_owner
from mapgen.runtime.placement import Module, Placement
from mapgen.runtime.plan import ParamPlan
from mapgen.runtime.vocab import VOCAB_PARAMS, padded_rows_problem


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def num_experts(module: Module) -> int:
    if isinstance(getattr(module, "NUM_EXPERTS", None), int):  # a package's view: from DIMS
        return int(getattr(module, "NUM_EXPERTS"))
    return 1 + max((p.expert for p in module.PARAMS if p.expert is not None), default=-1)


def _weights(model: Any) -> list[tuple[str, torch.Tensor, bool]]:
    """A chunk's parameters, then its weight buffers (the router's expert_bias), as
    (name, tensor, whether it is a parameter)."""
    parameters, buffers = model_weights(model)
    return [(canonical_name(n), t, True) for n, t in parameters] + [(canonical_name(n), t, False) for n, t in buffers]


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
    nothing = Placement({}, {}, {}, torch.float32)
    if not isinstance(chunks, (list, tuple)):
        problems.append(
            f"chunks must be a list of this rank's model chunks (one per virtual pipeline stage), "
            f"not a {type(chunks).__name__}"
        )
        return nothing, problems
    if len(chunks) != ctx.vpp_size:
        problems.append(f"{len(chunks)} model chunks given for virtual pipeline size {ctx.vpp_size}")
        return nothing, problems
    models = [_unwrap(c) for c in chunks]
    for index, model in enumerate(models):
        if not hasattr(model, "config") or not callable(getattr(model, "named_parameters", None)):
            problems.append(
                f"model chunk {index} is a {type(model).__name__}, not a megatron-core model "
                "(it has no config or no named_parameters)"
            )
    if problems:
        return nothing, problems
    try:
        layers = layer_owners(models[0].config, ctx)
    except Exception as exc:  # noqa: BLE001 - megatron-core's own refusal, agreed on by the caller
        problems.append(f"megatron-core cannot place the layers of model chunk 0 under this layout: {exc}")
        return nothing, problems
    key = ("place", memo.layout_key(ctx), tuple(layers.items()))
    static = memo.once(module, key, lambda: _static_placement(module, layers, ctx))
    if isinstance(static, str):
        problems.append(static)
        return nothing, problems
    plans, owners, expert_ranks, expected_names, shapes = static
    expected = dict(expected_names)  # consumed below
    local: dict[str, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}
    dtypes: set[torch.dtype] = set()
    vocab = vocab_params(module)

    def shape_problem(name: str, plan: ParamPlan, actual: tuple[int, ...]) -> str | None:
        if plan.megatron_name not in vocab:
            return None if shapes.get(plan.megatron_name) == actual else _shape_problem(plan, actual, ctx, module.TARGET)
        if len(actual) != len(plan.shape) or actual[1:] != plan.shape[1:]:
            expected = ", ".join(map(str, plan.shape[1:]))
            return f"'{name}': the model's shard is {list(actual)}, {module.TARGET} expects [rows, {expected}]"
        return padded_rows_problem(name, actual[0], plan.shape[0], make_vocab_size_divisible_by, ctx.tp.size)
    for vp_stage, model in enumerate(models):
        for name, param, is_parameter in _weights(model):
            if is_parameter:
                dtypes.add(param.dtype)
            global_name = expected.pop((vp_stage, name), None)
            if global_name is not None and global_name not in vocab and shapes.get(global_name) == param.shape:
                local[global_name] = param  # the common case, checked at once
                continue
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
    return Placement(owners, local, tied, dtype, expert_ranks, vocab, key), problems


_StaticPlacement = tuple[
    dict[str, ParamPlan],
    dict[str, Owner],
    dict[str, tuple[int, int]],
    dict[tuple[int, str], str],
    dict[str, tuple[int, ...]],
]


def _static_placement(module: Module, layers: dict[int, tuple[Owner, int]], ctx: ParallelContext) -> _StaticPlacement | str:
    """What `place` knows before it looks at the model: every parameter's plan, owner and
    expert rank, and the (chunk, local name) -> global name of this rank's parameters; or the
    problem that stops it (made once per module and layout: `memo`); and the shard shape each
    parameter must have on this rank, where it splits evenly."""
    plans = {p.megatron_name: p for p in module.PARAMS}
    num_layers = getattr(module, "NUM_LAYERS", None)
    if not isinstance(num_layers, int):
        num_layers = 1 + max((p.layer for p in module.PARAMS if p.layer is not None), default=-1)
    if len(layers) != num_layers:
        return f"the model has {len(layers)} decoder layers, {module.TARGET} has {num_layers}"
    try:
        per_rank = experts_per_rank(num_experts(module), ctx)
    except ValueError as exc:
        return f"{module.TARGET}: {exc}"
    owners = {name: param_owner(plan, layers, ctx) for name, plan in plans.items()}
    expert_ranks = {n: expert_owner(p, per_rank) for n, p in plans.items() if p.expert is not None}
    expected: dict[tuple[int, str], str] = {}
    for name, plan in plans.items():
        owner = owners[name]
        mine = name not in expert_ranks or expert_ranks[name][0] == ctx.ep.rank
        if owner.pp_rank == ctx.pp.rank and mine:
            expected[(owner.vp_stage, local_name(plan, layers, per_rank))] = name
    shapes = {name: local_shape(plan, ctx) for name, plan in plans.items() if _shape_problem(plan, local_shape(plan, ctx), ctx, "") is None}
    return plans, owners, expert_ranks, expected, shapes


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


def llava_problems(module: Module, tp: int, stages: int) -> list[str]:
    """A LLaVAModel module's refusals: pipeline stages (megatron-core's LLaVAModel keeps the
    vision tower and projector on the first stage only; mapgen places parameters by the
    language model's layers), and TP not dividing the vision tower's heads."""
    dims = getattr(module, "DIMS", None)
    if getattr(module, "MODEL", "gpt") != "llava" or dims is None:
        return []
    found = []
    if stages > 1:
        found.append(
            f"pp x vpp {stages}: {module.TARGET} is a LLaVAModel, supported without pipeline parallelism only "
            "(megatron-core puts its vision tower on the first stage)"
        )
    if dims.vision_num_attention_heads % tp:
        found.append(f"tp {tp} does not divide the {dims.vision_num_attention_heads} vision attention heads of {module.TARGET}")
    return found


def module_layout_problems(module: Module, ctx: ParallelContext) -> list[str]:
    """Divisibility the generated functions rely on (query groups over TP)."""
    dims = getattr(module, "DIMS", None)
    if dims is not None and getattr(module, "MODEL", "gpt") == "llava":
        return llava_problems(module, ctx.tp.size, ctx.pp.size * ctx.vpp_size) + (
            [] if dims.num_query_groups % ctx.tp.size == 0 else [
                f"TP size {ctx.tp.size} does not divide the {dims.num_query_groups} query groups "
                f"(KV heads) of {module.TARGET}"
            ]
        )
    if dims is None or dims.num_query_groups % ctx.tp.size == 0:
        return []
    return [
        f"TP size {ctx.tp.size} does not divide the {dims.num_query_groups} query groups "
        f"(KV heads) of {module.TARGET}"
    ]


def chunks_view(module: Module, chunks: Any, ctx: ParallelContext) -> Any:
    """What a Converter walks on this rank: a one-file module as it is; of a target package, the
    parts that hold this rank's layers and experts (`package.rank_view`), or the whole package
    where the chunks do not say which layers they hold (`place` then reports why)."""
    if not isinstance(module, ModuleType) or not package.is_package(module):
        return module
    try:
        models = [_unwrap(c) for c in chunks]
        layers = layer_owners(models[0].config, ctx)
        per_rank = experts_per_rank(module.DIMS.num_moe_experts or 0, ctx) if module.DIMS.num_moe_experts else 0
    except Exception:  # noqa: BLE001 - `place` finds and words the same problem on the whole view
        return package.whole_view(module)
    mine = [layer for layer, (owner, _) in layers.items() if owner.pp_rank == ctx.pp.rank]
    first = ctx.ep.rank * per_rank
    return package.rank_view(module, mine, (first, first + per_rank) if per_rank else (0, 1 << 62))
