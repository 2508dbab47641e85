"""Weight sync: the whole model out as HF tensors in a chosen dtype, DeepSeek-V3's FP8 format,
MXFP8 or NVFP4 (`mx`), streamed in buckets of bounded memory (`stream_export`), and each rank's
own pieces with their HF coordinates, without any collective (`local_plan`, `local_param_pieces`). `drivers.Converter.export`
and `Converter.export_local` call these.

**Format.** `ExportFormat` says, for every HF tensor, the dtype export writes it in and whether it
is block-quantized to e4m3 with a float32 `<name>_scale_inv` of one scale per block (DeepSeek-V3's
published layout), or quantized to MXFP8 or NVFP4 with their scale companions (`mx`).
`resolve_format` decides it once from the caller's wishes: the model's own dtypes (default), one floating dtype for all (tensors the HF model keeps in float32 stay float32:
transformers' `_keep_in_fp32_modules_strict`, recorded per tensor at build time in
`HFTensorPlan.float32`, and whatever megatron-core keeps in a float32 buffer, the router's
`expert_bias`), or each tensor as the checkpoint the converter loaded stores it.

**Memory.** A bucket is a run of export units (a parameter, or one MoE layer's experts at one
local index on every EP rank) of one pipeline stage whose *cost* stays within `bucket_bytes`; a
unit that alone costs more travels alone. The cost counts every buffer the bucket holds at once,
in the phase where most are alive (see `BucketPlan`): the gathered shards with the gather's input
and the backend's own flat copy of its output, then the gathered shards with the bucket's HF
tensors in the export format, then those with the EP gather's backend copy. On top of one bucket,
export holds at most one parameter's export-function outputs and its quantization temporaries,
the last tensor yielded (a copy, so the consumer's reference does not pin the bucket) and, for a
stacked-experts checkpoint, one layer's stacked tensors being assembled: `ExportBound`. Tensor
views are made one at a time as they are yielded, and after a gloo collective the runtime waits
until gloo's worker thread has let go of the bucket's buffers (`collectives._Released`), so that
a bucket's buffers are gone before the next bucket's are made.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from mapgen.common.layout import FLOAT32_BUFFERS, stacked_slice
from mapgen.common import gcpause
from mapgen.runtime import transforms
from mapgen.runtime.checkpoint import DEFAULT_BLOCK, SCALE_SUFFIX
from mapgen.runtime.collectives import RankError, all_gather_coalesced, all_gather_slots, broadcast_flat
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime import mx
from mapgen.runtime.plan import ParamPlan, RulePlan
from mapgen.runtime.shardmap import HFPiece, Run, shard_pieces

if TYPE_CHECKING:
    from mapgen.runtime.drivers import Module, Placement

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value
MIN_AMAX = 1e-12  # a block of zeros gets the scale of this amplitude (DeepSeek's recipe clamps so)
# bytes of quantization temporaries per (padded) element, at their most at once: the float32
# copy (4), the quotient (4), the e4m3 codes (1), their decoding (4), a difference (4), the codes
# of a first pass kept while a neighbouring scale is tried (1) and their merge (1), and a mask (1)
FP8_TEMP_BYTES = 20
# bytes of bookkeeping per output of a bucket (where it lies in the flat buffers, the outputs
# kept aside, their tensor objects), counted in the bucket's cost
OUTPUT_BYTES = 256
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
    rules = _rules(module)
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


def _rules(module: Module) -> tuple[RulePlan, ...]:
    rules = getattr(module, "RULES", None)
    if not isinstance(rules, (tuple, list)) or not all(isinstance(r, RulePlan) for r in rules):
        raise ExportFormatError(f"{module.TARGET} has no RULES table (built by an older mapgen?): rebuild it")
    return tuple(rules)


# --- the bucket plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """One tensor a bucket yields: an HF tensor, one expert's slice `X[i]` of a stacked tensor,
    or a scale companion."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as yielded (float8_e4m3fn for a quantized weight)
    ep_rank: int | None  # the EP rank that produces it (an expert's, at EP > 1); None: every rank of the stage
    travels: bool  # it is sent (over EP, or from the owning stage over PP) in a flat buffer

    @cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @cached_property
    def strides(self) -> tuple[int, ...]:  # contiguous, in elements
        return tuple(math.prod(self.shape[dim + 1 :]) for dim in range(len(self.shape)))

    @cached_property
    def stacked(self) -> tuple[str, int | None]:  # `stacked_slice(name)`
        return stacked_slice(self.name)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def wire(self) -> torch.dtype:
        """The dtype it travels in (collectives do not take e4m3: its bytes as uint8)."""
        return torch.uint8 if self.dtype == FP8 else self.dtype


