"""How kind `auto` decides a parameter's TP split: by the Megatron module that owns it.

`MODULE_TYPES` is Megatron-Bridge's AutoMapping registry of module classes and their split; a
spec's `module_types` adds to and overrides it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mapgen.compiler.inventory import MegatronParam

# Megatron module classes whose TP treatment `auto` knows without looking further
# (Megatron-Bridge's AutoMapping registry). A spec's `module_types` adds to and overrides these.
MODULE_TYPES: dict[str, str] = {
    **{
        name: "column"
        for name in (
            "ColumnParallelLinear",
            "TEColumnParallelLinear",
            "TELayerNormColumnParallelLinear",
            "TEColumnParallelGroupedLinear",
            "VocabParallelEmbedding",
            "DotProductAttention",
            "TEDotProductAttention",
        )
    },
    **{name: "row" for name in ("RowParallelLinear", "TERowParallelLinear", "TERowParallelGroupedLinear")},
    **{
        name: "replicated"
        for name in (
            "TENorm",
            "FusedLayerNorm",
            "WrappedTorchNorm",
            "LayerNorm",
            "RMSNorm",
            "L2Norm",
            "IdentityOp",
            "TopKRouter",
            "ZeroCenteredRMSNorm",  # mapgen's local stand-in for a zero-centred TENorm (cpu_layers.py)
        )
    },
}

# the norm fused into a TE column linear: its weight and bias are replicated, the rest is column
FUSED_NORM_LINEARS = ("TELayerNormColumnParallelLinear",)
FUSED_NORM_LEAVES = ("layer_norm_weight", "layer_norm_bias")


def resolve_auto(param: MegatronParam, module_types: dict[str, str]) -> str | None:
    """column / row / replicated for `param`, by the owning module; None when undecidable.

    Order: the norm of a layer-norm-fused column linear (replicated); the module-type registry;
    megatron-core's own partition of the parameter; TELinear by its parallel_mode.
    """
    kind = param.module_kind
    if kind in FUSED_NORM_LINEARS and param.name.rsplit(".", 1)[-1] in FUSED_NORM_LEAVES:
        return "replicated"
    if kind in module_types:
        return module_types[kind]
    if param.partition_dim == 0:
        return "column"
    if param.partition_dim == 1:
        return "row"
    if kind == "TELinear":
        return {"column": "column", "row": "row"}.get(param.parallel_mode or "", "replicated")
    return None
