"""The megatron-core TransformerConfig of a model's dims, and the build options it is made under.

The fields the dims decide, the run choices mapgen builds with (dtype, no fusions, the CPU's MoE
dispatcher), and the layer specs (`local` or `te`) and caller overrides that `building` sets for
a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from mapgen.common.dims import ModelDims
from mapgen.compiler.dsa_model import dsa_config
from mapgen.common.parallel import ParallelLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuildOptions:
    """How models are built while `building` holds: megatron-core's layer specs (`local`, which
    runs on CPU, or `te`, TransformerEngine's, which GPUs run) and TransformerConfig fields the
    caller sets (dtype, recompute, fusions: nothing the module's DIMS decide; `mapgen.model`
    refuses those)."""

    spec: str = "local"
    overrides: dict[str, Any] = field(default_factory=dict)


BUILD: ContextVar[BuildOptions] = ContextVar("mapgen_build_options", default=BuildOptions())


@contextmanager
def building(options: BuildOptions) -> Iterator[None]:
    token = BUILD.set(options)
    try:
        yield
    finally:
        BUILD.reset(token)


def _moe_config(dims: ModelDims) -> dict[str, Any]:
    if dims.num_moe_experts is None:
        return {}
    return dict(
        num_moe_experts=dims.num_moe_experts,
        moe_ffn_hidden_size=dims.moe_ffn_hidden_size,
        moe_router_topk=dims.moe_router_topk,
        moe_layer_freq=_per_layer_flags(dims.num_layers, dims.moe_layers),
        moe_shared_expert_intermediate_size=dims.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=dims.moe_shared_expert_gate,
        moe_router_score_function=dims.moe_router_score_function,
        moe_router_pre_softmax=dims.moe_router_pre_softmax,
        moe_router_enable_expert_bias=dims.moe_router_enable_expert_bias,
        moe_router_topk_scaling_factor=dims.moe_router_topk_scaling_factor,
        moe_router_num_groups=dims.moe_router_num_groups,
        moe_router_group_topk=dims.moe_router_group_topk,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",  # the dispatcher that runs on CPU over gloo
        moe_grouped_gemm=False,  # SequentialMLP: the local layout's experts
        moe_router_dtype="fp32",
    )


def _per_layer_flags(num_layers: int, layers: tuple[int, ...]) -> list[int]:
    """megatron-core's per-layer list form (moe_layer_freq, window_attn_skip_freq): 1 where listed."""
    listed = set(layers)
    return [int(index in listed) for index in range(num_layers)]


def _window_config(dims: ModelDims) -> dict[str, Any]:
    """HF's sliding window of W positions (the query's own included) is megatron-core's
    window_size (W - 1, 0); window_attn_skip_freq's list form marks the layers that have it."""
    layers = dims.window_attention_layers
    if not layers:
        return {}
    assert dims.sliding_window is not None
    return dict(
        window_size=(dims.sliding_window - 1, 0),
        window_attn_skip_freq=_per_layer_flags(dims.num_layers, layers),
    )


def _linear_attention_config(dims: ModelDims) -> dict[str, Any]:
    """Gated delta net layers: megatron-core's experimental attention variant, placed by the
    list form of linear_attention_freq (1: gated delta net, 0: self-attention). deterministic_mode
    makes megatron-core's GatedDeltaNet run its own torch code for the convolution and the delta
    rule (`torch_chunk_gated_delta_rule`) instead of flash-linear-attention's Triton kernels."""
    if not dims.linear_attention_layers:
        return {}
    return dict(
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=_per_layer_flags(dims.num_layers, dims.linear_attention_layers),
        linear_conv_kernel_dim=dims.linear_conv_kernel_dim,
        linear_key_head_dim=dims.linear_key_head_dim,
        linear_value_head_dim=dims.linear_value_head_dim,
        linear_num_key_heads=dims.linear_num_key_heads,
        linear_num_value_heads=dims.linear_num_value_heads,
        deterministic_mode=True,
    )


def _mla_config(dims: ModelDims) -> dict[str, Any]:
    if not dims.multi_latent_attention:
        return {}
    yarn = dims.rope_type == "yarn"
    return dict(
        multi_latent_attention=True,
        q_lora_rank=dims.q_lora_rank,
        kv_lora_rank=dims.kv_lora_rank,
        qk_head_dim=dims.qk_head_dim,
        qk_pos_emb_head_dim=dims.qk_pos_emb_head_dim,
        v_head_dim=dims.v_head_dim,
        rope_type="yarn" if yarn else "rope",
        rotary_base=dims.rotary_base,
        rotary_scaling_factor=dims.rope_scaling_factor if yarn else 1.0,
        original_max_position_embeddings=dims.rope_scaling_original_max_position_embeddings or dims.max_position_embeddings,
        beta_fast=dims.rope_beta_fast,
        beta_slow=dims.rope_beta_slow,
        mscale=dims.rope_mscale,
        mscale_all_dim=dims.rope_mscale_all_dim,
    )