@dataclass(frozen=True)
class Flat:
    """One flat buffer of a bucket: what travels in one wire dtype. The outputs of the whole
    stage first, then one slot per EP rank for the experts each produces (EP-gathered in place)."""

    dtype: torch.dtype
    common: tuple[tuple[Out, int], ...]  # (output, offset)
    slots: tuple[tuple[tuple[Out, int], ...], ...]  # per EP rank: (output, offset in the slot)
    common_numel: int
    slot_numel: int

    @property
    def numel(self) -> int:
        return self.common_numel + len(self.slots) * self.slot_numel


@dataclass(frozen=True)
class BucketPlan:
    """What one bucket moves, identical on every rank. `cost` is the most bytes it holds at once
    on any rank: max(S + 2G, G + T, T + Te) + 256 N with G the shards it all-gathers (whole, in
    the model's dtype), S their inputs, T its outputs in the export format, Te those that travel
    over EP (the collectives keep a flat copy of an all_gather's output: 2G, + Te) and N the
    outputs (bookkeeping)."""

    owner: int  # pp rank
    plans: tuple[ParamPlan, ...]
    outs: tuple[Out, ...]  # in the order yielded (HF order; a scale after its weight)
    flats: tuple[Flat, ...]
    cost: int
    # per pipeline stage: the index of the stage's own bucket it makes while this one, another
    # stage's, travels (so that stages make their buckets side by side); -1: none (`_made_ahead`)
    ahead: tuple[int, ...] = ()

    @cached_property
    def by_name(self) -> dict[str, Out]:
        return {out.name: out for out in self.outs}

    @cached_property
    def where(self) -> dict[str, tuple[int, int]]:
        """Where each travelling output lies in the bucket's flat buffers: (flat, start)."""
        found: dict[str, tuple[int, int]] = {}
        for index, flat in enumerate(self.flats):
            for out, offset in flat.common:
                found[out.name] = (index, offset)
            for rank, slot in enumerate(flat.slots):
                for out, offset in slot:
                    found[out.name] = (index, flat.common_numel + rank * flat.slot_numel + offset)
        return found


@dataclass(frozen=True)
class ExportBound:
    """The most memory an export holds beyond the model at any moment, in bytes: one bucket
    (`bucket`: the largest bucket cost, or at PP > 1 the largest pair a stage holds while it makes
    its next bucket ahead, at most bucket_bytes unless one unit alone costs more),
    one parameter's export-function outputs and quantization temporaries (`transient`), the last
    tensor yielded (`held`: the copy the consumer may keep until it asks for the next) and the
    stacked tensors of one layer being assembled (`stacking`; 0 for per-expert checkpoints)."""

    bucket: int
    transient: int
    held: int
    stacking: int
    buckets: int

    @property
    def total(self) -> int:
        return self.bucket + self.transient + self.held + self.stacking


def export_units(module: Module, placement: Placement) -> list[tuple[ParamPlan, ...]]:
    """What export moves together, in HF order: each parameter alone, except expert parameters:
    those of one MoE layer at the same local index on every EP rank form one unit, so that every
    EP rank contributes alike to the unit's gather."""
    assert placement.expert_ranks is not None
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    units: dict[tuple[object, ...], list[ParamPlan]] = {}
    for plan in module.PARAMS:
        if plan.expert is None:
            key: tuple[object, ...] = (plan.megatron_name,)
        else:
            key = (plan.layer, placement.expert_ranks[plan.megatron_name][1])
        units.setdefault(key, []).append(plan)

    def order(unit: tuple[ParamPlan, ...]) -> tuple[int, int]:
        return min(hf_order(position, n) for p in unit for n in p.hf_names)

    return sorted((tuple(u) for u in units.values()), key=order)


