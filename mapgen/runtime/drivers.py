"""Drivers: an HF checkpoint into Megatron model chunks, and Megatron chunks out as HF tensors.

A generated module is the plan; these only walk it. Local Megatron names become global ones
by the layer numbers megatron-core gave the chunk's layers (its own offset rules for PP/VPP).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol

import torch

from mapgen.errors import MapgenError
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.context import ParallelContext
from mapgen.runtime.plan import ExportFn, HFTensorPlan, ImportFn, ParamPlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


class ConversionError(MapgenError):
    pass


class MappingModule(Protocol):
    TARGET: str
    PARAMS: tuple[ParamPlan, ...]
    HF_TENSORS: tuple[HFTensorPlan, ...]
    IMPORTS: dict[str, ImportFn]
    EXPORTS: dict[str, ExportFn]


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def global_names(chunk: Any) -> dict[str, str]:
    """Local parameter name -> global name, for one model chunk."""
    model = _unwrap(chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    global_index = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    names: dict[str, str] = {}
    for name, _ in model.named_parameters():
        found = _LAYER.match(name)
        if found:
            name_global = f"decoder.layers.{global_index[found.group(1)]}." + name[found.end():]
        else:
            name_global = name
        names[name] = name_global
    return names


def local_shape(plan: ParamPlan, ctx: ParallelContext) -> tuple[int, ...]:
    group = ctx.etp if plan.expert_parallel else ctx.tp
    if plan.split_dim is None:
        return plan.shape
    shape = list(plan.shape)
    shape[plan.split_dim] //= group.size
    return tuple(shape)


def _check_split(plan: ParamPlan, ctx: ParallelContext) -> str | None:
    group = ctx.etp if plan.expert_parallel else ctx.tp
    if plan.split_dim is not None and plan.shape[plan.split_dim] % group.size:
        which = "expert-TP" if plan.expert_parallel else "TP"
        return (
            f"{plan.megatron_name}: dim {plan.split_dim} of {list(plan.shape)} does not split "
            f"over {which} size {group.size}"
        )
    return None


def _raise(problems: list[str], what: str) -> None:
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{what}:\n  " + "\n  ".join(shown))


def _owned_params(
    module: MappingModule | ModuleType, chunks: list[Any], ctx: ParallelContext
) -> list[tuple[ParamPlan, torch.nn.Parameter]]:
    """(plan, parameter) for every parameter of the chunks; raises if they don't fit the module."""
    plans = {plan.megatron_name: plan for plan in module.PARAMS}
    owned: list[tuple[ParamPlan, torch.nn.Parameter]] = []
    problems: list[str] = []
    for chunk in chunks:
        params = dict(_unwrap(chunk).named_parameters())
        for local, name in global_names(chunk).items():
            plan = plans.get(name)
            if plan is None:
                problems.append(f"model parameter '{name}' has no mapping in {module.TARGET}")
                continue
            split_problem = _check_split(plan, ctx)
            if split_problem:
                problems.append(split_problem)
                continue
            expected = local_shape(plan, ctx)
            actual = tuple(params[local].shape)
            if actual != expected:
                problems.append(
                    f"'{name}': the model's shard is {list(actual)}, {module.TARGET} expects "
                    f"{list(expected)} on this rank"
                )
                continue
            owned.append((plan, params[local]))
    _raise(problems, f"the model does not match the mapping module {module.TARGET}")
    return owned


def load_hf_checkpoint(
    module: MappingModule | ModuleType,
    chunks: list[Any],
    hf_dir: str,
    ctx: ParallelContext | None = None,
) -> int:
    """Fill every parameter of `chunks` from the HF checkpoint in `hf_dir`; returns the count.

    Everything is checked before any weight is written: the model against the module, the
    checkpoint's tensor names and shapes against the module's HF tensor table."""
    ctx = ctx or ParallelContext.single()
    owned = _owned_params(module, chunks, ctx)
    checkpoint = HFCheckpoint(hf_dir)
    hf_shapes = {t.name: t.shape for t in module.HF_TENSORS}
    problems: list[str] = []
    for plan, _ in owned:
        for name in plan.hf_names:
            if name not in checkpoint:
                problems.append(f"missing tensor '{name}' (needed by {plan.megatron_name})")
            elif checkpoint.shape(name) != hf_shapes[name]:
                problems.append(
                    f"tensor '{name}' has shape {list(checkpoint.shape(name))}, "
                    f"{module.TARGET} expects {list(hf_shapes[name])}"
                )
    _raise(problems, f"HF checkpoint {hf_dir} does not fit {module.TARGET}")
    with torch.no_grad():
        for plan, param in owned:
            shard = module.IMPORTS[plan.megatron_name](ctx, checkpoint.get)
            param.copy_(shard)
    return len(owned)


def export_hf_tensors(
    module: MappingModule | ModuleType,
    chunks: list[Any],
    ctx: ParallelContext | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every HF tensor the chunks hold, in HF order."""
    ctx = ctx or ParallelContext.single()
    owned = _owned_params(module, chunks, ctx)
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    owned.sort(key=lambda item: min(position[name] for name in item[0].hf_names))
    with torch.no_grad():
        for plan, param in owned:
            tensors = module.EXPORTS[plan.megatron_name](ctx, param.detach())
            yield from sorted(tensors.items(), key=lambda item: position[item[0]])
