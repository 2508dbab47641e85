"""MXFP8 and NVFP4 export (issue 27, item 3): the quantizers' bytes against references written
here from the published formats (OCP MX v1.0 with E8M0 scales rounded up so nothing saturates,
as ModelOpt and cuBLAS round them; NVIDIA's NVFP4 as ModelOpt's NVFP4QTensor computes it) and,
where it is installed, against torchao's quantizers; round trips within each format's error
bound; the export of a tiny DeepSeek-V3 (what is quantized, the companions' names, dtypes and
shapes, the refusals) and the saved checkpoint's quantization_config, which compressed-tensors
itself validates where it is installed. The TP2 x PP2 x EP2 export against a single process is
in test_weight_sync.py's spawn (STREAMED)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.runtime import mx
from mapgen.runtime.drivers import Converter, load_hf_checkpoint
from mapgen.runtime.save import save_hf_checkpoint
from mapgen.runtime.formats import ExportFormatError

FP8 = torch.float8_e4m3fn


# --- references written from the formats' documents -----------------------------------------


def _e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite non-negative E4M3 (fn) value and its code, from the bit layout: sign, 4
    exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F is NaN."""
    values, codes = [], []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        value = mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        values.append(value)
        codes.append(code)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(codes, dtype=torch.int64)


def _nearest(magnitude: torch.Tensor, values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The code of the nearest value to each magnitude (float64 distances), ties to the even
    code, saturating at the largest."""
    distance = (magnitude.double().unsqueeze(-1) - values).abs()
    best = distance.min(dim=-1, keepdim=True).values
    tied = distance == best
    even = tied & (codes % 2 == 0)
    pick = torch.where(even.any(dim=-1, keepdim=True), even, tied).to(torch.int64).argmax(dim=-1)
    return codes[pick]


def reference_mxfp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX: per 32 elements of a row, X = ceil(log2(amax / 448)) (the smallest power of two
    that fits the block in E4M3), E8M0 byte X + 127 (0 for a block of zeros); elements
    x / 2^X to the nearest E4M3, ties to even."""
    x = weight.double().reshape(*weight.shape[:-1], -1, 32)
    amax = x.abs().amax(dim=-1)
    power = torch.where(amax > 0, torch.ceil(torch.log2(amax / 448.0)), torch.full_like(amax, -127.0)).clamp(-127, 127)
    quotient = x / torch.exp2(power).unsqueeze(-1)
    values, codes = _e4m3_table()
    code = _nearest(quotient.abs(), values, codes) | ((quotient < 0).to(torch.int64) << 7)
    return code.to(torch.uint8).reshape(weight.shape).view(FP8), (power + 127).to(torch.uint8)


def reference_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 (ModelOpt's recipe): s2 = amax / (6 * 448) in float32; per 16 elements, block
    scale = E4M3 nearest of clamp(block amax / (6 * s2), 2^-9, 448) (1.0 for zeros); elements
    x / (scale * s2) in float32 to the nearest E2M1 magnitude, ties to the even code, sign in
    bit 3; two per byte, the even element low."""
    x = weight.to(torch.float32)
    s2 = x.abs().max() / torch.tensor(2688.0)
    blocks = x.reshape(x.shape[0], -1, 16)
    per_block = blocks.abs().amax(dim=-1) / (6.0 * s2)
    per_block[per_block == 0] = 1.0
    values, codes = _e4m3_table()
    scale_codes = _nearest(per_block.clamp(2.0**-9, 448.0), values, codes)
    scale = values[scale_codes].to(torch.float32)
    quotient = blocks / (scale * s2).unsqueeze(-1)
    e2m1 = torch.tensor(mx.E2M1_VALUES, dtype=torch.float64)
    code = _nearest(quotient.abs(), e2m1, torch.arange(8)) | ((quotient < 0).to(torch.int64) << 3)
    code = code.reshape(x.shape[0], -1, 2)
    packed = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8)
    return packed, scale_codes.to(torch.uint8).view(FP8), s2


def _weights(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows over 11 decades, a row and a block of zeros, and exact ties of both formats."""
    torch.manual_seed(seed)
    w = torch.randn(64, 256) * torch.logspace(-6, 5, 64)[:, None]
    w[3] = 0
    w[5, :32] = 0
    w[7, :32] = torch.tensor([448.0, 1.0, 0.5, -448.0 * 3 / 4] + [0.25 * 2.0**-6] * 28)  # MXFP8: amax exactly 448
    w[9, :16] = torch.tensor([6.0, 0.75, 1.75, 3.5, 0.25, 1.25, 2.5, 5.0, -0.75, -5.0, -0.1, 0, 0, 0, 0, 0])  # E2M1 ties
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp8_bytes_are_the_reference_and_round_trip_within_e4m3(dtype: torch.dtype) -> None:
    w = _weights(dtype)
    codes, scales = mx.quantize_mxfp8(w)
    ref_codes, ref_scales = reference_mxfp8(w)
    assert codes.dtype == FP8 and codes.shape == w.shape and scales.dtype == torch.uint8 and scales.shape == (64, 8)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert int(scales[3].max()) == 0 and int(scales[5, 0]) == 0  # zeros: byte 0
    assert int(scales[7, 0]) == 127  # 448 fits at scale 1: not rounded up to 2
    back = mx.dequantize_mxfp8(codes, scales)
    unit = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)
    bound = torch.maximum(w.float().abs() * 2.0**-4, unit * 2.0**-10)  # e4m3: half an ulp, or of a subnormal step
    assert bool(((back - w.float()).abs() <= bound).all())
    # the scale is the smallest power of two that fits: every block's largest code is at least 224 (amax / 2^X in (224, 448])
    largest = codes.float().abs().reshape(64, 8, 32).amax(dim=-1)
    assert bool((largest[scales > 0] >= 224).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_bytes_are_the_reference_and_round_trip_within_e2m1(dtype: torch.dtype) -> None:
    w = _weights(dtype, seed=1)[:, :].clone()
    w = w / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) * torch.logspace(-2, 1, 64)[:, None].to(dtype)  # one tensor scale fits
    w[9, :16] = torch.tensor([6.0, 0.75, 1.75, 3.5, 0.25, 1.25, 2.5, 5.0, -0.75, -5.0, -0.1, 0, 0, 0, 0, 0]).to(dtype)
    w[3] = 0
    packed, scales, s2 = mx.quantize_nvfp4(w)
    ref_packed, ref_scales, ref_s2 = reference_nvfp4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)
    assert scales.dtype == FP8 and scales.shape == (64, 16) and s2.dtype == torch.float32 and s2.shape == ()
    assert torch.equal(s2, ref_s2.reshape(()))
    assert torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))
    assert torch.equal(packed, ref_packed)
    back = mx.dequantize_nvfp4(packed, scales, s2)
    step = (scales.float() * s2).repeat_interleave(16, dim=1)
    quotient = w.float().abs() / step
    half = torch.where(quotient < 2, 0.25, torch.where(quotient < 4, 0.5, 1.0)) * step  # half E2M1's step there
    assert bool(((back - w.float()).abs() <= half * (1 + 2.0**-20)).all())
    assert float(back.abs().max()) > 0 and bool((back[3] == 0).all())


