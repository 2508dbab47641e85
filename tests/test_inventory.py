"""The Megatron inventory and `auto` resolution."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mapgen.dims import ModelDims
from mapgen.expand import MODULE_TYPES, resolve_auto
from mapgen.inventory import MegatronParam, _skeleton_params, megatron_inventory
from mapgen.megatron_model import build_gpt_model, ensure_single_process_parallel_state

DIMS = ModelDims(
    num_layers=5, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=32, vocab_size=128, max_position_embeddings=256, qk_layernorm=True, add_qkv_bias=True,
)


def test_one_layer_expansion_equals_a_full_build() -> None:
    ensure_single_process_parallel_state()
    with torch.device("meta"):
        full = build_gpt_model(DIMS)
    expected = _skeleton_params(full, DIMS.params_dtype)
    ours = [replace(p, te_name="") for p in megatron_inventory(DIMS, "local")]
    assert ours == expected


def test_te_layout_names_and_modules() -> None:
    te = {p.name: p for p in megatron_inventory(DIMS, "te")}
    local = megatron_inventory(DIMS, "local")
    assert len(te) == len(local)
    fused_norm = te["decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"]
    assert fused_norm.module_kind == "TELayerNormColumnParallelLinear" and fused_norm.layer == 3
    assert te["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"].shape == (64,)
    assert te["decoder.layers.0.mlp.linear_fc1.weight"].module_kind == "TELayerNormColumnParallelLinear"
    assert te["decoder.layers.0.mlp.linear_fc2.weight"].module_kind == "TERowParallelLinear"
    assert te["decoder.layers.0.self_attention.q_layernorm.weight"].module_kind == "TENorm"
    assert te["output_layer.weight"].module_kind == "ColumnParallelLinear"
    assert not any("input_layernorm" in name or "pre_mlp_layernorm" in name for name in te)
    by_te_name = {p.te_name: p.name for p in local}
    assert by_te_name["decoder.layers.4.mlp.linear_fc1.layer_norm_weight"] == "decoder.layers.4.pre_mlp_layernorm.weight"


def _param(kind: str, name: str = "x.weight", partition_dim: int | None = None, mode: str | None = None) -> MegatronParam:
    return MegatronParam(name, (4, 4), "float32", kind, partition_dim, None, parallel_mode=mode)


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (_param("TELayerNormColumnParallelLinear", "a.layer_norm_weight"), "replicated"),
        (_param("TELayerNormColumnParallelLinear", "a.layer_norm_bias"), "replicated"),
        (_param("TELayerNormColumnParallelLinear", "a.weight"), "column"),
        (_param("VocabParallelEmbedding"), "column"),
        (_param("TERowParallelLinear"), "row"),
        (_param("TopKRouter"), "replicated"),
        (_param("SomeCustomLinear", partition_dim=1), "row"),
        (_param("SomeCustomLinear", partition_dim=0), "column"),
        (_param("MyFancyNorm"), "replicated"),
        (_param("TELinear", mode="row"), "row"),
        (_param("TELinear", mode="duplicated"), "replicated"),
        (_param("SomethingElse"), None),
    ],
)
def test_resolve_auto(param: MegatronParam, expected: str | None) -> None:
    assert resolve_auto(param, MODULE_TYPES) == expected


def test_registered_module_type_wins() -> None:
    assert resolve_auto(_param("SomethingElse"), {**MODULE_TYPES, "SomethingElse": "row"}) == "row"