def _mtp_config(dims: ModelDims) -> dict[str, Any]:
    """megatron-core's multi-token prediction: its block on the last pipeline stage (no custom
    pipeline layout), sharing the main model's embedding and output layer."""
    return dict(mtp_num_layers=dims.mtp_num_layers) if dims.mtp_num_layers else {}


def _glu_softmax_config(dims: ModelDims) -> dict[str, Any]:
    """gpt-oss's attention sinks (softmax_type) and clamped, offset GLU; nothing where unset."""
    found: dict[str, Any] = {}
    if dims.softmax_type != "vanilla":
        found["softmax_type"] = dims.softmax_type
    if dims.glu_linear_offset:
        found["glu_linear_offset"] = dims.glu_linear_offset
    if dims.activation_func_clamp_value is not None:
        found["activation_func_clamp_value"] = dims.activation_func_clamp_value
    return found


def uses_gpt_yarn(dims: ModelDims) -> bool:
    """YaRN rope on standard attention: GPTModel's position_embedding_type 'yarn' (MLA has its own)."""
    return dims.rope_type == "yarn" and not dims.multi_latent_attention


def _set_gpt_yarn(config: Any, dims: ModelDims) -> None:
    """megatron-core's GPTModel reads its YaRN parameters as `yarn_*` attributes of the config
    (`getattr`, in 0.16 and 0.19 alike: TransformerConfig declares none of them); attention
    scales cos and sin by the concentration factor taken from the same attributes."""
    config.yarn_rotary_scaling_factor = dims.rope_scaling_factor
    config.yarn_original_max_position_embeddings = (
        dims.rope_scaling_original_max_position_embeddings or dims.max_position_embeddings
    )
    config.yarn_beta_fast = dims.rope_beta_fast
    config.yarn_beta_slow = dims.rope_beta_slow
    config.yarn_mscale = dims.rope_mscale
    config.yarn_mscale_all_dim = dims.rope_mscale_all_dim
    config.yarn_correction_range_round_to_int = dims.rope_correction_range_round_to_int


def _activation(name: str) -> Any:
    from megatron.core.activations import quick_gelu, squared_relu

    return {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "quick_gelu": quick_gelu,
            "squared_relu": squared_relu}[name]


def architecture_fields(dims: ModelDims) -> dict[str, Any]:
    """The TransformerConfig fields the dims decide (with a few run choices the MoE, linear
    attention and MTP helpers set beside them: `mapgen.model` tells which a caller may change)."""
    return dict(
        **_mtp_config(dims),
        **_moe_config(dims),
        **_mla_config(dims),
        **dsa_config(dims),  # DeepSeek-V3.2's sparse attention (mapgen/compiler/dsa_model.py)
        **_window_config(dims),
        **_glu_softmax_config(dims),
        **_linear_attention_config(dims),
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.kv_channels,
        layernorm_epsilon=dims.layernorm_epsilon,
        normalization=dims.normalization,
        activation_func=_activation(dims.activation),
        gated_linear_unit=dims.gated_linear_unit,
        add_bias_linear=dims.add_bias_linear,
        add_qkv_bias=dims.add_qkv_bias,
        qk_layernorm=dims.qk_layernorm,
        attention_output_gate=dims.attention_output_gate,
        layernorm_zero_centered_gamma=dims.layernorm_zero_centered_gamma,
    )


def transformer_config(
    dims: ModelDims, params_dtype: torch.dtype | None = None, layout: ParallelLayout | None = None
) -> Any:
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    dtype = params_dtype or DTYPES[dims.params_dtype]
    layout = layout or ParallelLayout()
    config_class = MLATransformerConfig if dims.multi_latent_attention else TransformerConfig
    fields = dict(
        **architecture_fields(dims),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        sequence_parallel=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_dtype=dtype,
    )
    if BUILD.get().spec == "te":  # TEGroupedMLP's experts (`weight<E>`), as the te layout names them
        fields.update(moe_grouped_gemm=bool(dims.num_moe_experts), moe_token_dispatcher_type="alltoall")
    config = config_class(**{**fields, **BUILD.get().overrides})
    if uses_gpt_yarn(dims):
        _set_gpt_yarn(config, dims)
    return config