def test_nvfp4_global_scale_can_be_shared() -> None:
    torch.manual_seed(2)
    a, b = torch.randn(8, 32), torch.randn(8, 32) * 10
    shared = torch.maximum(a.abs().max(), b.abs().max())
    _, _, sa = mx.quantize_nvfp4(a, shared)
    _, _, sb = mx.quantize_nvfp4(b, shared)
    assert torch.equal(sa, sb) and torch.equal(sa, shared / 2688.0)
    _, _, zero = mx.quantize_nvfp4(torch.zeros(2, 16))
    assert float(zero) == 1.0  # a tensor of zeros: no 0 / 0


def test_a_last_dim_off_the_block_is_refused_by_the_quantizers() -> None:
    with pytest.raises(mx.QuantizeError, match="divisible by 32"):
        mx.quantize_mxfp8(torch.ones(4, 48))
    with pytest.raises(mx.QuantizeError, match="divisible by 16"):
        mx.quantize_nvfp4(torch.ones(4, 40))


# --- an independent quantizer, where it is installed -------------------------------------------


def _independent_missing(what: str, exc: ImportError) -> None:
    """torchao and compressed-tensors need torch >= 2.10: pyproject's test extra installs them on
    the Python 3.11 stack (torch 2.13), where their absence is a failure; on the other stack
    (torch 2.9.1) the check is skipped, and the reference quantizers above still run."""
    if sys.version_info < (3, 12):
        raise AssertionError(f"{what} is in the test extra for this stack but does not import: {exc}")
    pytest.skip(f"{what} needs torch >= 2.10 (this stack has torch {torch.__version__}): {exc}")


def test_mxfp8_bytes_match_torchao() -> None:
    """torchao's MX quantizer with its RCEIL scale (NVIDIA's rounding; torchao's default FLOOR
    is OCP's, which saturates the block's largest values instead)."""
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    except ImportError as exc:
        _independent_missing("torchao's MX formats", exc)

    for dtype in (torch.bfloat16, torch.float32):
        w = _weights(dtype, seed=3)
        theirs_scale, theirs = to_mx(w.contiguous(), FP8, 32, ScaleCalculationMode.RCEIL)
        codes, scales = mx.quantize_mxfp8(w)
        assert torch.equal(scales, theirs_scale.view(torch.uint8).reshape(scales.shape))
        assert torch.equal(codes.view(torch.uint8), theirs.to(FP8).view(torch.uint8).reshape(codes.shape))