def _made_ahead(buckets: list[BucketPlan], stages: int, bucket_bytes: int) -> list[tuple[int, ...]]:
    """Which own bucket each pipeline stage makes while another stage's bucket travels: at
    bucket i of another stage, the stage's next own bucket j, when it has not been made yet and
    j held beside each bucket from i to j fits in bucket_bytes (the receiving stage holds both),
    so a stage does not sit idle while the others make theirs. Per bucket, per stage; -1: none."""
    ahead = [[-1] * stages for _ in buckets]
    for stage in range(stages):
        made = -1
        following = -1  # the stage's next own bucket after i, found walking backwards
        nexts = [-1] * len(buckets)
        for i in range(len(buckets) - 1, -1, -1):
            nexts[i] = following
            if buckets[i].owner == stage:
                following = i
        for i, bucket in enumerate(buckets):
            j = nexts[i]
            if bucket.owner == stage or j <= made:
                continue
            if all(buckets[k].cost + buckets[j].cost <= bucket_bytes for k in range(i, j)):
                ahead[i][stage] = made = j
    return [tuple(a) for a in ahead]


def hf_order(position: dict[str, int], name: str) -> tuple[int, int]:
    """Where an HF name (or a slice of a stacked tensor) stands in the module's HF order."""
    base, index = stacked_slice(name)
    return position[base], -1 if index is None else index


def _hf_shape(shapes: dict[str, tuple[int, ...]], label: str) -> tuple[int, ...]:
    base, index = stacked_slice(label)
    return shapes[base] if index is None else shapes[base][1:]


def plan_buckets(
    module: Module,
    placement: Placement,
    ctx: ParallelContext,
    fmt: ExportFormat,
    bucket_bytes: int,
    all_stages: bool,
) -> tuple[list[BucketPlan], ExportBound]:
    """The buckets of an export (identical on every rank: nothing rank-local goes in) and the
    bound on the memory it holds."""
    expert_ranks = placement.expert_ranks
    assert expert_ranks is not None
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    model_size = placement.dtype.itemsize
    ep = ctx.ep.size
    pipelined = ctx.pp.size > 1 and all_stages
    buckets: list[BucketPlan] = []
    transient = held = 0
    current: list[tuple[ParamPlan, ...]] = []
    sums = [0, 0, 0, 0, 0]  # S, G, T, Te and the outputs of the current bucket
    owner = -1

    def cost(s: int, g: int, t: int, te: int, n: int) -> int:
        return max(s + 2 * g, g + t, t + te) + n * OUTPUT_BYTES

    def close() -> None:
        plans = tuple(p for unit in current for p in unit)
        outs = _outs(plans)
        buckets.append(BucketPlan(owner, plans, outs, _flats(outs, ep), cost(*sums)))

    def _outs(plans: tuple[ParamPlan, ...]) -> tuple[Out, ...]:
        found: list[tuple[tuple[int, int, int], Out]] = []
        for plan in plans:
            rank = None
            if plan.expert is not None and ep > 1:
                rank = expert_ranks[plan.megatron_name][0]
            travels = pipelined or rank is not None
            for label in plan.hf_names:
                for k, (name, shape, dtype) in enumerate(fmt.outputs(label, _hf_shape(shapes, label))):
                    found.append(((*hf_order(position, label), k), Out(name, shape, dtype, rank, travels)))
        return tuple(out for _, out in sorted(found, key=lambda item: item[0]))

    for unit in export_units(module, placement):
        unit_owner = placement.owners[unit[0].megatron_name].pp_rank
        s = g = t = te = n = 0
        param_transient = 0
        for plan in unit:
            group = ctx.etp if plan.expert_parallel else ctx.tp
            representative = plan.expert is None or expert_ranks[plan.megatron_name][0] == 0
            if plan.split_dim is not None and group.size > 1 and representative:
                whole = math.prod(plan.shape) * model_size
                g += whole
                s += whole // group.size
            outputs = 0
            temporaries = 0
            for label in plan.hf_names:
                shape = _hf_shape(shapes, label)
                outputs += math.prod(shape) * held_dtype(plan.megatron_name, placement.dtype).itemsize
                for name, out_shape, dtype in fmt.outputs(label, shape):
                    nbytes = math.prod(out_shape) * dtype.itemsize
                    t += nbytes
                    n += 1
                    if plan.expert is not None and ep > 1:
                        te += nbytes
                    held = max(held, nbytes)
                    if name == label and stacked_slice(label)[0] in fmt.fp8:  # a quantized weight
                        temporaries = max(temporaries, fmt.temporaries(shape))
            param_transient = max(param_transient, outputs + temporaries)
        transient = max(transient, param_transient)
        grown = cost(sums[0] + s, sums[1] + g, sums[2] + t, sums[3] + te, sums[4] + n)
        if current and (unit_owner != owner or grown > bucket_bytes):
            close()
            current, sums = [], [0, 0, 0, 0, 0]
        current.append(unit)
        sums = [sums[0] + s, sums[1] + g, sums[2] + t, sums[3] + te, sums[4] + n]
        owner = unit_owner
    if current:
        close()
    ahead = _made_ahead(buckets, ctx.pp.size, bucket_bytes) if pipelined else [()] * len(buckets)
    buckets = [replace(b, ahead=a) for b, a in zip(buckets, ahead)]
    overlap = max((b.cost + buckets[j].cost for b in buckets for j in b.ahead if j >= 0), default=0)
    stacking: dict[object, int] = {}
    counted: set[str] = set()
    for plan in module.PARAMS:
        for label in plan.hf_names:
            base, index = stacked_slice(label)
            if index is not None and base not in counted:
                counted.add(base)
                stacking[plan.layer] = stacking.get(plan.layer, 0) + math.prod(shapes[base]) * fmt.dtypes[base].itemsize
    bound = ExportBound(
        max(max((b.cost for b in buckets), default=0), overlap), transient, held, max(stacking.values(), default=0),
        len(buckets),
    )
    return buckets, bound


