"""MXFP8 and NVFP4 weight quantization for export: the quantizers, their decoders, the tensors each
writes beside a weight, and the quantization_config an inference engine reads them by.

**MXFP8** (OCP Microscaling Formats v1.0, element type E4M3, block 32), in the layout
compressed-tensors' `mxfp8-quantized` format and vLLM's `CompressedTensorsW8A8Mxfp8` load:

- `X` float8_e4m3fn, the weight's own shape [rows, cols];
- `X_scale` uint8 [rows, cols / 32]: one E8M0 scale per 32 consecutive elements of a row, the
  biased exponent (value = 2^(byte - 127)); a block's values are `code * 2^(byte - 127)`.

The scale is the smallest power of two that keeps the block's largest magnitude within E4M3's
448 (ModelOpt's `MXFP8QTensor`, torchao's `RCEIL` and cuBLAS's MXFP8 rounding): nothing
saturates, and each element carries E4M3's own rounding error (at most 2^-4 relative, or half of
E4M3's smallest subnormal step times the scale). A block of zeros gets byte 0.

**NVFP4** (NVIDIA's FP4: E2M1 values in blocks of 16 with an E4M3 block scale and a float32
per-tensor scale), as NVIDIA ModelOpt's `NVFP4QTensor` writes a weight and vLLM's ModelOpt
loaders read it:

- `X` uint8 [rows, cols / 2]: two E2M1 codes per byte, the element of even index in the low
  nibble;
- `X_scale` float8_e4m3fn [rows, cols / 16]: per block, its largest magnitude / (6 · `X_scale_2`),
  clamped to [2^-9, 448] (a block of zeros: 1.0);
- `X_scale_2` float32, one value (shape []): the tensor's largest magnitude / (6 · 448); the
  tensors one Megatron parameter exports (q, k and v; gate and up) share it, as engines that fuse
  them need (vLLM takes one global scale per fused layer).

A value is `E2M1[code] · X_scale · X_scale_2`; the codes are the nearest E2M1 value of
x / (X_scale · X_scale_2), ties to the even code, saturating at ±6.

**Configs.** MXFP8 writes a compressed-tensors quantization_config (`quant_method`
"compressed-tensors", format "mxfp8-quantized", the `MXFP8` preset's weight and dynamic
activation arguments, `ignore` listing every unquantized 2-d weight's module); NVFP4 writes what
ModelOpt's Megatron export writes (`hf_quant_config.json` with `quant_algo` "W4A16_NVFP4",
`group_size` 16 and `exclude_modules`, and its llm-compressor form in config.json with
`quant_method` "modelopt"). W4A16: the activation scales of W4A4 `NVFP4` (`input_scale`) come
from calibration, which a weight export does not do.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

import torch

from mapgen.common.errors import MapgenError

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MX_BLOCK = 32  # MXFP8: elements per E8M0 scale, along the row
NVFP4_BLOCK = 16  # NVFP4: elements per E4M3 scale, along the row
E8M0_BIAS = 127
E2M1_MAX = 6.0
# E2M1 code c (0..15): sign bit 3, magnitude E2M1_VALUES[c & 7]
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# the midpoints between neighbouring E2M1 magnitudes; at the odd-indexed ones (0.75, 1.75, 3.5)
# a tie rounds up, to the even code above
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
NVFP4_SCALE_MIN = 2.0**-9  # the smallest E4M3 subnormal: a block scale is clamped to it
# bytes of quantization temporaries per element, at their most at once
MXFP8_TEMP_BYTES = 9  # the float32 copy (4), the scaled values (4), the codes (1)
NVFP4_TEMP_BYTES = 20  # float32 copy (4), quotient (4), magnitudes (4), bucket index (4), codes, sign, masks (4)

SCHEMES = ("fp8", "mxfp8", "nvfp4")
SCALE = "_scale"  # MXFP8's and NVFP4's block scales: `X_scale`
GLOBAL_SCALE = "_scale_2"  # NVFP4's per-tensor scale: `X_scale_2`
MODELOPT_VERSION = "0.39.0"  # the ModelOpt release whose config layout the written configs follow


class QuantizeError(MapgenError, ValueError):
    """A tensor or a quantization request that MXFP8 / NVFP4 export cannot serve."""


# --- MXFP8 ----------------------------------------------------------------------------------


def mxfp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], shape[-1] // MX_BLOCK)


def quantize_mxfp8(
    weight: torch.Tensor, out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 of `weight` (last dim a multiple of 32): E4M3 codes of its shape and uint8 E8M0
    scales [..., cols / 32], written into `out` / `scale_out` when given. Vectorized."""
    cols = weight.shape[-1]
    if cols % MX_BLOCK:
        raise QuantizeError(f"MXFP8 needs a last dim divisible by {MX_BLOCK}, not {tuple(weight.shape)}")
    x = weight.to(torch.float32)
    blocks = x.reshape(*weight.shape[:-1], cols // MX_BLOCK, MX_BLOCK)
    amax = torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg())
    # amax = m * 2^e with m in [0.5, 1): the smallest X with amax <= 448 * 2^X = 0.875 * 2^(9 + X)
    mantissa, exponent = torch.frexp(amax)
    power = exponent - 9 + (mantissa > 0.875).to(exponent.dtype)
    power = torch.where(amax == 0, torch.full_like(power, -E8M0_BIAS), power).clamp_(-E8M0_BIAS, E8M0_BIAS)
    del mantissa, exponent, amax
    scaled = torch.ldexp(blocks, power.neg().unsqueeze(-1))
    del x, blocks
    codes = scaled.to(FP8).view(weight.shape)
    del scaled
    biased = (power + E8M0_BIAS).to(torch.uint8)
    if out is None:
        out = codes
    else:
        out.copy_(codes)
    if scale_out is None:
        scale_out = biased
    else:
        scale_out.copy_(biased)
    return out, scale_out