def test_nvfp4_bytes_match_torchao_off_exact_ties() -> None:
    """torchao's NVFP4 with the per-tensor scale amax / (6 * 448): it multiplies by a reciprocal
    where ModelOpt divides, so the two part only at exact E2M1 ties (as bf16 weights can hit);
    float32 weights off the ties agree byte for byte."""
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale
    except ImportError as exc:
        _independent_missing("torchao's NVFP4", exc)

    torch.manual_seed(4)
    w = torch.randn(128, 512) * torch.logspace(-1, 1, 128)[:, None]
    theirs_scale, theirs = nvfp4_quantize(w.contiguous(), 16, per_tensor_amax_to_scale(w.abs().max()))
    packed, scales, _ = mx.quantize_nvfp4(w)
    assert torch.equal(scales.view(torch.uint8), theirs_scale.view(torch.uint8).reshape(scales.shape))
    assert torch.equal(packed, theirs.view(torch.uint8).reshape(packed.shape))


# --- the export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek(tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None) -> tuple[Path, Any, dict[str, torch.Tensor]]:
    folder, _ = tiny_checkpoint("deepseek_v3")
    return folder, compile_module("deepseek_v3", folder / "config.json"), load_file(folder / "model.safetensors")


def _converter(module: Any, folder: Path) -> Converter:
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32).eval()
    load_hf_checkpoint(module, [model], folder)
    return Converter(module, [model])


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def _off_block(original: dict[str, torch.Tensor], linear: frozenset[str], block: int) -> list[str]:
    return sorted(n for n in linear if original[n].shape[-1] % block)