def _flats(outs: tuple[Out, ...], ep: int) -> tuple[Flat, ...]:
    by_wire: dict[torch.dtype, list[Out]] = {}
    for out in outs:
        if out.travels:
            by_wire.setdefault(out.wire, []).append(out)
    flats: list[Flat] = []
    for wire, group in by_wire.items():
        common: list[tuple[Out, int]] = []
        offset = 0
        for out in group:
            if out.ep_rank is None:
                common.append((out, offset))
                offset += out.numel
        slots: list[tuple[tuple[Out, int], ...]] = []
        slot_numel = 0
        if any(out.ep_rank is not None for out in group):
            for rank in range(ep):
                slot: list[tuple[Out, int]] = []
                at = 0
                for out in group:
                    if out.ep_rank == rank:
                        slot.append((out, at))
                        at += out.numel
                slots.append(tuple(slot))
                slot_numel = max(slot_numel, at)
        flats.append(Flat(wire, tuple(common), tuple(slots), offset, slot_numel))
    return tuple(flats)


# --- streaming export ------------------------------------------------------------------------


def _view(flat: torch.Tensor, start: int, out: Out) -> torch.Tensor:
    part = flat.as_strided(out.shape, out.strides, start)  # the flat starts its storage
    return part.view(FP8) if out.dtype == FP8 else part


# a bucket on this rank: its flat buffers, where each travelling output lies in them, the
# outputs that do not travel, and what failed making it here (None: nothing)
_Made = tuple[list[torch.Tensor], dict[str, tuple[int, int]], dict[str, torch.Tensor], Exception | None]


def _make_bucket(module: Module, bucket: BucketPlan, placement: Placement, ctx: ParallelContext, fmt: ExportFormat) -> _Made:
    """The bucket's outputs on this rank: produced (owning stage), else buffers to receive them
    in. An export function that raises does not stop the bucket's collectives here (the other
    ranks are in them): the failure is returned, for `_agree_bucket`."""
    flats = [torch.empty(f.numel, dtype=f.dtype) for f in bucket.flats]
    where = bucket.where
    kept: dict[str, torch.Tensor] = {}
    failure: Exception | None = None
    if bucket.owner == ctx.pp.rank:
        try:
            _produce(module, bucket, placement, ctx, fmt, flats, where, kept)
        except Exception as exc:  # noqa: BLE001 - agreed on by every rank after the bucket's collectives
            failure = exc
        for layout, buffer in zip(bucket.flats, flats):
            all_gather_slots(ctx.ep, buffer, layout.common_numel, layout.slot_numel)
    return flats, where, kept, failure


def _agree_bucket(failure: Exception | None, number: int, count: int, stage: Group | None) -> None:
    """Every rank that walks bucket `number`, after its collectives and before any of its
    tensors is yielded: if one failed making it, the failing rank raises its own error and every
    other rank a RankError naming it (one small all_reduce: over all ranks where every rank walks
    every bucket, `stage` None; else over the ranks of this pipeline stage, which walk the
    stage's own buckets and no other)."""
    single = stage.size == 1 if stage is not None else (not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1)
    if single:
        if failure is not None:
            raise failure
        return
    rank = torch.distributed.get_rank()
    status = torch.tensor([1 if failure is not None else 0, rank if failure is not None else -1], dtype=torch.int64)
    torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX, group=stage.handle if stage is not None else None)
    if failure is not None:
        raise failure
    if status[0]:
        raise RankError(
            f"export stopped at bucket {number + 1} of {count}: rank {int(status[1])} failed making it "
            "(its own error says why); every rank stops here"
        )


