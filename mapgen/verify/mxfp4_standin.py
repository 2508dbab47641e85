"""MXFP4 stand-ins: a float checkpoint's expert weights stored as transformers reads gpt-oss's
published MXFP4 files (`X_blocks` and `X_scales`, `mapgen.runtime.mxfp4`), and its dequantized
twin (the same model with each quantized tensor replaced by its exact MXFP4 value).

transformers' MXFP4 quantizer covers the experts' stacked `gate_up_proj` and `down_proj`
(GptOssExperts); those are the tensors quantized here. Every other tensor is copied as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mapgen.runtime import mxfp4

QUANTIZED_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
# what gpt-oss's published quantization_config leaves in bfloat16
DEFAULT_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                found[name] = handle.get_tensor(name)
    return found


def quantized_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in tensors.items() if n.endswith(QUANTIZED_SUFFIXES) and t.dim() == 3]


def write_mxfp4_twins(source: Path, quantized: Path, twin: Path, quantization_config: dict[str, Any] | None = None) -> list[str]:
    """From the float checkpoint in `source`, write `quantized` (its expert weights in MXFP4,
    config.json with `quantization_config` quant_method mxfp4) and `twin` (the same weights
    dequantized, in `source`'s dtype, as one model.safetensors; no quantization_config).
    Returns the names of the quantized tensors. Each folder gets `source`'s config.json."""
    tensors = _tensors(source)
    names = quantized_names(tensors)
    if not names:
        raise ValueError(f"{source}: no stacked expert weights ({', '.join(QUANTIZED_SUFFIXES)}) to quantize")
    stored: dict[str, torch.Tensor] = {}
    twins: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in names:
            blocks, scales = mxfp4.quantize(tensor)
            stored[name + mxfp4.BLOCKS_SUFFIX], stored[name + mxfp4.SCALES_SUFFIX] = blocks, scales
            value = mxfp4.dequantize(blocks, scales).to(tensor.dtype)
            if not torch.equal(value.float(), mxfp4.dequantize(blocks, scales)):
                raise ValueError(f"{name}: its MXFP4 values do not fit {tensor.dtype}")
            twins[name] = value.contiguous()
        else:
            stored[name] = tensor.contiguous()
            twins[name] = tensor.contiguous()
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    for folder, content, extra in ((quantized, stored, True), (twin, twins, False)):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(content, str(folder / "model.safetensors"), metadata={"format": "pt"})
        written = dict(config)
        if extra:
            written["quantization_config"] = dict(
                quantization_config or {"modules_to_not_convert": DEFAULT_NOT_CONVERTED, "quant_method": "mxfp4"}
            )
        (folder / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        for extra_file in ("generation_config.json",):
            if (source / extra_file).is_file():
                shutil.copy(source / extra_file, folder / extra_file)
    return names
