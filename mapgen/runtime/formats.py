"""The export format: the dtype each HF tensor leaves in, and whether it is quantized (DeepSeek-V3's
FP8 blocks, MXFP8 or NVFP4: `mx`), decided once per export from the caller's wishes.

`resolve_format` decides it: the model's own dtypes (default), one floating dtype for all
(tensors the HF model keeps in float32 stay float32: transformers' `_keep_in_fp32_modules_strict`,
recorded per tensor at build time in `HFTensorPlan.float32`, and whatever megatron-core keeps in a
float32 buffer, the router's `expert_bias`), or each tensor as the checkpoint the converter loaded
stores it. FP8 block quantization (`quantize_fp8`) is here; the MX formats are `mx`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mapgen.common.layout import FLOAT32_BUFFERS, stacked_slice
from mapgen.runtime import mx
from mapgen.runtime.checkpoint import DEFAULT_BLOCK, SCALE_SUFFIX
from mapgen.runtime.plan import RulePlan

if TYPE_CHECKING:
    from mapgen.runtime.placement import Module


FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value
MIN_AMAX = 1e-12  # a block of zeros gets the scale of this amplitude (DeepSeek's recipe clamps so)
# bytes of quantization temporaries per (padded) element, at their most at once: the float32
# copy (4), the quotient (4), the e4m3 codes (1), their decoding (4), a difference (4), the codes
# of a first pass kept while a neighbouring scale is tried (1) and their merge (1), and a mask (1)
FP8_TEMP_BYTES = 20
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

DtypeArg = torch.dtype | str | None
FP8Arg = bool | tuple[int, int] | list[int] | Mapping[str, Any] | None
QuantArg = bool | Mapping[str, Any] | None  # `mxfp8=` / `nvfp4=`: True or a quantization_config


class ExportFormatError(ValueError):
    """An export format the module or the checkpoint cannot give (raised on every rank alike,
    before any collective)."""


# --- FP8 block quantization ------------------------------------------------------------------


def fp8_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a 2-d weight: ceil(rows / B0) x ceil(cols / B1)."""
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def quantize_fp8(
    weight: torch.Tensor,
    block: tuple[int, int],
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a 2-d weight to e4m3 with one float32 `scale_inv` per block of `block`
    rows x columns (partial blocks at the edges), so that `e4m3 * scale_inv` (mapgen's import,
    `checkpoint.dequantize`) approximates it. Vectorized: no loop over blocks.

    The scale is DeepSeek's recipe, the block's largest magnitude / 448 (e4m3's largest value),
    except where the block is exactly on the e4m3 grid of a scale one float32 step away (weights
    that were dequantized from such a checkpoint and not changed since): then that scale, which
    reproduces every element of the block, so an FP8 checkpoint imported and exported again
    gives back its own bytes. Written into `out` (e4m3) and `scale_out` (float32) when given."""
    rows, cols = weight.shape
    b0, b1 = block
    nr, nc = fp8_grid((rows, cols), block)
    x = torch.zeros(nr * b0, nc * b1, dtype=torch.float32)
    x[:rows, :cols] = weight
    blocks = x.view(nr, b0, nc, b1)
    amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg())
    scale = amax.clamp(min=MIN_AMAX) / E4M3_MAX  # [nr, nc]

    def encode(candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """e4m3 of x / candidate, whether each block decodes to x exactly, and whether each is
        within float32 rounding of the e4m3 grid (weights that came from e4m3 at a nearby scale).
        Temporaries, per element: the quotient, the codes, their decoding, a difference, a mask."""
        per_block = candidate[:, None, :, None]
        quotient = torch.div(blocks, per_block).clamp_(-E4M3_MAX, E4M3_MAX)
        codes = quotient.to(FP8)
        decoded = codes.to(torch.float32)
        difference = torch.sub(decoded, quotient).abs_()
        near = difference.le_(quotient.abs_().mul_(2.0**-20)).all(dim=3).all(dim=1)
        del quotient, difference
        exact = decoded.mul_(per_block).eq_(blocks).all(dim=3).all(dim=1)
        return codes, exact, near

    codes, exact, near = encode(scale)
    unresolved = near & ~exact
    if bool(unresolved.any()):
        for step in (torch.zeros_like(scale), torch.full_like(scale, math.inf)):
            neighbour = torch.nextafter(scale, step)
            other, other_exact, _ = encode(neighbour)
            take = unresolved & other_exact
            if bool(take.any()):
                scale = torch.where(take, neighbour, scale)
                codes = torch.where(take[:, None, :, None], other.view(torch.uint8), codes.view(torch.uint8)).view(FP8)
                unresolved &= ~take
            del other
    result = codes.view(nr * b0, nc * b1)[:rows, :cols]
    if out is None:
        out = result.contiguous()
    else:
        out.copy_(result)
    if scale_out is None:
        scale_out = scale
    else:
        scale_out.copy_(scale)
    return out, scale_out


# --- what export writes -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedFormat:
    """How a checkpoint stores each HF tensor (`Converter.load` records it): the stored dtype,
    which are FP8 block-quantized and in what blocks, and its config's quantization_config."""

    dtypes: dict[str, torch.dtype]  # HF name -> stored dtype (for a quantized one: e4m3)
    quantized: frozenset[str]
    block: tuple[int, int] | None
    quantization_config: dict[str, Any] | None = None
    config_dtype: torch.dtype | None = None  # what config.json's dtype / torch_dtype declares


@dataclass(frozen=True)
class ExportFormat:
    """For every HF tensor (by name; a stacked-experts tensor by its own name): the dtype export
    writes it in, and whether it is quantized, in `scheme`: "fp8" (e4m3 beside a float32 scale
    companion `<name>_scale_inv` of shape `fp8_grid`), "mxfp8" or "nvfp4" (`mx.scheme_outputs`)."""

    dtypes: dict[str, torch.dtype]
    fp8: frozenset[str]  # the quantized tensors, in `scheme` (the name predates MXFP8 and NVFP4)
    block: tuple[int, int]  # FP8's block; (1, 32) for MXFP8, (1, 16) for NVFP4
    key: tuple[object, ...]  # identifies the format among those a converter caches plans for
    quantization_config: dict[str, Any] | None = None  # what a saved config.json says, when quantized
    scheme: str = "fp8"

    @property
    def quantized(self) -> frozenset[str]:
        return self.fp8

    @property
    def companions(self) -> tuple[str, ...]:
        """The suffixes of what is written beside a quantized weight, longest first."""
        return (SCALE_SUFFIX,) if self.scheme == "fp8" else mx.companion_suffixes(self.scheme)

    def outputs(self, label: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """What export yields for HF tensor (or slice) `label` of `shape`: (name, shape, dtype),
        the scale companions after a quantized weight."""
        base, _ = stacked_slice(label)
        if base in self.fp8:
            if self.scheme != "fp8":
                return mx.scheme_outputs(self.scheme, label, shape)
            return [(label, shape, FP8), (label + SCALE_SUFFIX, fp8_grid(shape, self.block), torch.float32)]
        return [(label, shape, self.dtypes[base])]

    def temporaries(self, shape: tuple[int, ...]) -> int:
        """Bytes of quantization temporaries for one quantized weight of `shape`."""
        if self.scheme == "fp8":
            rows, cols = fp8_grid(shape, self.block)
            return rows * self.block[0] * cols * self.block[1] * FP8_TEMP_BYTES
        per_element = mx.MXFP8_TEMP_BYTES if self.scheme == "mxfp8" else mx.NVFP4_TEMP_BYTES
        return math.prod(shape) * per_element


def held_dtype(megatron_name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a Megatron model holds a parameter in: the model's, but float32 for
    megatron-core's float32 weight buffers (the router's expert_bias)."""
    return torch.float32 if megatron_name.rsplit(".", 1)[-1] in FLOAT32_BUFFERS else model_dtype


def as_dtype(value: object, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value.is_floating_point and value.itemsize > 1:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[value.removeprefix("torch.")]
    raise ExportFormatError(
        f"{what} must be a floating dtype ({', '.join(FLOAT_DTYPES)}), 'checkpoint' or None, not {value!r}"
    )


def config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype a config.json declares (`dtype`, or the older `torch_dtype`), if any."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPES:
            return FLOAT_DTYPES[value.removeprefix("torch.")]
    return None


def fp8_config(value: FP8Arg) -> dict[str, Any] | None:
    """The caller's `fp8` as a quantization_config (None: no quantization): True is DeepSeek-V3's
    (e4m3, 128 x 128 blocks, dynamic activations); a pair is the block size; a mapping is a
    config.json `quantization_config` (quant_method fp8; its weight_block_size and
    modules_to_not_convert are honoured)."""
    if value is None or value is False:
        return None
    base: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": list(DEFAULT_BLOCK)}
    if value is True:
        return base
    if isinstance(value, (tuple, list)):
        return {**base, "weight_block_size": list(_block_size(value))}
    if isinstance(value, Mapping):
        if value.get("quant_method", "fp8") != "fp8":
            raise ExportFormatError(f"fp8: quantization_config has quant_method {value.get('quant_method')!r}, not 'fp8'")
        if value.get("fmt", "e4m3") != "e4m3":
            raise ExportFormatError(f"fp8: only e4m3 weights are written, not fmt {value.get('fmt')!r}")
        merged = {**base, **dict(value)}
        merged["weight_block_size"] = list(_block_size(merged.get("weight_block_size") or DEFAULT_BLOCK))
        return merged
    raise ExportFormatError(f"fp8 must be True, a block size (rows, cols) or a quantization_config, not {value!r}")


def _block_size(value: object) -> tuple[int, int]:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ExportFormatError(f"fp8 block size must be two positive integers, not {value!r}")


def _not_converted(value: object) -> list[str]:
    """quantization_config's `modules_to_not_convert`: a list of module names or regexes (None
    or absent: none), refused otherwise (`mx.patterns`), and each a regular expression."""
    try:
        found = mx.patterns(value, "fp8's modules_to_not_convert")
    except mx.QuantizeError as exc:
        raise ExportFormatError(str(exc)) from None
    for pattern in found:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ExportFormatError(f"fp8's modules_to_not_convert: {pattern!r} is not a regular expression: {exc}") from None
    return found


def _skipped(name: str, patterns: list[str]) -> bool:
    """transformers' `should_convert_module` negated: a module name matched by a pattern of
    `modules_to_not_convert` (from the start up to a module boundary, as a regex with that
    boundary, or as a suffix) is not quantized."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def resolve_format(
    module: Module,
    model_dtype: torch.dtype,
    *,
    dtype: DtypeArg = None,
    keep_float32: Iterable[str] | None = None,
    fp8: FP8Arg = None,
    loaded: LoadedFormat | None = None,
    mxfp8: QuantArg = None,
    nvfp4: QuantArg = None,
) -> ExportFormat:
    """The export format for the caller's wishes (see `drivers.Converter.export`). Raises
    ExportFormatError for a wish the module or the loaded checkpoint cannot meet."""
    wished = [n for n, v in (("fp8", fp8), ("mxfp8", mxfp8), ("nvfp4", nvfp4)) if v is not None and v is not False]
    if len(wished) > 1:
        raise ExportFormatError(f"{' and '.join(wished)} are alternatives: export in one quantization at a time")
    held: dict[str, torch.dtype] = {}
    stacked: set[str] = set()
    for plan in module.PARAMS:
        for label in plan.hf_names:
            base, index = stacked_slice(label)
            held[base] = held_dtype(plan.megatron_name, model_dtype)
            if index is not None:
                stacked.add(base)
    copies: dict[str, str] = dict(getattr(module, "HF_COPIES", {}))  # written as their originals are
    held.update((copy, held[original]) for copy, original in copies.items())
    names = [t.name for t in module.HF_TENSORS]
    if isinstance(dtype, str) and dtype == "checkpoint":
        if loaded is None:
            raise ExportFormatError(
                "dtype='checkpoint' exports each tensor as the checkpoint this converter loaded stores it, "
                "but it has loaded none (Converter.load), or name a dtype"
            )
        if wished or fp8 is not None or keep_float32 is not None:
            raise ExportFormatError(
                "dtype='checkpoint' takes the checkpoint's own dtypes and quantization: no fp8, mxfp8, nvfp4 or keep_float32"
            )
        dtypes = {n: loaded.dtypes.get(n, held[n]) for n in names}
        for name in loaded.quantized:  # written as e4m3: its dtype entry is unused
            dtypes[name] = loaded.config_dtype or held[name]
        stored_fp8 = frozenset(loaded.quantized)
        if stored_fp8 & stacked:
            raise ExportFormatError("FP8 export of stacked-experts tensors is not supported (publish per expert)")
        stored_block = loaded.block or DEFAULT_BLOCK
        stored_config = dict(loaded.quantization_config or fp8_config(True) or {}) if stored_fp8 else None
        if stored_config is not None:
            stored_config["weight_block_size"] = list(stored_block)
        return ExportFormat(dtypes, stored_fp8, stored_block, ("checkpoint", id(loaded)), stored_config)
    target = None if dtype is None else as_dtype(dtype, "dtype")
    if target is None:
        if keep_float32 is not None:
            raise ExportFormatError("keep_float32 applies to a cast (dtype=...); dtype None exports as the model holds it")
        keep: frozenset[str] = frozenset()
        dtypes = dict(held)
    else:
        if keep_float32 is None:
            wanted = str(target).removeprefix("torch.")
            keep = frozenset(t.name for t in module.HF_TENSORS if wanted in t.float32)
            keep |= frozenset(n for n in names if held[n] == torch.float32 and model_dtype != torch.float32)
        else:
            if isinstance(keep_float32, str):
                raise ExportFormatError("keep_float32 must be a collection of HF tensor names, not one string")
            keep = frozenset(keep_float32)
            unknown = sorted(keep - set(names))
            if unknown:
                raise ExportFormatError(f"keep_float32 names {len(unknown)} tensor(s) {module.TARGET} does not export: {', '.join(unknown[:5])}")
        dtypes = {n: torch.float32 if n in keep else target for n in names}
    if wished and wished[0] != "fp8":
        return _mx_format(module, wished[0], mxfp8 if wished[0] == "mxfp8" else nvfp4, dtypes, keep, target, stacked, copies)
    config = fp8_config(fp8)
    quantized: frozenset[str] = frozenset()
    block = DEFAULT_BLOCK
    if config is not None:
        block = _block_size(config["weight_block_size"])
        skip = _not_converted(config.get("modules_to_not_convert"))
        linear = _linear_weights(module, stacked, "FP8")
        quantized = frozenset(
            n for n in linear
            if n not in keep and not _skipped(n.removesuffix(".weight"), skip)
        )
        quantized |= frozenset(copy for copy, original in copies.items() if original in quantized)
    key = (None if target is None else str(target), keep, None if config is None else (block, tuple(sorted(quantized))))
    return ExportFormat(dtypes, quantized, block, key, config)


def _linear_weights(module: Module, stacked: set[str], what: str) -> set[str]:
    """The HF tensors the module's static plan marks as weights of linear layers (refused for a
    module built before the plan said so, and for stacked-experts tensors)."""
    rules = module_rules(module)
    if not any(r.linear_weight for r in rules):
        raise ExportFormatError(
            f"{module.TARGET} does not say which tensors are linear weights (built by an older mapgen?): "
            f"rebuild it to export {what}"
        )
    linear: set[str] = set()
    for plan in module.PARAMS:
        if rules[plan.rule].linear_weight:
            linear.update(stacked_slice(label)[0] for label in plan.hf_names)
    if linear & stacked:
        raise ExportFormatError(
            f"{what} export of stacked-experts tensors is not supported ({sorted(linear & stacked)[0]}, ...): "
            "build the module with --hf-experts per_expert, as DeepSeek-V3 is published"
        )
    return linear


def _mx_format(
    module: Module,
    scheme: str,
    value: QuantArg,
    dtypes: dict[str, torch.dtype],
    keep: frozenset[str],
    target: torch.dtype | None,
    stacked: set[str],
    copies: dict[str, str],
) -> ExportFormat:
    """The MXFP8 or NVFP4 format (`mx`): the linear weights of the static plan, less those kept
    in float32 and those the request's ignore list names; every one must have a block-divisible
    last dim. The config's ignore list names every 2-d weight's module left unquantized."""
    try:
        request = mx.mxfp8_request(value) if scheme == "mxfp8" else mx.nvfp4_request(value)
    except mx.QuantizeError as exc:
        raise ExportFormatError(str(exc)) from None
    assert request is not None
    linear = _linear_weights(module, stacked, scheme.upper())
    quantized = {n for n in linear if n not in keep and not mx.ignored(scheme, n.removesuffix(".weight"), request["ignore"])}
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    problems = [p for p in (mx.shape_problem(scheme, n, shapes[n]) for n in sorted(quantized)) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportFormatError(f"{module.TARGET}: {problems[0]}{more}")
    quantized |= {copy for copy, original in copies.items() if original in quantized}
    unquantized = sorted(
        n.removesuffix(".weight") for n in shapes if n not in quantized and n.endswith(".weight") and len(shapes[n]) == 2
    )
    config = mx.quantization_config(scheme, unquantized)
    block = (1, mx.block_of(scheme))
    key = (None if target is None else str(target), keep, (scheme, tuple(sorted(quantized))))
    return ExportFormat(dtypes, frozenset(quantized), block, key, config, scheme)


def module_rules(module: Module) -> tuple[RulePlan, ...]:
    rules = getattr(module, "RULES", None)
    if not isinstance(rules, (tuple, list)) or not all(isinstance(r, RulePlan) for r in rules):
        raise ExportFormatError(f"{module.TARGET} has no RULES table (built by an older mapgen?): rebuild it")
    return tuple(rules)