def dequantize_mxfp8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of MXFP8 codes and their E8M0 scales."""
    values = codes.to(torch.float32)
    blocks = values.view(*codes.shape[:-1], codes.shape[-1] // MX_BLOCK, MX_BLOCK)
    blocks.mul_(torch.exp2(scales.to(torch.float32) - E8M0_BIAS).unsqueeze(-1))
    return values


# --- NVFP4 ----------------------------------------------------------------------------------


def nvfp4_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The packed codes' and the block scales' shapes of a weight of `shape`."""
    return (*shape[:-1], shape[-1] // 2), (*shape[:-1], shape[-1] // NVFP4_BLOCK)


def amax(tensor: torch.Tensor) -> torch.Tensor:
    """The largest magnitude, as a float32 scalar tensor."""
    return torch.maximum(tensor.max(), tensor.min().neg()).to(torch.float32)


def quantize_nvfp4(
    weight: torch.Tensor,
    global_amax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    global_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 of `weight` (last dim a multiple of 16): packed E2M1 codes (uint8), E4M3 block
    scales and the float32 per-tensor scale, from `global_amax` (the largest magnitude over the
    tensors that share the per-tensor scale; default: this one's), written into `out`,
    `scale_out` and `global_out` when given."""
    cols = weight.shape[-1]
    if cols % NVFP4_BLOCK:
        raise QuantizeError(f"NVFP4 needs a last dim divisible by {NVFP4_BLOCK}, not {tuple(weight.shape)}")
    largest = amax(weight) if global_amax is None else global_amax.to(torch.float32)
    if float(largest) == 0.0:  # all zeros: any scale gives zero codes; this one avoids 0 / 0
        largest = torch.tensor(E2M1_MAX * E4M3_MAX, dtype=torch.float32)
    global_scale = largest / (E2M1_MAX * E4M3_MAX)
    x = weight.to(torch.float32)
    blocks = x.reshape(*weight.shape[:-1], cols // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg())
    per_block = block_amax / (E2M1_MAX * global_scale)
    per_block = torch.where(per_block == 0, torch.ones_like(per_block), per_block)
    block_scale = per_block.clamp_(min=NVFP4_SCALE_MIN, max=E4M3_MAX).to(FP8)
    del block_amax, per_block
    quotient = blocks / (block_scale.to(torch.float32) * global_scale).unsqueeze(-1)
    del x, blocks
    negative = quotient < 0
    magnitude = quotient.abs_()
    index = torch.bucketize(magnitude, torch.tensor(E2M1_BOUNDS, dtype=torch.float32), out_int32=True)
    # a tie at 0.75, 1.75 or 3.5 goes up to the even code (bucketize put it below)
    ties = (magnitude == 0.75) | (magnitude == 1.75) | (magnitude == 3.5)
    del magnitude, quotient
    codes = index.to(torch.uint8).add_(ties.to(torch.uint8)).bitwise_or_(negative.to(torch.uint8) << 3)
    del index, ties, negative
    codes = codes.view(*weight.shape[:-1], cols // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    del codes
    if out is None:
        out = packed
    else:
        out.copy_(packed)
    if scale_out is None:
        scale_out = block_scale
    else:
        scale_out.copy_(block_scale)
    if global_out is None:
        global_out = global_scale.reshape(())
    else:
        global_out.copy_(global_scale)
    return out, scale_out, global_out


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 values of NVFP4 packed codes, their E4M3 block scales and per-tensor scale."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    values = table[codes.long()]
    blocks = values.view(*values.shape[:-1], values.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    blocks.mul_((scales.to(torch.float32) * global_scale.to(torch.float32)).unsqueeze(-1))
    return values


# --- what each scheme writes ------------------------------------------------------------------


def scheme_outputs(
    scheme: str, label: str, shape: tuple[int, ...]
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of what a quantized weight `label` of `shape` is written as, the
    weight first (MXFP8 and NVFP4 only; FP8 is sync's)."""
    if scheme == "mxfp8":
        return [(label, shape, FP8), (label + SCALE, mxfp8_scale_shape(shape), torch.uint8)]
    if scheme == "nvfp4":
        packed, scales = nvfp4_shapes(shape)
        return [(label, packed, torch.uint8), (label + SCALE, scales, FP8), (label + GLOBAL_SCALE, (), torch.float32)]
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def companion_suffixes(scheme: str) -> tuple[str, ...]:
    """The suffixes of the tensors written beside a quantized weight, longest first."""
    return {"mxfp8": (SCALE,), "nvfp4": (GLOBAL_SCALE, SCALE)}.get(scheme, ())


def block_of(scheme: str) -> int:
    return MX_BLOCK if scheme == "mxfp8" else NVFP4_BLOCK


def shape_problem(scheme: str, name: str, shape: tuple[int, ...]) -> str | None:
    """Why weight `name` of `shape` cannot be written in `scheme`, if it cannot."""
    block = block_of(scheme)
    if len(shape) != 2:
        return f"{scheme.upper()} export quantizes 2-d weights; '{name}' has shape {list(shape)}"
    if shape[-1] % block:
        return (
            f"{scheme.upper()} export needs each quantized weight's last dim divisible by {block}: "
            f"'{name}' has shape {list(shape)}; leave it unquantized with the config's "
            f"{'ignore' if scheme == 'mxfp8' else 'exclude_modules'}"
        )
    return None


# --- quantization_config ----------------------------------------------------------------------


def _mx_args(dynamic: bool) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs of its MXFP8 preset (weights static, inputs dynamic)."""
    return {
        "num_bits": 8, "type": "float", "symmetric": True, "group_size": MX_BLOCK, "strategy": "group",
        "dynamic": dynamic, "scale_dtype": "torch.uint8",
    }


def patterns(value: object, what: str) -> list[str]:
    """A config's list of module names or patterns (None: none); refused otherwise, a string
    above all, which would be read character by character."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise QuantizeError(
            f"{what} must be a list of module names or patterns, not {value!r}"
            + (f" (write [{value!r}])" if isinstance(value, str) else "")
        )
    return list(value)


def mxfp8_request(value: object) -> dict[str, Any] | None:
    """The caller's `mxfp8` (True, or a compressed-tensors quantization_config whose `ignore`
    is honoured) as the request {"ignore": [...]}; None for None / False."""
    if value is None or value is False:
        return None
    if value is True:
        return {"ignore": []}
    if isinstance(value, Mapping):
        method = value.get("quant_method", "compressed-tensors")
        form = value.get("format", "mxfp8-quantized")
        if method != "compressed-tensors" or form != "mxfp8-quantized":
            raise QuantizeError(
                f"mxfp8: a quantization_config of quant_method 'compressed-tensors' and format "
                f"'mxfp8-quantized' is written, not {method!r} / {form!r}"
            )
        ignore = patterns(value.get("ignore"), "mxfp8's ignore")
        for pattern in ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise QuantizeError(f"mxfp8's ignore: {pattern!r} is not a regular expression: {exc}") from None
        return {"ignore": ignore}
    raise QuantizeError(f"mxfp8 must be True or a compressed-tensors quantization_config, not {value!r}")


def nvfp4_request(value: object) -> dict[str, Any] | None:
    """The caller's `nvfp4` (True, or a ModelOpt quantization_config / hf_quant_config whose
    `exclude_modules` / `ignore` are honoured) as {"ignore": [...]}; None for None / False."""
    if value is None or value is False:
        return None
    if value is True:
        return {"ignore": []}
    if isinstance(value, Mapping):
        inner = value.get("quantization", value)
        if not isinstance(inner, Mapping):
            raise QuantizeError(f"nvfp4: 'quantization' must be an object, not {inner!r}")
        algo = str(inner.get("quant_algo", "W4A16_NVFP4")).upper()
        if algo != "W4A16_NVFP4":
            raise QuantizeError(
                f"nvfp4: quant_algo {algo!r} is not written: W4A16_NVFP4 is (NVFP4 weights; W4A4 NVFP4's "
                "activation scales come from calibration, which a weight export does not do)"
            )
        group = inner.get("group_size", NVFP4_BLOCK)
        if group != NVFP4_BLOCK:
            raise QuantizeError(f"nvfp4: group_size must be {NVFP4_BLOCK}, not {group!r}")
        ignore = patterns(inner.get("exclude_modules"), "nvfp4's exclude_modules")
        ignore += patterns(inner.get("ignore"), "nvfp4's ignore")
        return {"ignore": ignore}
    raise QuantizeError(f"nvfp4 must be True or a ModelOpt quantization_config, not {value!r}")


def ignored(scheme: str, module: str, patterns: list[str]) -> bool:
    """Whether a request's ignore list leaves `module` (an HF module name: a weight's name
    without `.weight`) unquantized, as its engine matches: compressed-tensors (vLLM's
    `should_ignore_layer`) an exact name or `re:` + a regex matched from the start; ModelOpt
    (vLLM's `is_layer_excluded`) an exact name, a substring or an fnmatch wildcard."""
    for pattern in patterns:
        if scheme == "mxfp8":
            if pattern.startswith("re:") and re.match(pattern[3:], module) or pattern == module:
                return True
        elif pattern == module or pattern in module or fnmatch.fnmatch(module, pattern):
            return True
    return False


def quantization_config(scheme: str, unquantized: list[str]) -> dict[str, Any]:
    """The config.json quantization_config of an export in `scheme`, `unquantized` the modules
    of 2-d weights left as they are (the engine must not take them for quantized)."""
    if scheme == "mxfp8":
        return {
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": _mx_args(False),
                    "input_activations": _mx_args(True),
                    "format": "mxfp8-quantized",
                }
            },
            "format": "mxfp8-quantized",
            "ignore": sorted(unquantized),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        }
    if scheme == "nvfp4":
        return {
            "config_groups": {
                "group_0": {
                    "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK},
                    "targets": ["Linear"],
                }
            },
            "ignore": sorted(unquantized),
            "quant_algo": "W4A16_NVFP4",
            "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
            "quant_method": "modelopt",
        }
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def hf_quant_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """ModelOpt's `hf_quant_config.json` beside an NVFP4 export's config.json (older vLLM and
    TensorRT-LLM read it); None for other configs."""
    if config.get("quant_method") != "modelopt":
        return None
    return {
        "producer": dict(config.get("producer") or {"name": "modelopt", "version": MODELOPT_VERSION}),
        "quantization": {
            "quant_algo": config.get("quant_algo"),
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_BLOCK,
            "exclude_modules": list(config.get("ignore") or []),
        },
    }
