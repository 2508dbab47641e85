"""The Megatron inventory and `auto` resolution."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mapgen.common.dims import ModelDims
from mapgen.compiler.autosplit import MODULE_TYPES, resolve_auto
from mapgen.compiler.inventory import MegatronParam, skeleton_params
from mapgen.compiler.model_classes import megatron_inventory
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.compiler.parallel_state import ensure_single_process_parallel_state

DIMS = ModelDims(
    num_layers=5, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=32, vocab_size=128, max_position_embeddings=256, qk_layernorm=True, add_qkv_bias=True,
)


# DeepSeek-V3's shape: MLA, one dense layer then experts (router bias buffer, shared experts)
MOE_DIMS = replace(
    DIMS, num_query_groups=4, qk_layernorm=True, add_qkv_bias=False, num_moe_experts=4,
    moe_ffn_hidden_size=32, moe_dense_layers=(0,), moe_shared_expert_intermediate_size=32,
    moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
    multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
    qk_pos_emb_head_dim=4, v_head_dim=8,
)

# Qwen3-MoE's shape with mlp_only_layers / decoder_sparse_step: dense and expert layers
# interleaved; sliding windows in some layers (which shape no parameter)
INTERLEAVED_DIMS = replace(
    DIMS, num_moe_experts=4, moe_ffn_hidden_size=32, moe_dense_layers=(0, 2, 4),
    sliding_window=3, sliding_window_layers=(1, 2),
)


# Qwen3-Next's shape: gated delta net layers (0, 1, 3) across dense (0, 3) and expert layers, a
# gated shared expert, attention output gate, zero-centred norms: four kinds of layer
GDN_DIMS = replace(
    INTERLEAVED_DIMS, moe_dense_layers=(0, 3), sliding_window=None, sliding_window_layers=(),
    moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, attention_output_gate=True,
    layernorm_zero_centered_gamma=True, linear_attention_layers=(0, 1, 3), linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
)


# with megatron-core's multi-token-prediction block: its layer is built from the decoder's last
# layer spec (DeepSeek-V3: experts; interleaved: the last layer, 4, is dense; megatron-core's MTP
# layer indexes a per-layer sliding-window list past its end, so without windows)
MTP_CASES = [
    replace(MOE_DIMS, mtp_num_layers=1),
    replace(INTERLEAVED_DIMS, sliding_window=None, sliding_window_layers=(), mtp_num_layers=2),
    # Qwen3-Next's: after gated delta net layers, the last (attention, experts) layer's kind, with
    # zero-centred enorm, hnorm and final_layernorm
    replace(GDN_DIMS, mtp_num_layers=1),
]


@pytest.mark.parametrize(
    "dims",
    [DIMS, MOE_DIMS, INTERLEAVED_DIMS, GDN_DIMS, *MTP_CASES],
    ids=["dense", "mla-moe", "interleaved-moe", "gated-delta-net", "mla-moe-mtp", "interleaved-mtp2", "gated-delta-net-mtp"],
)
def test_one_layer_expansion_equals_a_full_build(dims: ModelDims) -> None:
    ensure_single_process_parallel_state()
    with torch.device("meta"):
        full = build_gpt_model(dims)
    expected = skeleton_params(full, dims.params_dtype)
    ours = [replace(p, te_name="") for p in megatron_inventory(dims, "local")]
    # the same entries; weight buffers come after all parameters in a full build's listing
    assert sorted(ours, key=lambda p: p.name) == sorted(expected, key=lambda p: p.name)


def test_moe_inventory_has_experts_and_the_router_bias() -> None:
    local = {p.name: p for p in megatron_inventory(MOE_DIMS, "local")}
    expert = local["decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight"]
    assert (expert.layer, expert.expert, expert.partition_dim) == (3, 2, 1)
    bias = local["decoder.layers.1.mlp.router.expert_bias"]  # a buffer, kept in float32
    assert (bias.shape, bias.dtype, bias.module_kind) == ((4,), "float32", "TopKRouter")
    assert "decoder.layers.0.mlp.router.weight" not in local  # the dense layer
    assert local["decoder.layers.0.mlp.linear_fc1.weight"].expert is None
    te = {p.name: p for p in megatron_inventory(MOE_DIMS, "te")}
    assert te["decoder.layers.4.mlp.experts.linear_fc1.weight3"].module_kind == "TEColumnParallelGroupedLinear"
    assert te["decoder.layers.4.mlp.experts.linear_fc2.weight3"].module_kind == "TERowParallelGroupedLinear"
    assert te["decoder.layers.4.mlp.shared_experts.linear_fc1.weight"].module_kind == "TEColumnParallelLinear"
    down = te["decoder.layers.4.self_attention.linear_kv_down_proj.weight"]
    assert (down.module_kind, down.parallel_mode, down.partition_dim) == ("TELinear", "duplicated", None)
    assert te["decoder.layers.4.input_layernorm.weight"].module_kind == "TENorm"  # MLA keeps it apart
    assert te["decoder.layers.4.pre_mlp_layernorm.weight"].module_kind == "TENorm"
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te


def test_interleaved_dense_and_expert_layers() -> None:
    assert INTERLEAVED_DIMS.moe_layers == (1, 3)
    te = {p.name: p for p in megatron_inventory(INTERLEAVED_DIMS, "te")}
    for layer in (0, 2, 4):  # dense: the pre-MLP norm fused into linear_fc1, no router
        assert f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight" in te
        assert f"decoder.layers.{layer}.mlp.router.weight" not in te
    for layer in (1, 3):
        assert te[f"decoder.layers.{layer}.pre_mlp_layernorm.weight"].module_kind == "TENorm"
        assert te[f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight3"].expert == 3
        assert f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight" not in te


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
        (_param("MyFancyNorm"), None),  # no name guessing: register it under module_types
        (_param("TELinear", mode="row"), "row"),
        (_param("TELinear", mode="duplicated"), "replicated"),
        (_param("SomethingElse"), None),
    ],
)
def test_resolve_auto(param: MegatronParam, expected: str | None) -> None:
    assert resolve_auto(param, MODULE_TYPES) == expected


def test_registered_module_type_wins() -> None:
    assert resolve_auto(_param("SomethingElse"), {**MODULE_TYPES, "SomethingElse": "row"}) == "row"


HYBRID_MOE_DIMS = replace(
    DIMS, num_moe_experts=4, moe_ffn_hidden_size=32, moe_dense_layers=(0,), moe_shared_expert_intermediate_size=32,
    moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
)


def test_hybrid_inventory_equals_a_full_hybrid_model_build() -> None:
    """The HybridModel inventory (one layer of each kind, expanded) against megatron-core's
    HybridModel built whole: the same names, shapes and TP partitions."""
    from mapgen.compiler.hybrid_model import build_hybrid_model, hybrid_layer_pattern

    dims = HYBRID_MOE_DIMS
    assert hybrid_layer_pattern(dims) == "*-*E*E*E*E"
    ensure_single_process_parallel_state()
    with torch.device("meta"):
        full = build_hybrid_model(dims)
    expected = {p.name: (p.shape, p.partition_dim, p.module_kind) for p in skeleton_params(full, dims.params_dtype)}
    ours = {p.name: (p.shape, p.partition_dim, p.module_kind) for p in megatron_inventory(dims, "local", "hybrid")}
    assert ours == expected


def test_hybrid_names_split_each_gpt_layer_in_two() -> None:
    te = {p.name: p for p in megatron_inventory(HYBRID_MOE_DIMS, "te", "hybrid")}
    # written out by hand: GPT layer L's attention is hybrid layer 2L, its MLP 2L+1
    expected = {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.mlp.linear_fc1.layer_norm_weight": "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.6.self_attention.linear_proj.weight": "decoder.layers.3.self_attention.linear_proj.weight",
        "decoder.layers.7.pre_mlp_layernorm.weight": "decoder.layers.3.pre_mlp_layernorm.weight",
        "decoder.layers.7.mlp.router.expert_bias": "decoder.layers.3.mlp.router.expert_bias",
        "decoder.layers.9.mlp.experts.linear_fc2.weight3": "decoder.layers.4.mlp.experts.linear_fc2.weight3",
        "decoder.final_norm.weight": "decoder.final_layernorm.weight",
    }
    for name, gpt_te in expected.items():
        assert te[name].te_name == gpt_te
    assert te["decoder.layers.9.mlp.experts.linear_fc2.weight3"].layer == 9
    assert te["decoder.layers.9.mlp.experts.linear_fc2.weight3"].expert == 3
    assert len(te) == len(megatron_inventory(HYBRID_MOE_DIMS, "te"))


def test_hybrid_inventory_with_gated_delta_net_layers() -> None:
    """'G' layers, and an MTP layer after '/' (megatron-core 0.19.2): the inventory equals a
    whole HybridModel build, the MTP layer's two hybrid layers under transformer_layer.layers;
    on 0.16's MambaModel, which has neither, the build is refused as needing a later release."""
    from mapgen.common.errors import NeedsNewerMegatronCore
    from mapgen.compiler.hybrid_model import build_hybrid_model, hybrid_layer_pattern, hybrid_model_has_gdn

    mtp = replace(GDN_DIMS, mtp_num_layers=1)
    assert hybrid_layer_pattern(GDN_DIMS) == "G-GE*EG-*E" and hybrid_layer_pattern(mtp) == "G-GE*EG-*E/*E"
    ensure_single_process_parallel_state()
    for dims in (GDN_DIMS, mtp):
        if not hybrid_model_has_gdn():
            with pytest.raises(NeedsNewerMegatronCore, match="gated delta net layers"):
                megatron_inventory(dims, "local", "hybrid")
            continue
        with torch.device("meta"):
            full = build_hybrid_model(dims)
        expected = {p.name: (p.shape, p.partition_dim, p.module_kind) for p in skeleton_params(full, dims.params_dtype)}
        ours = {p.name: (p.shape, p.partition_dim, p.module_kind) for p in megatron_inventory(dims, "local", "hybrid")}
        assert ours == expected
    if hybrid_model_has_gdn():
        names = {p.name for p in megatron_inventory(mtp, "te", "hybrid")}
        assert {"mtp.layers.0.eh_proj.weight", "mtp.layers.0.final_layernorm.weight"} <= names
        assert "mtp.layers.0.transformer_layer.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
        assert "mtp.layers.0.transformer_layer.layers.1.mlp.experts.linear_fc1.weight3" in names