def test_nvfp4_export_quantizes_the_linear_weights_as_modelopt_writes_them(deepseek: Any) -> None:
    folder, module, original = deepseek
    converter = _converter(module, folder)
    linear = converter.export_format(fp8=True).fp8  # the static plan's linear weights (FP8's set)
    assert not _off_block(original, linear, 16)
    exported = dict(converter.export(dtype=torch.bfloat16, nvfp4=True, bucket_bytes=4096))
    fmt = converter.export_format(dtype=torch.bfloat16, nvfp4=True)
    assert fmt.fp8 == linear and fmt.scheme == "nvfp4"
    expected = set(original) | {n + s for n in linear for s in ("_scale", "_scale_2")}
    assert set(exported) == expected
    for name in linear:
        rows, cols = original[name].shape
        weight, scale, s2 = exported[name], exported[name + "_scale"], exported[name + "_scale_2"]
        assert (weight.dtype, tuple(weight.shape)) == (torch.uint8, (rows, cols // 2))
        assert (scale.dtype, tuple(scale.shape)) == (FP8, (rows, cols // 16))
        assert (s2.dtype, tuple(s2.shape)) == (torch.float32, ())
        back = mx.dequantize_nvfp4(weight, scale, s2)
        step = (scale.float() * s2).repeat_interleave(16, dim=1)
        assert bool(((back - original[name].float()).abs() <= step * (1 + 2.0**-20)).all()), name
    for name in original:
        if name not in linear:  # norms, the router, embeddings, lm_head: as they are
            assert exported[name].dtype in (torch.bfloat16, torch.float32), name
    # the tensors one Megatron parameter exports share the per-tensor scale (gate and up)
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(exported[gate + "_scale_2"], exported[up + "_scale_2"])
    assert torch.equal(exported[gate + "_scale_2"], torch.maximum(original[gate].abs().max(), original[up].abs().max()) / 2688.0)
    config = fmt.quantization_config
    assert config is not None and config["quant_method"] == "modelopt" and config["quant_algo"] == "W4A16_NVFP4"
    assert "model.layers.1.mlp.gate" in config["ignore"] and "lm_head" in config["ignore"]
    assert not set(config["ignore"]) & {n.removesuffix(".weight") for n in linear}


def test_mxfp8_export_and_its_refusals(deepseek: Any) -> None:
    folder, module, original = deepseek
    converter = _converter(module, folder)
    linear = converter.export_format(fp8=True).fp8
    off = _off_block(original, linear, 32)
    if off:  # a last dim off the block is refused, naming it; the config's ignore leaves it out
        with pytest.raises(ExportFormatError, match="divisible by 32"):
            next(converter.export(mxfp8=True))
    request = {"quant_method": "compressed-tensors", "format": "mxfp8-quantized", "ignore": [n.removesuffix(".weight") for n in off]}
    exported = dict(converter.export(dtype=torch.bfloat16, mxfp8=request, bucket_bytes=4096))
    quantized = linear - set(off)
    assert quantized and set(exported) == set(original) | {n + "_scale" for n in quantized}
    for name in quantized:
        rows, cols = original[name].shape
        codes, scales = exported[name], exported[name + "_scale"]
        assert codes.dtype == FP8 and scales.dtype == torch.uint8 and tuple(scales.shape) == (rows, cols // 32)
        ours = mx.quantize_mxfp8(original[name])  # from the model's float32 values, not a bf16 cast
        assert torch.equal(codes.view(torch.uint8), ours[0].view(torch.uint8)) and torch.equal(scales, ours[1])
    config = converter.export_format(dtype=torch.bfloat16, mxfp8=request).quantization_config
    assert config is not None and config["format"] == "mxfp8-quantized" and config["quant_method"] == "compressed-tensors"
    assert set(off) <= {n + ".weight" for n in config["ignore"]}
    with pytest.raises(ExportFormatError, match="alternatives"):
        next(converter.export(fp8=True, nvfp4=True))
    with pytest.raises(ExportFormatError, match="export_local writes no MXFP8"):
        next(converter.export_local(mxfp8=True))
    with pytest.raises(ExportFormatError, match="export_local writes no NVFP4"):
        next(converter.export_local(nvfp4=True))
    with pytest.raises(ExportFormatError, match="W4A16_NVFP4 is"):
        next(converter.export(nvfp4={"quant_algo": "NVFP4"}))
    with pytest.raises(ExportFormatError, match="mxfp8-quantized"):
        next(converter.export(mxfp8={"quant_method": "fp8"}))


def test_saved_checkpoints_carry_a_loadable_quantization_config(deepseek: Any, tmp_path: Path) -> None:
    folder, module, original = deepseek
    converter = _converter(module, folder)
    config = json.loads((folder / "config.json").read_text())
    save_hf_checkpoint(module, converter.chunks, tmp_path / "nvfp4", config, dtype=torch.bfloat16, nvfp4=True, max_shard_bytes=20_000)
    written = json.loads((tmp_path / "nvfp4" / "config.json").read_text())
    fmt = converter.export_format(dtype=torch.bfloat16, nvfp4=True)
    assert written["quantization_config"] == fmt.quantization_config
    modelopt = json.loads((tmp_path / "nvfp4" / "hf_quant_config.json").read_text())
    assert modelopt["quantization"]["quant_algo"] == "W4A16_NVFP4" and modelopt["quantization"]["group_size"] == 16
    assert modelopt["quantization"]["kv_cache_quant_algo"] is None
    assert modelopt["quantization"]["exclude_modules"] == written["quantization_config"]["ignore"]
    index = json.loads((tmp_path / "nvfp4" / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name in fmt.fp8:  # each weight's scales in its own file
        assert index[name] == index[name + "_scale"] == index[name + "_scale_2"], name
    for file in set(index.values()):
        files[file] = load_file(tmp_path / "nvfp4" / file)
    saved = {n: files[f][n] for n, f in index.items()}
    exported = dict(converter.export(dtype=torch.bfloat16, nvfp4=True))
    assert set(saved) == set(exported) and len(set(index.values())) > 1
    assert all(saved[n].dtype == exported[n].dtype and torch.equal(_bytes(saved[n]), _bytes(exported[n])) for n in saved)
    # MXFP8 (the tensors whose last dim is off the block left out) and compressed-tensors' own check
    off = [n.removesuffix(".weight") for n in _off_block(original, fmt.fp8, 32)]
    save_hf_checkpoint(module, converter.chunks, tmp_path / "mxfp8", config, dtype=torch.bfloat16, mxfp8={"ignore": off})
    written = json.loads((tmp_path / "mxfp8" / "config.json").read_text())["quantization_config"]
    assert written["format"] == "mxfp8-quantized" and not (tmp_path / "mxfp8" / "hf_quant_config.json").exists()
    weights = written["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["group_size"], weights["scale_dtype"]) == (
        8, "float", "group", 32, "torch.uint8"
    )
    # unquantized again: no quantization_config claims what the files do not hold
    save_hf_checkpoint(module, converter.chunks, tmp_path / "plain", {**config, "quantization_config": written}, dtype=torch.bfloat16)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    try:
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy, QuantizationType
    except ImportError as exc:
        _independent_missing("compressed-tensors", exc)
    parsed = QuantizationConfig.model_validate(written)
    args = parsed.config_groups["group_0"].weights
    assert args.strategy == QuantizationStrategy.GROUP and args.type == QuantizationType.FLOAT
    assert args.num_bits == 8 and args.group_size == 32 and args.scale_dtype == torch.uint8
    assert parsed.config_groups["group_0"].input_activations.dynamic is True
