"""MXFP4 (OCP microscaling FP4) tensors, as gpt-oss publishes its experts' weights.

A quantized HF tensor `X` is stored as two uint8 companions (transformers'
`integrations/mxfp4.py` reads them so):

- `X_blocks` [*prefix, R, G, 16]: 32 FP4 (e2m1) codes per block, two per byte, the element of
  even index in the low nibble, the odd one in the high nibble;
- `X_scales` [*prefix, R, G]: one e8m0 exponent per block, biased by 127 (the block's values are
  code value x 2^(scale - 127)).

Row r of the stored matrix holds G x 32 values; the tensor the model uses is that matrix
transposed: `X` is [*prefix, G * 32, R] (gpt-oss's `gate_up_proj` [E, H, 2I] is stored as
[E, 2I, H / 32, 16] blocks). Dequantizing is exact in float32 (a code has at most two significant
bits), and so in bfloat16 wherever the exponent stays in its range.
"""

from __future__ import annotations

import torch

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
BLOCK = 32  # values per block (16 bytes of two codes)
SCALE_BIAS = 127
# e2m1: sign, two exponent bits, one mantissa bit; code c (0..15) is E2M1[c]
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `X` from its blocks' shape [*prefix, R, G, 16]: [*prefix, G * 32, R]."""
    *prefix, rows, groups, _ = blocks_shape
    return (*prefix, groups * BLOCK, rows)


def companion_problem(name: str, blocks_shape: tuple[int, ...], blocks_dtype: str, scales_shape: tuple[int, ...], scales_dtype: str) -> str | None:
    """What is wrong with `name`'s two companions, if anything."""
    if blocks_dtype != "U8" or scales_dtype != "U8":
        return f"MXFP4 tensor '{name}': {name}{BLOCKS_SUFFIX} is {blocks_dtype} and {name}{SCALES_SUFFIX} {scales_dtype}; both must be U8"
    if len(blocks_shape) < 3 or blocks_shape[-1] != BLOCK // 2:
        return f"MXFP4 tensor '{name}': {name}{BLOCKS_SUFFIX} has shape {list(blocks_shape)}, not [..., rows, blocks, 16]"
    if tuple(scales_shape) != tuple(blocks_shape[:-1]):
        return (
            f"MXFP4 tensor '{name}': {name}{SCALES_SUFFIX} has shape {list(scales_shape)}, but its blocks "
            f"{list(blocks_shape)} need one scale per block: {list(blocks_shape[:-1])}"
        )
    return None


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`X` from its companions (any leading dims), as a new float32 tensor [*prefix, G * 32, R]
    (a transposed view of the row-major [*prefix, R, G * 32] values). No loop: one table lookup
    per nibble and one `ldexp` per value."""
    *prefix, rows, groups, half = blocks.shape
    table = torch.tensor(E2M1, dtype=torch.float32)
    codes = blocks.to(torch.uint8)
    values = torch.empty(*prefix, rows, groups, 2 * half, dtype=torch.float32)
    values[..., 0::2] = table[(codes & 0x0F).long()]
    values[..., 1::2] = table[(codes >> 4).long()]
    exponents = scales.to(torch.int32) - SCALE_BIAS
    torch.ldexp(values, exponents.unsqueeze(-1), out=values)
    return values.reshape(*prefix, rows, groups * 2 * half).transpose(-1, -2)


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The companions of `tensor` [*prefix, C, R] (C a multiple of 32): each block of 32 values of
    the transposed rows gets the smallest power-of-two scale under which its largest magnitude is
    at most 6, and each value the nearest e2m1 code (the smaller magnitude on a tie). Used to write MXFP4
    stand-ins; `dequantize` of the result is the tensor's quantized twin."""
    *prefix, columns, rows = tensor.shape
    if columns % BLOCK:
        raise ValueError(f"MXFP4 needs a multiple of {BLOCK} values per row, got {columns}")
    groups = columns // BLOCK
    values = tensor.to(torch.float32).transpose(-1, -2).reshape(*prefix, rows, groups, BLOCK)
    amax = values.abs().amax(dim=-1)
    # smallest e with amax / 2^e <= 6; all-zero blocks take the smallest scale
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / E2M1_MAX)), torch.full_like(amax, -SCALE_BIAS))
    exponent = exponent.clamp(-SCALE_BIAS, 255 - SCALE_BIAS)
    exponent = torch.where(torch.ldexp(torch.full_like(amax, E2M1_MAX), exponent) < amax, exponent + 1, exponent)
    scaled = torch.ldexp(values, -exponent.unsqueeze(-1).to(torch.int32))
    table = torch.tensor(E2M1[:8], dtype=torch.float32)  # magnitudes, codes 0..7
    distance = (scaled.abs().unsqueeze(-1) - table).abs()
    magnitude = distance.argmin(dim=-1)  # the smaller magnitude on a tie
    codes = (magnitude | ((scaled < 0).to(torch.long) << 3)).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()

