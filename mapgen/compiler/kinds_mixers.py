"""The kinds of the gated delta net's and Mamba-2's mixers: rows by key head or by section, over TP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mapgen.common.layout import QKVGeometry
from mapgen.common.mamba import mamba_conv1d_sections, mamba_in_proj_sections
from mapgen.common.sections import gdn_in_proj_sections
from mapgen.compiler.ir import Kind
from mapgen.compiler.kinds_emit import described, loads, one_output, outputs

if TYPE_CHECKING:
    from mapgen.common.dims import ModelDims
    from mapgen.common.errors import ErrorSink
    from mapgen.compiler.hfconfig import HFConfig
    from mapgen.compiler.ir import Mapping, Rule


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
        return f"rt.gdn_in_proj_import({group}, {loads(m)}, {self.args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return outputs(m, f"rt.gdn_in_proj_export(parts, {self.args(m.qkv)})")


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
            return f"HF {described(m)} and Megatron {list(m.shape)} are not {channels} channels {self.sizes(g)}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.gdn_conv_import({group}, {loads(m)}, {self.args(m.qkv)}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return one_output(m, f"rt.gdn_conv_export(parts, {self.args(m.qkv)})")


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
        return f"rt.sections_import({group}, {loads(m)}, sections={self.sections(m.qkv)!r}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return outputs(m, f"rt.sections_export(parts, sections={self.sections(m.qkv)!r})")


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
            return f"HF {described(m)} and Megatron {list(m.shape)} are not the {sum(sections)} rows {list(sections)} {sizes}"
        return None

    def import_expr(self, m: Mapping, group: str) -> str:
        assert m.qkv is not None
        return f"rt.sections_import({group}, {loads(m)}, sections={self.sections(m.qkv)!r}, out=out)"

    def export_expr(self, m: Mapping) -> str:
        assert m.qkv is not None
        return outputs(m, f"rt.sections_export(parts, sections={self.sections(m.qkv)!r})")


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