def _produce(
    module: Module,
    bucket: BucketPlan,
    placement: Placement,
    ctx: ParallelContext,
    fmt: ExportFormat,
    flats: list[torch.Tensor],
    where: dict[str, tuple[int, int]],
    kept: dict[str, torch.Tensor],
) -> None:
    """Gather the bucket's shards over TP (expert-TP), apply the export functions and write each
    HF tensor in its export format: into its place in a flat buffer if it travels, else kept."""
    outs = bucket.by_name
    mine = [p for p in bucket.plans if p.megatron_name in placement.local]
    parts: dict[str, list[torch.Tensor]] = {}
    for expert_parallel in (False, True):
        group = ctx.etp if expert_parallel else ctx.tp
        if group.size == 1:
            continue
        split = [p for p in mine if p.expert_parallel == expert_parallel and p.split_dim is not None]
        gathered = all_gather_coalesced(group, [placement.local[p.megatron_name].detach() for p in split])
        parts.update({p.megatron_name: g for p, g in zip(split, gathered)})
        del gathered, split

    def target(name: str) -> torch.Tensor | None:
        if name not in where:
            return None
        index, start = where[name]
        return _view(flats[index], start, outs[name])

    for plan in mine:
        shards = parts.pop(plan.megatron_name, None) or [placement.local[plan.megatron_name].detach()]
        exported = module.EXPORTS[plan.megatron_name](shards)
        del shards
        shared: torch.Tensor | None = None  # NVFP4's per-tensor amax, shared by the parameter's tensors
        for label, tensor in exported.items():
            if plan.megatron_name in placement.vocab:  # the HF rows, without Megatron's padding
                tensor = tensor.narrow(0, 0, plan.shape[0])
            if fmt.fp8 and stacked_slice(label)[0] in fmt.fp8:
                names = [name for name, _, _ in fmt.outputs(label, tuple(tensor.shape))]
                if fmt.scheme == "fp8":
                    made: tuple[torch.Tensor, ...] = quantize_fp8(tensor, fmt.block, target(names[0]), target(names[1]))
                elif fmt.scheme == "mxfp8":
                    made = mx.quantize_mxfp8(tensor, target(names[0]), target(names[1]))
                else:  # one per-tensor scale over what the parameter exports (q, k, v; gate, up)
                    if shared is None:
                        shared = max(mx.amax(t) for l, t in exported.items() if stacked_slice(l)[0] in fmt.fp8)
                    made = mx.quantize_nvfp4(tensor, shared, target(names[0]), target(names[1]), target(names[2]))
                if label not in where:
                    kept.update(zip(names, made))
                del made
                continue
            spot = where.get(label)
            if spot is not None:  # it travels: into its place in a flat buffer
                _view(flats[spot[0]], spot[1], outs[label]).copy_(tensor)
            else:
                dtype = outs[label].dtype
                kept[label] = tensor if tensor.dtype == dtype else tensor.to(dtype)
        del exported


