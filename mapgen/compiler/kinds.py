"""The mapping kinds' registry: every kind by the name a spec gives it, one class per kind.

Each kind is defined once, in the module of its family: its HF roles, what the spec may say of
it, how it splits over TP, its shape checks, and the runtime calls it emits in both directions.
The interface is `mapgen.compiler.ir.Kind`; the families are `kinds_whole` (one whole HF tensor
per parameter: direct, column, row, replicated, auto, reshape, zero_centered_rmsnorm),
`kinds_merged` (several HF tensors' rows merged: qkv, kv, concat_qkv, vision_qkv, gated_mlp)
and `kinds_mixers` (the gated delta net's and Mamba-2's projections and convolutions).

Semantics follow Megatron-Bridge's mapping classes (param_mapping.py); "import" is HF ->
Megatron shard, "export" is Megatron shard -> full HF tensors. TP is the tensor-parallel group, or
the expert-tensor-parallel group for expert parameters. Adding a kind means adding one class to
its family's module, registering it in `KINDS` here, and its runtime functions in
`mapgen.runtime.ops`.

Every emitted expression is one runtime call whose arguments are literals: the import side reads
HF tensors through `load(name)` and writes into `out`; the export side turns `parts` (the shards
of every rank of the group, in rank order) into `{hf_name: tensor}`.
"""

from __future__ import annotations

from mapgen.compiler.ir import Kind
from mapgen.compiler.kinds_merged import KV, QKV, ConcatQKV, GatedMLP, VisionQKV
from mapgen.compiler.kinds_mixers import GDNConv1d, GDNInProj, GDNInProjSections, MambaConv1d, MambaInProj
from mapgen.compiler.kinds_whole import Auto, Column, Direct, Replicated, Reshape, Row, ZeroCenteredRMSNorm

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
