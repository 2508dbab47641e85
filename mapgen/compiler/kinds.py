"""The mapping kinds, each defined once: its HF roles, what the spec may say of it, how it splits
over TP, its shape checks, and the runtime calls it emits in both directions.

Semantics follow Megatron-Bridge's mapping classes (param_mapping.py); "import" is HF ->
Megatron shard, "export" is Megatron shard -> full HF tensors. TP is the tensor-parallel group, or
the expert-tensor-parallel group for expert parameters. Adding a kind means adding one class here
(and registering it in `KINDS`) and its runtime functions in `mapgen.runtime.ops`.

Every emitted expression is one runtime call whose arguments are literals: the import side reads
HF tensors through `load(name)` and writes into `out`; the export side turns `parts` (the shards
of every rank of the group, in rank order) into `{hf_name: tensor}`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from mapgen.common.errors import ErrorSink
from mapgen.common.layout import QKVGeometry, inverse_permutation
from mapgen.common.mamba import mamba_conv1d_sections, mamba_in_proj_sections
from mapgen.common.sections import gdn_in_proj_sections

if TYPE_CHECKING:
    from mapgen.common.dims import ModelDims
    from mapgen.compiler.config import HFConfig
    from mapgen.compiler.inventory import MegatronParam
    from mapgen.compiler.ir import HFSource, Mapping
    from mapgen.compiler.spec import Rule

SPLITS = ("column", "row", "replicated")

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
            "ZeroCenteredRMSNorm",  # mapgen's local stand-in for a zero-centred TENorm (megatron_model.py)
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


def load(source: HFSource) -> str:
    """The load of an HF tensor; a stacked-experts slice is a view of the stacked tensor."""
    if source.expert_slice is None:
        return f"load({source.name!r})"
    return f"load({source.name!r})[{source.expert_slice}]"


def _loads(m: Mapping) -> str:
    return ", ".join(load(s) for s in m.hf)


def _one_output(m: Mapping, value: str) -> str:
    return f"{{{m.hf[0].label!r}: {value}}}"


def _outputs(m: Mapping, values: str) -> str:
    return f"rt.named({values}, {', '.join(repr(s.label) for s in m.hf)})"


def _described(m: Mapping) -> str:
    return ", ".join(f"{s.label} {list(s.shape)}" for s in m.hf)


class Kind:
    """A mapping kind. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]] = ("hf",)
    # further role sets a rule may give instead of `roles` (told apart by their count or keys)
    alternative_roles: ClassVar[tuple[tuple[str, ...], ...]] = ()
    doc: ClassVar[str]
    # the roles when the checkpoint stacks the experts (the rule's `fused_hf`); () if it may not
    stacked_roles: ClassVar[tuple[str, ...]] = ()
    permutable: ClassVar[bool] = False  # takes `permute_dims`
    interleavable: ClassVar[bool] = False  # takes `interleaved` (a fused tensor's parts alternate)
    extra_keys: ClassVar[tuple[str, ...]] = ()  # rule keys only this kind takes (all required)
    merges_heads: ClassVar[bool] = False  # needs a QKVGeometry (`geometry`)
    fixed_split: ClassVar[str] = ""  # the TP split of a kind that implies one; auto decides per parameter

    @property
    def role_sets(self) -> tuple[tuple[str, ...], ...]:
        return (self.roles, *self.alternative_roles)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<kind {self.name}>"

    def split(self, param: MegatronParam, module_types: dict[str, str]) -> str | None:
        """column, row or replicated; None when it cannot be decided (an error)."""
        return self.fixed_split or None

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        return None

    def shape_problem(self, m: Mapping) -> str | None:
        raise NotImplementedError

    def import_expr(self, m: Mapping, group: str) -> str:
        raise NotImplementedError

    def export_expr(self, m: Mapping) -> str:
        raise NotImplementedError

    def describe(self, m: Mapping) -> str:
        """The kind as decided for this parameter, as docstrings and `explain` give it."""
        return self.name


