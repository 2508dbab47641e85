"""Build the megatron-core GPTModel that a set of model dims describes (local layer spec)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import HashStore  # type: ignore[attr-defined]

from mapgen.dims import ModelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ensure_single_process_parallel_state() -> None:
    """A world of one process, so megatron-core can build a model outside any launcher."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


@contextmanager
def single_process_parallel_state() -> Iterator[None]:
    """`ensure_single_process_parallel_state` for a while: what it set up, it tears down."""
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    created_state = not parallel_state.model_parallel_is_initialized()
    ensure_single_process_parallel_state()
    try:
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes of a megatron-core model; uneven pipelines name first/last stage layers."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    dp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            parts.append(f"layers{self.first_stage_layers or '-'}/{self.last_stage_layers or '-'}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp is not None:
            parts.append(f"etp{self.etp}")
        if self.dp > 1:
            parts.append(f"dp{self.dp}")
        return "x".join(parts)


def initialize_parallel_state(layout: ParallelLayout) -> None:
    """(Re)initialise megatron-core's groups for `layout` in an initialised process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def transformer_config(
    dims: ModelDims, params_dtype: torch.dtype | None = None, layout: ParallelLayout | None = None
) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype or DTYPES[dims.params_dtype]
    layout = layout or ParallelLayout()
    activation = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}
    return TransformerConfig(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.kv_channels,
        layernorm_epsilon=dims.layernorm_epsilon,
        normalization=dims.normalization,
        activation_func=activation[dims.activation],
        gated_linear_unit=dims.gated_linear_unit,
        add_bias_linear=dims.add_bias_linear,
        add_qkv_bias=dims.add_qkv_bias,
        qk_layernorm=dims.qk_layernorm,
        attention_output_gate=dims.attention_output_gate,
        layernorm_zero_centered_gamma=dims.layernorm_zero_centered_gamma,
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


def build_gpt_model(
    dims: ModelDims,
    *,
    params_dtype: torch.dtype | None = None,
    layout: ParallelLayout | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> Any:
    """The model on the current default device (use `torch.device("meta")` for a skeleton)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer_spec = get_gpt_layer_local_spec(
            qk_layernorm=dims.qk_layernorm, normalization=dims.normalization
        )
        return GPTModel(
            transformer_config(dims, params_dtype, layout),
            layer_spec,
            vocab_size=dims.vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=dims.share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_percent=dims.rotary_percent,
            rotary_base=dims.rotary_base,
            rope_scaling=dims.rope_type == "llama3",
            rope_scaling_factor=dims.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
            parallel_output=False,
        )


def build_model_chunks(
    dims: ModelDims, layout: ParallelLayout, params_dtype: torch.dtype | None = None
) -> list[Any]:
    """This rank's model chunks (one per virtual pipeline stage) under initialised groups."""
    from megatron.core import parallel_state

    chunks = []
    for vp_stage in range(layout.vpp):
        stage = vp_stage if layout.vpp > 1 else None
        chunk = build_gpt_model(
            dims,
            params_dtype=params_dtype,
            layout=layout,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        chunk.eval()
        chunks.append(chunk)
    return chunks
