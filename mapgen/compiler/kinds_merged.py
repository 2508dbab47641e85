"""The kinds that merge several HF tensors' rows into one parameter: attention's q, k, v; gate and up."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mapgen.common.errors import ErrorSink
from mapgen.common.layout import QKVGeometry, inverse_permutation
from mapgen.compiler.hfconfig import HFConfig, evaluate_in_context, evaluate_reported
from mapgen.compiler.ir import Kind
from mapgen.compiler.kinds_emit import described, loads, one_output, outputs

if TYPE_CHECKING:
    from mapgen.common.dims import ModelDims
    from mapgen.compiler.ir import Mapping, Rule


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
                what = described(m) if source.role == "hf" else f"{source.role} {list(source.shape)}"
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
        return f"rt.qkv_import({group}, {loads(m)}, {_qkv_args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return outputs(m, f"rt.qkv_export(parts, {_qkv_args(m.qkv)})")


class KV(_Attention):
    name = "kv"
    roles = ("k", "v")
    doc = "Import: per query group g, rows [k_g, v_g], then column-split. Export: gather, then the inverse."

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.kv_import({group}, {loads(m)}, {_qkv_args(m.qkv, with_heads=False)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return outputs(m, f"rt.kv_export(parts, {_qkv_args(m.qkv, with_heads=False)})")


class ConcatQKV(_Attention):
    name = "concat_qkv"
    doc = (
        "HF holds one [Q; K; V] tensor (rows nh*d, ng*d, ng*d): import splits it and merges "
        "as qkv; export gathers, splits and concatenates back."
    )

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.concat_qkv_import({group}, {loads(m)}, {_qkv_args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return one_output(m, f"rt.concat_qkv_export(parts, {_qkv_args(m.qkv)})")


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
            return f"rt.qkv_import({group}, {loads(m)}, {_qkv_args(m.qkv)}, out=out)"
        return super().import_expr(m, group)

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        if len(m.hf) == 3:
            return outputs(m, f"rt.qkv_export(parts, {_qkv_args(m.qkv)})")
        return super().export_expr(m)

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
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
                    return f"permute_dims {list(m.permute_dims)} does not fit {described(m)}"
                shape = tuple(shape[d] for d in m.permute_dims)
            if shape != m.shape:
                what = "gate and up interleaved" if m.rule.interleaved else "[gate; up]"
                return f"{what} {described(m)} is not the Megatron shape {list(m.shape)}"
            if shape[0] % 2:
                return f"{described(m)} has an odd number of rows for gate and up"
            return None
        if m.permute_dims is not None or m.rule.interleaved:
            return "permute_dims and interleaved apply to one fused gate_up tensor, not to separate gate and up"
        gate, up = m.hf
        if gate.shape != up.shape:
            return f"gate and up differ: {described(m)}"
        merged = (2 * gate.shape[0], *gate.shape[1:])
        return None if merged == m.shape else f"[gate; up] {list(merged)} is not the Megatron shape {list(m.shape)}"

    def import_expr(self, m: Mapping, group: str) -> str:
        if len(m.hf) == 1:
            value = loads(m)
            if m.permute_dims is not None:
                value = f"{value}.permute({m.permute_dims!r})"
            split = "rt.alternate_rows" if m.rule.interleaved else "rt.halves"
            return f"rt.gated_mlp_import({group}, *{split}({value}), out=out)"
        return f"rt.gated_mlp_import({group}, {loads(m)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        if len(m.hf) == 1:
            value = "rt.interleaved_gated_mlp_export(parts)" if m.rule.interleaved else "rt.fused_gated_mlp_export(parts)"
            if m.permute_dims is not None:
                value = f"rt.permute({value}, {inverse_permutation(m.permute_dims)!r})"
            return one_output(m, value)
        return outputs(m, "rt.gated_mlp_export(parts)")

    def describe(self, m: Mapping) -> str:
        return "gated_mlp, interleaved" if m.rule.interleaved else self.name