def stream_export(
    module: Module,
    buckets: list[BucketPlan],
    placement: Placement,
    ctx: ParallelContext,
    fmt: ExportFormat,
    all_stages: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) bucket by bucket; a bucket's buffers are released before the next
    is made, except that at PP > 1 a stage makes its next own bucket while another stage's
    travels where the plan says so (`BucketPlan.ahead`: the two fit in bucket_bytes). The last
    tensor of a bucket that views a flat buffer is yielded as a copy, so that the consumer's
    reference to it does not keep the whole bucket alive."""
    shapes: dict[str, tuple[int, ...]] = {}  # of stacked-experts tensors, filled when one is met
    stacking: dict[str, tuple[torch.Tensor, set[int]]] = {}
    made: dict[int, _Made] = {}
    # a failure on one rank (an export function raising) is agreed on per bucket: the failing
    # rank still takes part in the bucket's collectives, then every rank that walks the bucket
    # raises before any of its tensors is yielded (all ranks, or without all_stages at PP > 1
    # the ranks of the owning stage: the others never wait on it)
    stage = None if all_stages or ctx.pp.size == 1 else ctx.stage
    for number, bucket in enumerate(buckets):
        if bucket.owner != ctx.pp.rank and not all_stages:
            continue
        with gcpause.paused():  # resumed while the caller has a tensor
            flats, where, kept, failure = made.pop(number) if number in made else _make_bucket(module, bucket, placement, ctx, fmt)
            if all_stages and ctx.pp.size > 1:
                ahead = bucket.ahead[ctx.pp.rank] if bucket.ahead else -1
                if ahead >= 0:  # made while this bucket travels from its stage (the receivers wait anyway)
                    made[ahead] = _make_bucket(module, buckets[ahead], placement, ctx, fmt)
                for buffer in flats:
                    broadcast_flat(ctx.pp, bucket.owner, buffer)
        _agree_bucket(failure, number, len(buckets), stage)
        last = len(bucket.outs) - 1
        for position, out in enumerate(bucket.outs):
            if not out.travels:
                tensor = kept.pop(out.name)
            else:  # a view of the flat buffer, made as it is yielded (not a bucket's worth at once)
                index, start = where[out.name]
                tensor = _view(flats[index], start, out)
                if position == last:
                    tensor = tensor.clone()
            if position == last:
                del flats, where, kept  # the bucket's buffers go before the consumer takes the last
            base, slot = out.stacked
            if slot is None:
                yield out.name, tensor
            else:
                if base not in stacking:
                    if not shapes:
                        shapes.update((t.name, tuple(t.shape)) for t in module.HF_TENSORS)
                    stacking[base] = (torch.empty(shapes[base], dtype=tensor.dtype), set())
                whole, done = stacking[base]
                whole[slot].copy_(tensor)
                done.add(slot)
                if len(done) == shapes[base][0]:  # every expert's slice is there
                    del stacking[base]
                    yield base, whole
                del whole
            del tensor


# --- gather-free export ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPiece:
    """A part of one HF tensor that this rank holds, in HF layout: `data` holds the HF tensor's
    values at the coordinates `piece` gives (every index whose coordinate in each dimension lies
    in one of that dimension's runs, in order), so a consumer can scatter it into its own buffer
    (`scatter`). `replicated`: every rank of the parameter's TP (expert-TP) group holds and
    yields the same piece (norms, the router); any one of them will do, and `primary` marks the
    one of group rank 0. With data parallelism, each data-parallel replica yields the same pieces
    as the others: take one replica's."""

    piece: HFPiece
    data: torch.Tensor
    replicated: bool
    megatron_name: str
    primary: bool = True  # not replicated, or this rank is rank 0 of the group: take these to cover each byte once

    @property
    def name(self) -> str:
        """The HF tensor (a stacked-experts tensor's own name for one expert's slice)."""
        return self.piece.name

    @property
    def expert(self) -> int | None:
        """The expert's index in a stacked-experts tensor, else None."""
        return self.piece.expert

    @property
    def runs(self) -> tuple[tuple[Run, ...], ...]:
        """Per dimension of the tensor (of the expert's slice), the [start, stop) runs held."""
        return self.piece.runs


def _indices(piece: HFPiece) -> list[torch.Tensor]:
    """Per dim of the whole HF tensor (the expert dim first for a slice), the indices held."""
    return [
        torch.cat([torch.arange(start, stop) for start, stop in runs]) if runs else torch.empty(0, dtype=torch.long)
        for runs in piece.full_runs()
    ]


def take(tensor: torch.Tensor, piece: HFPiece, *, sliced: bool = False) -> torch.Tensor:
    """The values of the whole HF tensor `tensor` at `piece`'s coordinates, in piece layout
    (`sliced`: `tensor` is already the expert's slice of a stacked tensor)."""
    indices = _indices(piece)
    if piece.expert is not None and sliced:
        indices = indices[1:]
    for dim, index in enumerate(indices):
        tensor = tensor.index_select(dim, index)
    return tensor.squeeze(0) if piece.expert is not None and not sliced else tensor


def scatter(into: torch.Tensor, piece: HFPiece, data: torch.Tensor) -> None:
    """Write a piece's data into the whole HF tensor `into` (a consumer's buffer), in place."""
    indices = _indices(piece)
    dims = len(indices)
    grid = tuple(index.view(*([1] * d), -1, *([1] * (dims - d - 1))) for d, index in enumerate(indices))
    into[grid] = data.unsqueeze(0) if piece.expert is not None else data


def _local_data(
    module: Module, rule: RulePlan, plan: ParamPlan, local: torch.Tensor, rank: int, size: int, pieces: tuple[HFPiece, ...]
) -> list[torch.Tensor]:
    """The HF values of this rank's shard at its pieces' coordinates, by the kind's inverse
    transform applied to the shard alone."""
    kind = rule.kind
    if kind in ("qkv", "kv", "concat_qkv", "vision_qkv") and rule.qkv is not None:
        g = rule.qkv
        count = g.groups // size if plan.split_dim is not None else g.groups
        heads = g.heads // g.groups * count
        if kind == "kv":
            return list(transforms.kv_split(local, groups=count, head_dim=g.head_dim))
        q, k, v = transforms.qkv_split(local, heads=heads, groups=count, head_dim=g.head_dim, gate=g.gate)
        return [q, k, v] if kind == "qkv" or len(rule.roles) == 3 else [torch.cat([q, k, v], dim=0)]
    if kind == "reshape" and plan.split_dim is not None and size > 1:
        # no inverse of a block of a reshape by itself: export with zeros for the other ranks'
        # shards (a local computation), then take this rank's coordinates
        shards = [torch.zeros_like(local) for _ in range(size)]
        shards[rank] = local
        whole = module.EXPORTS[plan.megatron_name](shards)
        return [take(whole[p.label], p, sliced=True) for p in pieces]
    exported = module.EXPORTS[plan.megatron_name]([local])  # whole-tensor kinds, gated_mlp: exact
    return [exported[p.label] for p in pieces]


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank as `export_local` takes it apart: what does not change from
    one export to the next (its plan, its TP (expert-TP) group and the HF coordinates of its
    pieces), made once per Converter."""

    plan: ParamPlan
    rule: RulePlan
    group: Group
    pieces: tuple[HFPiece, ...]
    vocab_rows: Run | None  # the HF rows of a padded vocabulary parameter's shard


def local_plan(module: Module, placement: Placement, ctx: ParallelContext) -> list[LocalParam]:
    """This rank's parameters in HF order with their pieces; a shard of padding rows only has
    no piece and is left out."""
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    position = {t.name: i for i, t in enumerate(module.HF_TENSORS)}
    plans = [p for p in module.PARAMS if p.megatron_name in placement.local]
    plans.sort(key=lambda p: min(hf_order(position, n) for n in p.hf_names))
    rules = _rules(module)
    found: list[LocalParam] = []
    for plan in plans:
        group = ctx.etp if plan.expert_parallel else ctx.tp
        vocab_rows: Run | None = None
        if plan.megatron_name in placement.vocab and plan.split_dim is not None:
            rows = placement.local[plan.megatron_name].shape[0]
            first = group.rank * rows if group.size > 1 else 0
            vocab_rows = (min(first, plan.shape[0]), min(first + rows, plan.shape[0]))
        rule = rules[plan.rule]
        pieces = shard_pieces(rule, plan, shapes, group.rank, group.size, vocab_rows)
        if any(p.numel == 0 for p in pieces):  # a block of padding rows only
            continue
        found.append(LocalParam(plan, rule, group, pieces, vocab_rows))
    return found


def local_param_pieces(module: Module, entry: LocalParam, local: torch.Tensor, fmt: ExportFormat) -> list[LocalPiece]:
    """`entry`'s pieces with the values of `local` (its parameter, detached) in HF layout, in
    the export format's dtypes."""
    plan, group = entry.plan, entry.group
    if entry.vocab_rows is not None:
        local = local.narrow(0, 0, entry.vocab_rows[1] - entry.vocab_rows[0])
    data = _local_data(module, entry.rule, plan, local, group.rank, group.size, entry.pieces)
    found = []
    for piece, values in zip(entry.pieces, data):
        dtype = fmt.dtypes[piece.name]
        found.append(LocalPiece(
            piece,
            values if values.dtype == dtype else values.to(dtype),
            plan.split_dim is None,
            plan.megatron_name,
            plan.split_dim is not None or group.rank == 0,
        ))
    return found


def no_fp8_local(fmt: ExportFormat) -> None:
    if fmt.fp8:
        raise ExportFormatError(
            f"export_local writes no {fmt.scheme.upper()}: a block (or NVFP4's per-tensor scale) may span ranks; "
            f"quantize after assembling, or use export({fmt.scheme}=...)"
        )
