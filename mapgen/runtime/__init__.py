"""mapgen.runtime: the one library every generated mapping module calls."""

from mapgen.common.dims import ModelDims
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.ops import (
    alternate_rows,
    column_export,
    column_import,
    concat_qkv_export,
    concat_qkv_import,
    gated_mlp_export,
    gated_mlp_import,
    halves,
    interleaved_gated_mlp_export,
    kv_export,
    kv_import,
    qkv_export,
    qkv_import,
    reshape_import,
    row_export,
    row_import,
    stacked_gated_mlp_export,
    whole_import,
)
from mapgen.common.layout import QKVGeometry
from mapgen.runtime.plan import ExportFn, HFTensorPlan, ImportFn, Loader, ParamPlan, RulePlan
from mapgen.runtime.transforms import (
    inverse_permutation,
    permute,
    zero_centered_from_hf,
    zero_centered_to_hf,
)

__all__ = [
    "ExportFn",
    "Group",
    "HFTensorPlan",
    "ImportFn",
    "Loader",
    "ModelDims",
    "ParallelContext",
    "ParamPlan",
    "QKVGeometry",
    "RulePlan",
    "alternate_rows",
    "column_export",
    "column_import",
    "concat_qkv_export",
    "concat_qkv_import",
    "gated_mlp_export",
    "gated_mlp_import",
    "halves",
    "interleaved_gated_mlp_export",
    "inverse_permutation",
    "kv_export",
    "kv_import",
    "permute",
    "qkv_export",
    "qkv_import",
    "reshape_import",
    "row_export",
    "row_import",
    "stacked_gated_mlp_export",
    "whole_import",
    "zero_centered_from_hf",
    "zero_centered_to_hf",
]
