"""megatron-core's GPTModel of a model's dims, in the local or the TransformerEngine layer spec.

The local spec with the CPU stand-ins of `mapgen.compiler.cpu_layers`; multi-token prediction
and DSA attention (`mapgen.compiler.dsa_model`) where the dims have them."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from mapgen.common.dims import ModelDims
from mapgen.compiler.cpu_layers import (
    cuda_device_on_cpu,
    gated_delta_net_layers,
    mla_core_attention,
    mla_q_proj_without_norm,
    mla_without_transformer_engine,
    without_linear_attention,
    zero_centered_norms,
)
from mapgen.compiler.dsa_model import has_dsa, use_dsa_attention
from mapgen.compiler.megatron_config import BUILD, transformer_config, uses_gpt_yarn

if TYPE_CHECKING:
    from mapgen.common.parallel import ParallelLayout


def build_gpt_model(
    dims: ModelDims,
    *,
    params_dtype: torch.dtype | None = None,
    layout: ParallelLayout | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    vocab_size: int | None = None,
) -> Any:
    """The model on the current default device (use `torch.device("meta")` for a skeleton);
    `vocab_size`: the embedding's rows when Megatron pads the vocabulary (default: the HF one)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(dims, params_dtype, layout)
    te = BUILD.get().spec == "te"
    with warnings.catch_warnings(), cuda_device_on_cpu():
        warnings.simplefilter("ignore")
        if te:
            block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
        else:
            block_spec = get_gpt_decoder_block_spec(
                without_linear_attention(config), use_transformer_engine=False, normalization=dims.normalization,
                vp_stage=vp_stage,
            )
            if dims.layernorm_zero_centered_gamma:
                zero_centered_norms(block_spec)
            if dims.linear_attention_layers:
                gated_delta_net_layers(block_spec, config, dims, vp_stage)
            if dims.multi_latent_attention:
                mla_without_transformer_engine()
                for layer_spec in block_spec.layer_specs:
                    layer_spec.submodules.self_attention.submodules.core_attention = mla_core_attention()
            if has_dsa(dims):
                use_dsa_attention(block_spec, config)
        for layer_spec in block_spec.layer_specs:
            mla_q_proj_without_norm(layer_spec.submodules.self_attention, dims)
        mtp_block_spec = None
        if dims.mtp_num_layers:
            # megatron-core's own MTP block spec: its layer is the decoder's last layer spec,
            # built on the last (virtual) pipeline stage only
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

            mtp_block_spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=te, vp_stage=vp_stage)
            if mtp_block_spec is not None and dims.layernorm_zero_centered_gamma and not te:
                # enorm, hnorm and final_layernorm: TENorm in the TE spec, zero-centred as every norm
                zero_centered_norms(mtp_block_spec)
        return GPTModel(
            config,
            block_spec,
            vocab_size=vocab_size or dims.vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=dims.share_embeddings_and_output_weights,
            position_embedding_type="yarn" if uses_gpt_yarn(dims) else "rope",
            rotary_percent=dims.rotary_percent,
            rotary_base=dims.rotary_base,
            rope_scaling=dims.rope_type == "llama3",
            rope_scaling_factor=dims.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
            parallel_output=False,
            **({"mtp_block_spec": mtp_block_spec} if mtp_block_spec is not None else {}),
        )
