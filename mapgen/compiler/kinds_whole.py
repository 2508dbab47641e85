"""The kinds that map one whole HF tensor to a Megatron parameter: direct, column, row, auto, ..."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from mapgen.common.layout import inverse_permutation
from mapgen.compiler.autosplit import resolve_auto
from mapgen.compiler.ir import Kind
from mapgen.compiler.kinds_emit import described, load, one_output

if TYPE_CHECKING:
    from mapgen.compiler.inventory import MegatronParam
    from mapgen.compiler.ir import Mapping


class _WholeTensor(Kind):
    """One HF tensor of the Megatron shape, split as `split` says."""

    stacked_roles: ClassVar[tuple[str, ...]] = ("hf",)

    def shape_problem(self, m: Mapping) -> str | None:
        (source,) = m.hf
        shape = source.shape
        if m.permute_dims is not None:
            if len(m.permute_dims) != len(shape):
                return f"permute_dims {list(m.permute_dims)} does not fit {described(m)}"
            shape = tuple(shape[d] for d in m.permute_dims)
        if shape != m.shape:
            return f"HF {described(m)} does not match the Megatron shape {list(m.shape)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        value = load(m.hf[0])
        if m.permute_dims is not None:
            value = f"{value}.permute({m.permute_dims!r})"
        if m.split == "column":
            return f"rt.column_import({group}, {value}, out=out)"
        if m.split == "row":
            return f"rt.row_import({group}, {value}, out=out)"
        return f"rt.whole_import({value}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        value = {"column": "rt.column_export(parts)", "row": "rt.row_export(parts)"}.get(m.split, "parts[0]")
        if m.permute_dims is not None:
            value = f"rt.permute({value}, {inverse_permutation(m.permute_dims)!r})"
        return one_output(m, value)


class Direct(_WholeTensor):
    name = "direct"
    doc = "Import: the HF tensor as is, on every rank. Export: the rank's tensor as is."
    fixed_split = "replicated"


class Column(_WholeTensor):
    name = "column"
    doc = (
        "Import: rank r takes the r-th of TP contiguous blocks along dim 0 (biases too). "
        "Export: all-gather over TP and concatenate along dim 0."
    )
    fixed_split = "column"


class Row(_WholeTensor):
    name = "row"
    doc = (
        "Import: rank r takes the r-th of TP contiguous blocks along dim 1; a 1-D bias is "
        "replicated. Export: all-gather over TP and concatenate along dim 1 (a bias is taken as is)."
    )
    fixed_split = "row"


class Replicated(_WholeTensor):
    name = "replicated"
    doc = "Import: every TP rank holds the whole tensor. Export: the rank's tensor as is."
    fixed_split = "replicated"


class Auto(_WholeTensor):
    name = "auto"
    doc = (
        "column, row or replicated, decided at build time from the owning Megatron module "
        "(see mapgen.compiler.autosplit.resolve_auto). With permute_dims, import permutes the HF tensor "
        "first and export applies the inverse permutation."
    )
    permutable = True

    def split(self, param: MegatronParam, module_types: dict[str, str]) -> str | None:
        return resolve_auto(param, module_types)

    def describe(self, m: Mapping) -> str:
        return f"auto -> {m.split}"


class Reshape(Auto):
    name = "reshape"
    doc = (
        "Import: reshape the HF tensor (row-major) to the Megatron shape, then shard as the "
        "owning module says. Export: gather, reshape to the HF shape."
    )
    permutable = False
    stacked_roles = ()

    def describe(self, m: Mapping) -> str:
        return "reshape"

    def shape_problem(self, m: Mapping) -> str | None:
        if math.prod(m.hf[0].shape) != math.prod(m.shape):
            return f"cannot reshape {described(m)} to {list(m.shape)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        return f"rt.reshape_import({group}, {load(m.hf[0])}, {m.shape!r}, {m.split_dim!r}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        gathered = {"column": "rt.column_export(parts)", "row": "rt.row_export(parts)"}.get(m.split, "parts[0]")
        return one_output(m, f"{gathered}.reshape({m.hf[0].shape!r})")


class ZeroCenteredRMSNorm(Auto):
    name = "zero_centered_rmsnorm"
    doc = (
        "Import: megatron = hf - 1 (Megatron's zero-centred gamma computes x*(1+w)); "
        "export: hf = megatron + 1; replicated. Exact only where w - 1 is representable."
    )
    permutable = False
    stacked_roles = ()

    def describe(self, m: Mapping) -> str:
        return "zero_centered_rmsnorm"

    def import_expr(self, m: Mapping, group: str) -> str:
        return f"rt.zero_centered_from_hf({load(m.hf[0])}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        gathered = {"column": "rt.column_export(parts)", "row": "rt.row_export(parts)"}.get(m.split, "parts[0]")
        return one_output(m, f"rt.zero_centered_to_hf({gathered})")
