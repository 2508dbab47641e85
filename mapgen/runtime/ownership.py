"""Static ownership: which pipeline stage (and virtual stage) holds each global parameter, and
which EP rank holds each expert, by megatron-core's own layer-offset rules. Every rank computes
the same answer without asking any other."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mapgen.runtime.context import ParallelContext
from mapgen.runtime.plan import ParamPlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# the expert index in a SequentialMLP (local) or grouped (te) expert parameter name
_EXPERT = (
    re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)"),
    re.compile(r"(\.mlp\.experts\.linear_fc[12]\.[a-z_]+?)(\d+)()$"),
)


@dataclass(frozen=True)
class Owner:
    pp_rank: int
    vp_stage: int


def layer_owners(config: Any, ctx: ParallelContext) -> dict[int, tuple[Owner, int]]:
    """Global layer -> (owner, index of the layer inside that chunk), for the model config."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    owners: dict[int, tuple[Owner, int]] = {}
    vpp = ctx.vpp_size
    for pp_rank in range(ctx.pp.size):
        for vp_stage in range(vpp):
            stage = vp_stage if vpp > 1 else None
            offset = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=pp_rank)
            count = get_num_layers_to_build(config, vp_stage=stage, pp_rank=pp_rank)
            for local in range(count):
                owners[offset + local] = (Owner(pp_rank, vp_stage), local)
    return owners


def param_owner(plan: ParamPlan, layers: dict[int, tuple[Owner, int]], ctx: ParallelContext) -> Owner:
    if plan.layer is not None:
        return layers[plan.layer][0]
    if plan.megatron_name.startswith("embedding."):
        return Owner(0, 0)
    return Owner(ctx.pp.size - 1, ctx.vpp_size - 1)


def experts_per_rank(num_experts: int, ctx: ParallelContext) -> int:
    if num_experts % ctx.ep.size:
        raise ValueError(f"{num_experts} experts do not split over expert-parallel size {ctx.ep.size}")
    return num_experts // ctx.ep.size


def expert_owner(plan: ParamPlan, per_rank: int) -> tuple[int, int]:
    """(EP rank that holds the plan's expert, the expert's index on that rank); EP ranks hold
    consecutive blocks of experts, as megatron-core's MoE layer assigns them."""
    assert plan.expert is not None
    return plan.expert // per_rank, plan.expert % per_rank


def local_name(plan: ParamPlan, layers: dict[int, tuple[Owner, int]], per_rank: int = 0) -> str:
    """The parameter's name inside the model chunk that owns it (local layer and expert index)."""
    name = plan.megatron_name
    if plan.layer is not None:
        index = layers[plan.layer][1]
        name = _LAYER.sub(f"decoder.layers.{index}.", name, count=1)
    if plan.expert is None:  # (an expert outside the decoder: the MTP block's transformer layer)
        return name
    local = expert_owner(plan, per_rank)[1]
    for pattern in _EXPERT:
        name, found = pattern.subn(rf"\g<1>{local}\g<3>", name, count=1)
        if found:
            return name
    raise ValueError(f"{plan.megatron_name}: expert {plan.expert} is not in its name")
