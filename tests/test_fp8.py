"""FP8 block-quantized checkpoints (DeepSeek-V3's layout), dequantized on import, against a
quantizer and a per-block reference written here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mapgen.runtime.checkpoint import CheckpointError, HFCheckpoint

E4M3_MAX = 448.0


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe, one block at a time: scale_inv = amax / 448, fp8 = weight / scale_inv."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    fp8 = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            part = weight[rs, cs].float()
            s = part.abs().max().clamp(min=1e-12) / E4M3_MAX
            scale_inv[i, j] = s
            fp8[rs, cs] = (part / s).to(torch.float8_e4m3fn)
    return fp8, scale_inv


def reference_dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The plain definition: every block times its own scale."""
    out = torch.empty(fp8.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = fp8[rs, cs].to(torch.float32) * scale_inv[i, j]
    return out


def write(folder: Path, tensors: dict[str, torch.Tensor], block: list[int] | None = None) -> None:
    save_file(tensors, str(folder / "model.safetensors"))
    quantization: dict[str, object] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block is not None:
        quantization["weight_block_size"] = block
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": quantization}))


@pytest.mark.parametrize(
    ("shape", "block"),
    [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((40, 24), (16, 16)), ((37, 50), (16, 8)), ((5, 7), (16, 16))],
)
def test_dequantized_weights_match_the_per_block_reference(
    tmp_path: Path, shape: tuple[int, int], block: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different magnitudes
    fp8, scale_inv = quantize(weight, block)
    write(tmp_path, {"w.weight": fp8, "w.weight_scale_inv": scale_inv}, list(block))
    checkpoint = HFCheckpoint(tmp_path)
    assert checkpoint.block_size == block
    ours = checkpoint.get("w.weight")
    assert ours.dtype == torch.float32 and ours.shape == weight.shape
    assert torch.equal(ours, reference_dequantize(fp8, scale_inv, block))
    # e4m3 keeps 3 mantissa bits: at most 2^-4 relative error per element, less once the block's
    # largest element sets the scale; a small slack covers values flushed near zero
    bound = 2.0**-4 * weight.abs() + scale_inv.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(
        block[1], 1
    )[:, : shape[1]] * 2.0**-9
    assert bool(((ours - weight).abs() <= bound).all())
    assert float((ours - weight).norm() / weight.norm()) < 0.04
    assert checkpoint.integrity_problems() == []


def test_block_size_from_the_constructor_and_the_default(tmp_path: Path) -> None:
    weight = torch.randn(40, 24)
    fp8, scale_inv = quantize(weight, (16, 16))
    save_file({"w": fp8, "w_scale_inv": scale_inv}, str(tmp_path / "model.safetensors"))
    explicit = HFCheckpoint(tmp_path, block_size=(16, 16))
    assert torch.equal(explicit.get("w"), reference_dequantize(fp8, scale_inv, (16, 16)))
    # no config.json: scale companions alone mark the checkpoint as block-quantized, at 128 x 128
    implicit = HFCheckpoint(tmp_path)
    assert implicit.block_size == (128, 128)
    (problem,) = implicit.integrity_problems()
    assert "'w_scale_inv'" in problem and "[3, 2]" in problem and "[1, 1]" in problem
    with pytest.raises(CheckpointError, match="'w_scale_inv' has shape"):
        implicit.get("w")
    write(tmp_path, {"w": fp8, "w_scale_inv": scale_inv})  # config says fp8, without a block size
    assert HFCheckpoint(tmp_path).block_size == (128, 128)
    with pytest.raises(CheckpointError, match="two positive integers"):
        HFCheckpoint(tmp_path, block_size=(0, 16))


def test_scale_companions_are_hidden_and_other_tensors_stay_zero_copy(tmp_path: Path) -> None:
    fp8, scale_inv = quantize(torch.randn(40, 24), (16, 16))
    plain = {
        "embed.weight": torch.randn(10, 8).to(torch.bfloat16),
        "norm.weight": torch.randn(8),
        "fp16": torch.randn(3, 3).half(),
    }
    write(tmp_path, {"q.weight": fp8, "q.weight_scale_inv": scale_inv, **plain}, [16, 16])
    checkpoint = HFCheckpoint(tmp_path)
    assert sorted(checkpoint.names()) == sorted(["q.weight", *plain])
    assert "q.weight" in checkpoint and "q.weight_scale_inv" not in checkpoint
    assert checkpoint.scale_names() == ["q.weight_scale_inv"]
    assert checkpoint.quantized("q.weight") and not any(checkpoint.quantized(n) for n in plain)
    assert checkpoint.dtype("q.weight") == "F8_E4M3" and checkpoint.shape("q.weight") == (40, 24)
    assert checkpoint.loaded_dtype("q.weight") == torch.float32
    assert checkpoint.loaded_dtype("embed.weight") == torch.bfloat16
    with pytest.raises(CheckpointError, match="no tensor 'q.weight_scale_inv'"):
        checkpoint.get("q.weight_scale_inv")
    assert torch.equal(checkpoint.raw("q.weight_scale_inv"), scale_inv)
    assert torch.equal(checkpoint.raw("q.weight").view(torch.uint8), fp8.view(torch.uint8))
    data = (tmp_path / "model.safetensors").read_bytes()
    for name, tensor in plain.items():
        ours = checkpoint.get(name)
        assert ours.dtype == tensor.dtype and torch.equal(ours, tensor), name
        # a view into the mapped file, whose bytes are the file's own at that offset
        start = data.index(ours.contiguous().view(torch.uint8).numpy().tobytes())
        assert checkpoint._entries[name].start == start
        assert not ours.untyped_storage().resizable()
    dequantized = checkpoint.get("q.weight")
    dequantized.add_(1)  # a new tensor: neither the file nor a second read sees this
    assert not torch.equal(checkpoint.get("q.weight"), dequantized)
    assert (tmp_path / "model.safetensors").read_bytes() == data


def test_broken_quantization_is_reported_by_name(tmp_path: Path) -> None:
    fp8, scale_inv = quantize(torch.randn(40, 24), (16, 16))
    write(
        tmp_path,
        {
            "good.weight": fp8,
            "good.weight_scale_inv": scale_inv,
            "unscaled.weight": fp8.clone(),
            "wrong.weight": fp8.clone(),
            "wrong.weight_scale_inv": torch.ones(2, 2),
            "orphan.weight_scale_inv": scale_inv.clone(),
            "bf16.weight": torch.randn(40, 24).to(torch.bfloat16),
            "bf16.weight_scale_inv": scale_inv.clone(),
        },
        [16, 16],
    )
    checkpoint = HFCheckpoint(tmp_path)
    problems = checkpoint.integrity_problems()
    file = str(tmp_path / "model.safetensors")
    assert all(p.startswith(file + ": ") for p in problems)
    assert len(problems) == 4, problems
    (unscaled,) = [p for p in problems if "'unscaled.weight'" in p]
    assert "has no scale 'unscaled.weight_scale_inv'" in unscaled
    (wrong,) = [p for p in problems if "'wrong.weight_scale_inv'" in p]
    assert "[2, 2]" in wrong and "needs [3, 2]" in wrong and "'wrong.weight'" in wrong
    (orphan,) = [p for p in problems if "'orphan.weight_scale_inv'" in p]
    assert "no weight 'orphan.weight'" in orphan
    (bf16,) = [p for p in problems if "'bf16.weight_scale_inv'" in p]
    assert "BF16" in bf16
    for name in ("unscaled.weight", "wrong.weight"):
        with pytest.raises(CheckpointError, match=name):
            checkpoint.get(name)
    assert not checkpoint.quantized("bf16.weight") and checkpoint.get("bf16.weight").dtype == torch.bfloat16
    assert "orphan.weight_scale_inv" not in checkpoint.names()


def test_sharded_fp8_checkpoint_with_scales_in_another_shard(tmp_path: Path) -> None:
    weight = torch.randn(300, 200)
    fp8, scale_inv = quantize(weight, (128, 128))
    save_file({"w.weight": fp8, "b": torch.ones(3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"w.weight_scale_inv": scale_inv}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {
        "w.weight": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "w.weight_scale_inv": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    )
    checkpoint = HFCheckpoint(tmp_path)
    assert sorted(checkpoint.names()) == ["b", "w.weight"]
    assert torch.equal(checkpoint.get("w.weight"), reference_dequantize(fp8, scale_inv, (128, 128)))
    assert checkpoint.integrity_problems() == []


def test_plain_fp8_without_quantization_config_reads_as_stored(tmp_path: Path) -> None:
    tensor = torch.randn(4, 4).to(torch.float8_e4m3fn)
    save_file({"a": tensor}, str(tmp_path / "model.safetensors"))
    checkpoint = HFCheckpoint(tmp_path)
    assert not checkpoint.fp8 and not checkpoint.quantized("a")
    assert checkpoint.get("a").dtype == torch.float8_e4m3fn
    assert checkpoint.integrity_problems() == []


def test_fp8_deepseek_checkpoint_loads_dequantized_into_megatron(
    tmp_path: Path, tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None
) -> None:
    """A tiny DeepSeek-V3 quantized as the published one is (every linear weight but the
    router's, in blocks; 16x16 here so the tiny shapes have whole and partial blocks) loads
    into megatron-core exactly as its dequantized float32 twin does; logits match transformers
    on that twin, and export gives the twin's tensors bit for bit."""
    import transformers
    from safetensors.torch import load_file

    from mapgen.verify import forward
    from mapgen.compiler.gpt_model import build_gpt_model
    from mapgen.runtime.drivers import export_hf_tensors, load_hf_checkpoint

    block = (16, 16)
    folder, _ = tiny_checkpoint("deepseek_v3")
    config = json.loads((folder / "config.json").read_text())
    quantized, dequantized = tmp_path / "fp8", tmp_path / "dequantized"
    quantized.mkdir()
    dequantized.mkdir()
    stored, twin = {}, {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name.endswith("proj.weight") or name.endswith("_with_mqa.weight"):
            fp8, scale_inv = quantize(tensor, block)
            stored[name], stored[name + "_scale_inv"] = fp8, scale_inv
            twin[name] = reference_dequantize(fp8, scale_inv, block)
        else:
            stored[name] = twin[name] = tensor
    assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) > 40
    save_file(stored, str(quantized / "model.safetensors"))
    save_file(twin, str(dequantized / "model.safetensors"))
    fp8_config = {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}}
    (quantized / "config.json").write_text(json.dumps(fp8_config))
    (dequantized / "config.json").write_text(json.dumps(config))

    module = compile_module("deepseek_v3", folder / "config.json")
    from_fp8 = build_gpt_model(module.DIMS, params_dtype=torch.float32).eval()
    from_twin = build_gpt_model(module.DIMS, params_dtype=torch.float32).eval()
    load_hf_checkpoint(module, [from_fp8], quantized)
    load_hf_checkpoint(module, [from_twin], dequantized)
    twin_state = from_twin.state_dict()
    for name, value in from_fp8.state_dict().items():
        if "_extra_state" not in name:
            assert torch.equal(value, twin_state[name]), name

    reference = transformers.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    assert (forward.megatron_logits(from_fp8, ids) - forward.hf_logits(reference, ids)).abs().max() <= 1e-5
    for name, tensor in export_hf_tensors(module, [from_fp8]):
        assert torch.equal(tensor, twin[name]), name
