"""The sections of megatron-core's Mamba-2 mixer tensors that TP splits section by section: what the compiler's kinds and the runtime's shard map both size by."""

from __future__ import annotations


def mamba_in_proj_sections(heads: int, head_dim: int, groups: int, state: int) -> tuple[tuple[int, ...], ...]:
    """A Mamba-2 input projection as HF holds it, one tensor [z; x; B; C; dt]: z and x of
    heads * head_dim rows, B and C of groups * state, dt of heads (megatron-core's
    MambaMixer.in_proj holds on TP rank t [z_t; x_t; B_t; C_t; dt_t])."""
    inner, projected = heads * head_dim, groups * state
    return ((inner, inner, projected, projected, heads),)


def mamba_conv1d_sections(heads: int, head_dim: int, groups: int, state: int) -> tuple[tuple[int, ...], ...]:
    """A Mamba-2 causal convolution's channels (weight [channels, 1, K] and bias), one tensor
    [x; B; C] (megatron-core's rank t: [x_t; B_t; C_t])."""
    inner, projected = heads * head_dim, groups * state
    return ((inner, projected, projected),)
