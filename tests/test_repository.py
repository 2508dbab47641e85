"""The checked-in generated/ is what the specs give, and everything type-checks."""

from __future__ import annotations

import subprocess
import sys

from mapgen.verify import testing


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


def test_deepseek_v3_module_describes_its_model() -> None:
    """61 layers: 3 dense (11 parameters each in the te layout), 58 with a router, its bias, a
    shared expert and 256 routed experts of 2 parameters each (8 + 1 + 2 + 2 + 512 = 525), plus
    embedding, final norm and output layer."""
    from generated import deepseek_v3

    # and the MTP block: enorm, hnorm, eh_proj, final_layernorm and one layer like the MoE ones
    assert len(deepseek_v3.PARAMS) == 3 + 3 * 11 + 58 * 525 + 4 + 525
    plans = {p.megatron_name: p for p in deepseek_v3.PARAMS}
    last = plans["decoder.layers.60.mlp.experts.linear_fc1.weight255"]
    assert (last.shape, last.split_dim, last.expert_parallel, last.layer, last.expert) == ((2 * 2048, 7168), 0, True, 60, 255)
    assert last.hf_names == tuple(f"model.layers.60.mlp.experts.255.{x}_proj.weight" for x in ("gate", "up"))
    assert plans["decoder.layers.60.mlp.experts.linear_fc2.weight255"].split_dim == 1
    assert plans["decoder.layers.5.self_attention.linear_kv_down_proj.weight"].shape == (512 + 64, 7168)
    assert plans["decoder.layers.5.self_attention.linear_kv_down_proj.weight"].split_dim is None  # TELinear
    assert plans["decoder.layers.5.self_attention.linear_q_up_proj.weight"].shape == (128 * (128 + 64), 1536)
    assert plans["decoder.layers.3.mlp.router.expert_bias"].dtype == "float32"
    assert "decoder.layers.2.mlp.router.weight" not in plans  # dense
    assert plans["decoder.layers.3.mlp.shared_experts.linear_fc1.weight"].shape == (2 * 2048, 7168)
    assert deepseek_v3.IGNORED_HF == {}  # layer 61, the multi-token-prediction layer, is mapped
    mtp = plans["mtp.layers.0.eh_proj.weight"]
    assert (mtp.shape, mtp.hf_names) == ((7168, 2 * 7168), ("model.layers.61.eh_proj.weight",))
    assert plans["mtp.layers.0.transformer_layer.mlp.experts.linear_fc1.weight255"].hf_names == tuple(
        f"model.layers.61.mlp.experts.255.{x}_proj.weight" for x in ("gate", "up")
    )
    assert deepseek_v3.DIMS.moe_router_topk_scaling_factor == 2.5 and deepseek_v3.DIMS.rope_type == "yarn"


def test_phi3_module_reads_its_fused_tensors() -> None:
    """Phi-3-mini-4k: linear_qkv from the one qkv_proj (32 heads, 32 groups, head_dim 96),
    linear_fc1 from the one gate_up_proj, a window of 2047 positions in all 32 layers."""
    from generated import phi3_mini_4k

    plans = {p.megatron_name: p for p in phi3_mini_4k.PARAMS}
    qkv = plans["decoder.layers.31.self_attention.linear_qkv.weight"]
    assert (qkv.shape, qkv.split_dim, qkv.hf_names) == ((3 * 3072, 3072), 0, ("model.layers.31.self_attn.qkv_proj.weight",))
    fc1 = plans["decoder.layers.31.mlp.linear_fc1.weight"]
    assert (fc1.shape, fc1.split_dim, fc1.hf_names) == ((2 * 8192, 3072), 0, ("model.layers.31.mlp.gate_up_proj.weight",))
    assert phi3_mini_4k.RULES[fc1.rule].roles == ("gate_up",)
    assert phi3_mini_4k.DIMS.sliding_window == 2047 and phi3_mini_4k.DIMS.window_attention_layers == tuple(range(32))
