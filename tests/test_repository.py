"""The checked-in generated/ is what the specs give, and everything type-checks."""

from __future__ import annotations

import subprocess
import sys

from mapgen import testing


def test_generated_modules_are_fresh() -> None:
    """`mapgen check` as a test: fails with the diff and the command that fixes it."""
    result = subprocess.run(
        [sys.executable, "-m", "mapgen.cli", "check"],
        cwd=testing.ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr


def test_mypy_strict_passes_on_mapgen_and_generated() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "mapgen", "generated"],
        cwd=testing.ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:]


def test_generated_modules_import_and_describe_their_models() -> None:
    from generated import llama3_1_8b, llama3_2_1b, qwen2_5_7b, qwen3_8b

    assert llama3_1_8b.DIMS.num_layers == 32 and llama3_1_8b.LAYOUT == "te"
    assert llama3_2_1b.DIMS.share_embeddings_and_output_weights
    assert "output_layer.weight" not in llama3_2_1b.IMPORTS
    assert "lm_head.weight" not in {t.name for t in llama3_2_1b.HF_TENSORS}
    bias = {p.megatron_name: p for p in qwen2_5_7b.PARAMS}["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert bias.shape == ((28 + 2 * 4) * 128,) and bias.split_dim == 0
    assert qwen3_8b.DIMS.kv_channels == 128 and qwen3_8b.DIMS.hidden_size == 4096
    plans = {p.megatron_name: p for p in qwen3_8b.PARAMS}
    qkv = plans["decoder.layers.35.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((32 + 2 * 8) * 128, 4096) and qkv.split_dim == 0
    assert qkv.hf_names == tuple(f"model.layers.35.self_attn.{x}_proj.weight" for x in "qkv")