def test_zero_centred_norms_do_not_leak_into_later_builds() -> None:
    """The local spec's norms are swapped for ZeroCenteredRMSNorm in the spec objects of one
    build: a model built after it in the same process (the distributed tests build many) keeps
    megatron-core's own norms."""
    from mapgen.compiler.cpu_layers import ZeroCenteredRMSNorm

    ensure_single_process_parallel_state()
    with torch.device("meta"):
        zero_centred = build_gpt_model(GDN_DIMS)
        plain = build_gpt_model(INTERLEAVED_DIMS)
    assert any(isinstance(m, ZeroCenteredRMSNorm) for m in zero_centred.modules())
    assert not any(isinstance(m, ZeroCenteredRMSNorm) for m in plain.modules())


def test_mtp_block_parameters_come_last_and_keep_the_decoder_layer_kind() -> None:
    ensure_single_process_parallel_state()
    names = [p.name for p in megatron_inventory(MTP_CASES[1], "local")]
    first = next(i for i, n in enumerate(names) if n.startswith("mtp."))
    assert all(n.startswith("mtp.") for n in names[first:]) and "output_layer.weight" in names[:first]
    # the last decoder layer (4) is dense: so is each MTP layer's transformer layer
    assert "mtp.layers.1.transformer_layer.mlp.linear_fc1.weight" in names
    assert not any(".mlp.experts." in n or ".router." in n for n in names[first:])
    te = {p.name for p in megatron_inventory(MTP_CASES[0], "te")}
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.eh_proj.weight", "mtp.layers.0.final_layernorm.weight"} <= te
    assert "mtp.layers.0.transformer_layer.mlp.experts.linear_fc1.weight3" in te
