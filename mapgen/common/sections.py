"""The sections of a gated delta net's input projection: what the compiler's kind and the runtime's shard map both size by."""

from __future__ import annotations


def gdn_in_proj_sections(key_heads: int, value_heads: int, key_dim: int, value_dim: int) -> tuple[tuple[int, ...], ...]:
    """The sections of a gated delta net's input projection as Qwen3.5's transformers model
    holds it: in_proj_qkv [q (nk*dk); k (nk*dk); v (nv*dv)], in_proj_z [nv*dv], in_proj_b [nv],
    in_proj_a [nv] (megatron-core's beta and alpha)."""
    qk, v = key_heads * key_dim, value_heads * value_dim
    return ((qk, qk, v), (v,), (value_heads,), (value_heads,))