class _WholeTensor(Kind):
    """One HF tensor of the Megatron shape, split as `split` says."""

    stacked_roles: ClassVar[tuple[str, ...]] = ("hf",)

    def shape_problem(self, m: Mapping) -> str | None:
        (source,) = m.hf
        shape = source.shape
        if m.permute_dims is not None:
            if len(m.permute_dims) != len(shape):
                return f"permute_dims {list(m.permute_dims)} does not fit {_described(m)}"
            shape = tuple(shape[d] for d in m.permute_dims)
        if shape != m.shape:
            return f"HF {_described(m)} does not match the Megatron shape {list(m.shape)}"
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
        return _one_output(m, value)


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
        "(see mapgen.compiler.kinds.resolve_auto). With permute_dims, import permutes the HF tensor "
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
            return f"cannot reshape {_described(m)} to {list(m.shape)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        return f"rt.reshape_import({group}, {load(m.hf[0])}, {m.shape!r}, {m.split_dim!r}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        gathered = {"column": "rt.column_export(parts)", "row": "rt.row_export(parts)"}.get(m.split, "parts[0]")
        return _one_output(m, f"{gathered}.reshape({m.hf[0].shape!r})")


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
        return _one_output(m, f"rt.zero_centered_to_hf({gathered})")


def _qkv_args(g: QKVGeometry, with_heads: bool = True) -> str:
    args = [f"groups={g.groups}", f"head_dim={g.head_dim}"]
    if with_heads:
        args.insert(0, f"heads={g.heads}")
    if g.gate:
        args.append("gate=True")
    return ", ".join(args)


class _Attention(Kind):
    """Kinds that merge attention rows per query group; always column-split."""

    merges_heads = True
    fixed_split = "column"

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        return QKVGeometry(dims.num_attention_heads, dims.num_query_groups, dims.kv_channels)

    def rows(self, g: QKVGeometry) -> dict[str, int]:
        """The HF rows of each role."""
        q_rows = g.heads * g.head_dim * (2 if g.gate else 1)
        kv_rows = g.groups * g.head_dim
        return {"q": q_rows, "k": kv_rows, "v": kv_rows, "hf": q_rows + 2 * kv_rows}

    def shape_problem(self, m: Mapping) -> str | None:
        assert m.qkv is not None
        g = m.qkv
        if g.heads % g.groups:
            return f"{g.groups} query groups do not divide {g.heads} heads"
        rows = self.rows(g)
        tail = m.shape[1:]
        sizes = f"({g.heads} heads, {g.groups} groups, head_dim {g.head_dim})"
        for source in m.hf:
            want = (rows[source.role], *tail)
            if source.shape != want:
                what = _described(m) if source.role == "hf" else f"{source.role} {list(source.shape)}"
                return f"HF {what} is not {list(want)} {sizes}"
        merged = (sum(rows[s.role] for s in m.hf), *tail)
        if merged != m.shape:
            return f"merged rows {list(merged)} do not match the Megatron shape {list(m.shape)}"
        return None


class QKV(_Attention):
    name = "qkv"
    roles = ("q", "k", "v")
    doc = (
        "Import: per query group g, rows [q heads of g, k_g, v_g] (with an attention output "
        "gate, HF q holds [q_h; gate_h] per head and the group is [q heads, gate heads, k_g, "
        "v_g]); weights and 1-D biases alike; then column-split. Export: gather, then the inverse."
    )

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        return QKVGeometry(dims.num_attention_heads, dims.num_query_groups, dims.kv_channels, dims.attention_output_gate)

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.qkv_import({group}, {_loads(m)}, {_qkv_args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _outputs(m, f"rt.qkv_export(parts, {_qkv_args(m.qkv)})")


class KV(_Attention):
    name = "kv"
    roles = ("k", "v")
    doc = "Import: per query group g, rows [k_g, v_g], then column-split. Export: gather, then the inverse."

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.kv_import({group}, {_loads(m)}, {_qkv_args(m.qkv, with_heads=False)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _outputs(m, f"rt.kv_export(parts, {_qkv_args(m.qkv, with_heads=False)})")


class ConcatQKV(_Attention):
    name = "concat_qkv"
    doc = (
        "HF holds one [Q; K; V] tensor (rows nh*d, ng*d, ng*d): import splits it and merges "
        "as qkv; export gathers, splits and concatenates back."
    )

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.concat_qkv_import({group}, {_loads(m)}, {_qkv_args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _one_output(m, f"rt.concat_qkv_export(parts, {_qkv_args(m.qkv)})")


class VisionQKV(ConcatQKV):
    name = "vision_qkv"
    doc = (
        "qkv (three HF tensors q, k, v: CLIP's q_proj, k_proj, v_proj) or concat_qkv (one "
        "[Q; K; V]) for a vision encoder, with as many query groups as heads; the rule's heads "
        "and head_dim give the encoder's sizes, which differ from the language model's. "
        "Weights and 1-D biases alike."
    )
    extra_keys = ("heads", "head_dim")
    alternative_roles = (("q", "k", "v"),)

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        if len(m.hf) == 3:
            return f"rt.qkv_import({group}, {_loads(m)}, {_qkv_args(m.qkv)}, out=out)"
        return super().import_expr(m, group)

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        if len(m.hf) == 3:
            return _outputs(m, f"rt.qkv_export(parts, {_qkv_args(m.qkv)})")
        return super().export_expr(m)

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        from mapgen.compiler.config import evaluate_in_context, evaluate_reported

        values: list[int] = []
        for key, expr in (("heads", rule.heads), ("head_dim", rule.head_dim)):
            assert expr is not None
            ok, value = evaluate_reported(
                lambda: int(evaluate_in_context(expr, dims, config)), errors, rule.loc, "vision_qkv", expr, config
            )
            if not ok:
                return None
            values.append(value)
        heads, head_dim = values
        return QKVGeometry(heads, heads, head_dim)


class GatedMLP(Kind):
    name = "gated_mlp"
    roles = ("gate", "up")
    stacked_roles = ("gate_up",)  # one slice of a stacked [E, 2I, H] tensor: [gate; up]
    alternative_roles = (("gate_up",),)  # one fused [2I, H] tensor, [gate; up] (Phi-3's gate_up_proj)
    doc = (
        "Import: rank r holds [gate_r; up_r], the r-th TP blocks of each. Export: gather, "
        "split every rank's block in halves, concatenate the gate halves and the up halves. "
        "One HF tensor [gate; up] (a single hf pattern, or a stacked-experts checkpoint's slice "
        "per expert) is halved along dim 0 on import and joined back on export; with "
        "`interleaved`, that fused tensor's rows alternate gate, up (gate rows 0, 2, ...), and "
        "`permute_dims` permutes it first (gpt-oss's [H, 2I] slices)."
    )
    fixed_split = "column"
    permutable = True
    interleavable = True

    def shape_problem(self, m: Mapping) -> str | None:
        if len(m.hf) == 1:  # [gate; up], or gate and up alternating
            shape = m.hf[0].shape
            if m.permute_dims is not None:
                if len(m.permute_dims) != len(shape):
                    return f"permute_dims {list(m.permute_dims)} does not fit {_described(m)}"
                shape = tuple(shape[d] for d in m.permute_dims)
            if shape != m.shape:
                what = "gate and up interleaved" if m.rule.interleaved else "[gate; up]"
                return f"{what} {_described(m)} is not the Megatron shape {list(m.shape)}"
            if shape[0] % 2:
                return f"{_described(m)} has an odd number of rows for gate and up"
            return None
        if m.permute_dims is not None or m.rule.interleaved:
            return "permute_dims and interleaved apply to one fused gate_up tensor, not to separate gate and up"
        gate, up = m.hf
        if gate.shape != up.shape:
            return f"gate and up differ: {_described(m)}"
        merged = (2 * gate.shape[0], *gate.shape[1:])
        return None if merged == m.shape else f"[gate; up] {list(merged)} is not the Megatron shape {list(m.shape)}"

    def import_expr(self, m: Mapping, group: str) -> str:
        if len(m.hf) == 1:
            value = _loads(m)
            if m.permute_dims is not None:
                value = f"{value}.permute({m.permute_dims!r})"
            split = "rt.alternate_rows" if m.rule.interleaved else "rt.halves"
            return f"rt.gated_mlp_import({group}, *{split}({value}), out=out)"
        return f"rt.gated_mlp_import({group}, {_loads(m)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        if len(m.hf) == 1:
            value = "rt.interleaved_gated_mlp_export(parts)" if m.rule.interleaved else "rt.fused_gated_mlp_export(parts)"
            if m.permute_dims is not None:
                value = f"rt.permute({value}, {inverse_permutation(m.permute_dims)!r})"
            return _one_output(m, value)
        return _outputs(m, "rt.gated_mlp_export(parts)")

    def describe(self, m: Mapping) -> str:
        return "gated_mlp, interleaved" if m.rule.interleaved else self.name


class _GatedDeltaNet(Kind):
    """Gated delta net projections (see mapgen.runtime.gdn): rows by key head, column-split so
    that every head's pieces stay on one TP rank."""

    merges_heads = True
    fixed_split = "column"

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        return QKVGeometry(
            dims.linear_num_value_heads,
            dims.linear_num_key_heads,
            dims.linear_key_head_dim,
            value_dim=dims.linear_value_head_dim,
        )

    @staticmethod
    def args(g: QKVGeometry) -> str:
        return f"key_dim={g.head_dim}, value_dim={g.value_dim}, v_per_k={g.heads // g.groups}"

    def sizes(self, g: QKVGeometry) -> str:
        return f"({g.groups} key heads of {g.head_dim}, {g.heads} value heads of {g.value_dim})"


class GDNInProj(_GatedDeltaNet):
    name = "gdn_in_proj"
    roles = ("qkvz", "ba")
    doc = (
        "Gated delta net input projection. HF in_proj_qkvz holds per key head h [q_h, k_h, v_h, z_h] "
        "(v_h, z_h: the h's r value heads), in_proj_ba per h [b_h, a_h]. Import: TP rank t holds "
        "[q_t; k_t; v_t; z_t; b_t; a_t], each the t-th TP block of its section (megatron-core's "
        "GatedDeltaNet.in_proj). Export: gather, split every rank's sections, re-pack per key head."
    )

    def shape_problem(self, m: Mapping) -> str | None:
        assert m.qkv is not None
        g = m.qkv
        assert g.value_dim is not None
        if g.groups <= 0 or g.heads % g.groups:
            return f"{g.groups} key heads do not divide {g.heads} value heads"
        r = g.heads // g.groups
        tail = m.shape[1:]
        want = {"qkvz": (g.groups * (2 * g.head_dim + 2 * r * g.value_dim), *tail), "ba": (g.groups * 2 * r, *tail)}
        for source in m.hf:
            if source.shape != want[source.role]:
                return f"HF {source.role} {list(source.shape)} is not {list(want[source.role])} {self.sizes(g)}"
        merged = want["qkvz"][0] + want["ba"][0]
        if (merged, *tail) != m.shape:
            return f"merged rows {merged} do not match the Megatron shape {list(m.shape)} {self.sizes(g)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.gdn_in_proj_import({group}, {_loads(m)}, {self.args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _outputs(m, f"rt.gdn_in_proj_export(parts, {self.args(m.qkv)})")


class GDNConv1d(_GatedDeltaNet):
    name = "gdn_conv1d"
    doc = (
        "Gated delta net causal convolution (weight [channels, 1, K] or bias). HF channels are "
        "[q; k; v] (all heads each); import: TP rank t holds [q_t; k_t; v_t], the t-th TP block of "
        "each. Export: gather, split every rank's three sections, concatenate each section's."
    )

    def shape_problem(self, m: Mapping) -> str | None:
        assert m.qkv is not None
        g = m.qkv
        assert g.value_dim is not None
        (source,) = m.hf
        channels = 2 * g.groups * g.head_dim + g.heads * g.value_dim
        if source.shape != m.shape or m.shape[0] != channels:
            return f"HF {_described(m)} and Megatron {list(m.shape)} are not {channels} channels {self.sizes(g)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.gdn_conv_import({group}, {_loads(m)}, {self.args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _one_output(m, f"rt.gdn_conv_export(parts, {self.args(m.qkv)})")


class GDNInProjSections(_GatedDeltaNet):
    name = "gdn_in_proj_sections"
    roles = ("qkv", "z", "b", "a")
    doc = (
        "Gated delta net input projection from four HF tensors in sections (Qwen3.5): in_proj_qkv "
        "[q (all key heads); k; v], in_proj_z, in_proj_b, in_proj_a. Import: TP rank t holds "
        "[q_t; k_t; v_t; z_t; b_t; a_t], each the t-th TP block of its section (megatron-core's "
        "GatedDeltaNet.in_proj; mapgen.common.sections). Export: gather, split every rank's "
        "sections, join each section's blocks, concatenate q, k, v back into in_proj_qkv."
    )

    @staticmethod
    def sections(g: QKVGeometry) -> tuple[tuple[int, ...], ...]:
        assert g.value_dim is not None
        return gdn_in_proj_sections(g.groups, g.heads, g.head_dim, g.value_dim)

    def shape_problem(self, m: Mapping) -> str | None:
        assert m.qkv is not None
        g = m.qkv
        if g.groups <= 0 or g.heads % g.groups:
            return f"{g.groups} key heads do not divide {g.heads} value heads"
        tail = m.shape[1:]
        for source, sizes in zip(m.hf, self.sections(g)):
            want = (sum(sizes), *tail)
            if source.shape != want:
                return f"HF {source.role} {list(source.shape)} is not {list(want)} {self.sizes(g)}"
        merged = sum(sum(sizes) for sizes in self.sections(g))
        if (merged, *tail) != m.shape:
            return f"merged rows {merged} do not match the Megatron shape {list(m.shape)} {self.sizes(g)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.sections_import({group}, {_loads(m)}, sections={self.sections(m.qkv)!r}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _outputs(m, f"rt.sections_export(parts, sections={self.sections(m.qkv)!r})")


class _MambaSections(Kind):
    """Mamba-2 mixer tensors whose rows are sections, each split over TP in equal blocks
    (mapgen.common.mamba, mapgen.runtime.sections). The geometry: heads are the mixer's heads,
    head_dim its head dim, groups its B/C groups and value_dim the SSM state size."""

    merges_heads = True
    fixed_split = "column"
    section_sizes = staticmethod(mamba_in_proj_sections)

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        return QKVGeometry(dims.mamba_num_heads, dims.mamba_num_groups, dims.mamba_head_dim, value_dim=dims.mamba_state_dim)

    def sections(self, g: QKVGeometry) -> tuple[tuple[int, ...], ...]:
        assert g.value_dim is not None
        return self.section_sizes(g.heads, g.head_dim, g.groups, g.value_dim)

    def shape_problem(self, m: Mapping) -> str | None:
        assert m.qkv is not None
        g = m.qkv
        sizes = f"({g.heads} heads of {g.head_dim}, {g.groups} groups of state {g.value_dim})"
        if g.groups <= 0 or g.heads % g.groups:
            return f"{g.groups} groups do not divide {g.heads} heads {sizes}"
        (source,) = m.hf
        (sections,) = self.sections(g)
        if source.shape != m.shape or m.shape[0] != sum(sections):
            return f"HF {_described(m)} and Megatron {list(m.shape)} are not the {sum(sections)} rows {list(sections)} {sizes}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.sections_import({group}, {_loads(m)}, sections={self.sections(m.qkv)!r}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return _outputs(m, f"rt.sections_export(parts, sections={self.sections(m.qkv)!r})")


class MambaInProj(_MambaSections):
    name = "mamba_in_proj"
    doc = (
        "Mamba-2 input projection (Nemotron-H): HF in_proj [z; x; B; C; dt] (z, x: heads x head_dim "
        "rows; B, C: groups x state; dt: heads). Import: TP rank t holds [z_t; x_t; B_t; C_t; dt_t], "
        "the t-th TP block of each section (megatron-core's MambaMixer.in_proj). Export: gather, "
        "split every rank's sections, join each section's blocks."
    )


class MambaConv1d(_MambaSections):
    name = "mamba_conv1d"
    doc = (
        "Mamba-2 causal convolution (weight [channels, 1, K] or bias), HF channels [x; B; C]. "
        "Import: TP rank t holds [x_t; B_t; C_t], the t-th TP block of each. Export: gather, split "
        "every rank's sections, join each section's blocks."
    )
    section_sizes = staticmethod(mamba_conv1d_sections)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Direct(),
        Column(),
        Row(),
        Replicated(),
        Auto(),
        QKV(),
        KV(),
        ConcatQKV(),
        VisionQKV(),
        GatedMLP(),
        Reshape(),
        ZeroCenteredRMSNorm(),
        GDNInProj(),
        GDNConv1d(),
        GDNInProjSections(),
        MambaInProj(),
        MambaConv1d(),
    )
}
