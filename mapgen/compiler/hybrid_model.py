"""megatron-core's HybridModel of a GPT model's dims, and the layer pattern it is built from.

Each decoder layer is an attention layer and an MLP layer of local specs; what the installed
megatron-core's hybrid model can build (gated delta net, MTP layers) is asked of it here."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from mapgen.common.dims import ModelDims
from mapgen.compiler.cpu_layers import (
    ZeroCenteredRMSNorm,
    cuda_device_on_cpu,
    gated_delta_net_without_fla,
    mla_core_attention,
    mla_q_proj_without_norm,
    mla_without_transformer_engine,
    zero_centered_spec,
)
from mapgen.compiler.megatron_config import transformer_config, uses_gpt_yarn

if TYPE_CHECKING:
    from mapgen.common.parallel import ParallelLayout


def hybrid_layer_pattern(dims: ModelDims) -> str:
    """megatron-core's hybrid layer pattern of the model: each HF decoder layer is two Megatron
    layers, attention (`*`, MLA `+`, gated delta net `G`) then its MLP (`-` dense, `E` experts);
    with multi-token prediction, `/` and the MTP layers' pattern once per MTP layer (depth): the
    decoder's last layer's two, as GPTModel builds its MTP layer from the last layer spec."""
    attention = "+" if dims.multi_latent_attention else "*"
    moe, linear = set(dims.moe_layers), set(dims.linear_attention_layers)
    layers = [
        ("G" if index in linear else attention) + ("E" if index in moe else "-") for index in range(dims.num_layers)
    ]
    return "".join(layers) + "".join("/" + layers[-1] for _ in range(dims.mtp_num_layers))


def _main_pattern(pattern: str) -> str:
    """The decoder's part of a hybrid layer pattern (before the first `/`)."""
    return pattern.split("/", 1)[0]


def hybrid_model_class() -> tuple[type, str]:
    """megatron-core's HybridModel (0.17 and later), or on older releases the MambaModel it
    was called, with the keyword its layer pattern goes by."""
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        return HybridModel, "hybrid_layer_pattern"
    except ImportError:
        from megatron.core.models.mamba.mamba_model import MambaModel

        return MambaModel, "hybrid_override_pattern"


def megatron_core_version() -> str:
    """The installed megatron-core's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "(version unknown)"


def hybrid_model_has_gdn() -> bool:
    """megatron-core's HybridModel builds gated delta net layers ('G' in its layer pattern)."""
    try:
        from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
    except ImportError:
        return False
    return getattr(Symbols, "GDN", None) == "G"


def hybrid_model_has_mtp() -> bool:
    """megatron-core's HybridModel builds multi-token-prediction layers from its layer pattern
    (its stack's submodules have an `mtp_block_spec`; 0.19 does, 0.16's MambaModel does not)."""
    try:
        from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    except ImportError:
        return False
    return "mtp_block_spec" in getattr(HybridStackSubmodules, "__dataclass_fields__", {})


def hybrid_stack_spec(dims: ModelDims) -> tuple[Any, Any]:
    """A HybridStack of megatron-core's local (non-TransformerEngine) layers: megatron-core's
    own GPT layer specs, split into the attention half and the MLP half that the hybrid stack
    builds as layers of their own (megatron-core ships only a TransformerEngine hybrid spec).
    Returns the spec and the local layers' norm class."""
    from dataclasses import replace as with_fields

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    try:
        from megatron.core.models.hybrid.hybrid_block import HybridStack as Stack
        from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules as Submodules
    except ImportError:
        from megatron.core.ssm.mamba_block import MambaStack as Stack
        from megatron.core.ssm.mamba_block import MambaStackSubmodules as Submodules
    try:
        from megatron.core.transformer.transformer_layer import MoETransformerLayer as MoELayer
    except ImportError:
        MoELayer = TransformerLayer

    def layer(num_experts: int | None) -> Any:
        return get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=False,
            qk_layernorm=dims.qk_layernorm,
            multi_latent_attention=dims.multi_latent_attention,
            normalization=dims.normalization,
        ).submodules

    dense = layer(None)
    if dims.multi_latent_attention:
        mla_without_transformer_engine()
        dense.self_attention.submodules.core_attention = mla_core_attention()
        mla_q_proj_without_norm(dense.self_attention, dims)
    empty = TransformerLayerSubmodules()  # what a layer without attention or MLP has instead
    no_mlp = dict(pre_mlp_layernorm=empty.pre_mlp_layernorm, mlp=empty.mlp, mlp_bda=empty.mlp_bda)
    attention = ModuleSpec(module=TransformerLayer, submodules=with_fields(dense, **no_mlp))
    mlp_only = dict(
        input_layernorm=empty.input_layernorm, self_attention=empty.self_attention, self_attn_bda=empty.self_attn_bda
    )
    slots: dict[str, Any] = dict(
        attention_layer=attention,
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=with_fields(dense, **mlp_only)),
    )
    if dims.multi_latent_attention:
        slots["mla_layer"] = attention
    if dims.num_moe_experts is not None:
        slots["moe_layer"] = ModuleSpec(module=MoELayer, submodules=with_fields(layer(dims.num_moe_experts), **mlp_only))
    norm = dense.input_layernorm
    if dims.layernorm_zero_centered_gamma:
        slots = {name: zero_centered_spec(spec) for name, spec in slots.items()}
        norm = ZeroCenteredRMSNorm
    if dims.linear_attention_layers:  # 'G': the layer's input norm, then megatron-core's GatedDeltaNet
        from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mixer = ModuleSpec(
            module=gated_delta_net_without_fla(),
            submodules=GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear),
        )
        gdn = with_fields(dense, input_layernorm=norm, self_attention=mixer, **no_mlp)
        slots["gdn_layer"] = ModuleSpec(module=TransformerLayer, submodules=gdn)
    if dims.mtp_num_layers:  # the MTP layer's norms and projection; its layers come from the pattern
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.transformer.multi_token_prediction import (
            MultiTokenPredictionBlock,
            MultiTokenPredictionBlockSubmodules,
            MultiTokenPredictionLayer,
            MultiTokenPredictionLayerSubmodules,
        )

        layer = MultiTokenPredictionLayerSubmodules(
            enorm=norm, hnorm=norm, eh_proj=ColumnParallelLinear, mtp_model_layer=None, layer_norm=norm
        )
        slots["mtp_block_spec"] = ModuleSpec(
            module=MultiTokenPredictionBlock,
            submodules=MultiTokenPredictionBlockSubmodules(
                layer_specs=[ModuleSpec(module=MultiTokenPredictionLayer, submodules=layer)]
            ),
        )
    return ModuleSpec(module=Stack, submodules=Submodules(**slots)), norm


@contextmanager
def local_final_norm(stack: Any, norm: Any) -> Iterator[None]:
    """The hybrid stack builds its final norm as TransformerEngine's TENorm whatever its spec
    says; without TransformerEngine, megatron-core's local norm of the same layers stands in
    (same parameter, `decoder.final_norm.weight`)."""
    import importlib.util
    import sys

    module = sys.modules[stack.module.__module__]
    if importlib.util.find_spec("transformer_engine") is not None or not hasattr(module, "TENorm"):
        yield
        return
    original = getattr(module, "TENorm")
    setattr(module, "TENorm", norm)
    try:
        yield
    finally:
        setattr(module, "TENorm", original)


def build_hybrid_model(
    dims: ModelDims,
    *,
    params_dtype: torch.dtype | None = None,
    layout: ParallelLayout | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    vocab_size: int | None = None,
) -> Any:
    """megatron-core's HybridModel of the same weights as `build_gpt_model`'s GPTModel: the
    layer pattern of `hybrid_layer_pattern`, local layers (use `torch.device("meta")` for a
    skeleton)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from mapgen.common.errors import MapgenError, NeedsNewerMegatronCore

    model_class, pattern_keyword = hybrid_model_class()
    pattern = hybrid_layer_pattern(dims)
    if model_class.__name__ != "HybridModel" and dims.multi_latent_attention:
        raise NeedsNewerMegatronCore(
            f"a hybrid model with multi-latent attention needs megatron-core 0.17 or later (HybridModel); "
            f"this is megatron-core {megatron_core_version()}"
        )
    if dims.linear_attention_layers and not hybrid_model_has_gdn():
        raise NeedsNewerMegatronCore(
            "a hybrid model with gated delta net layers ('G') needs a megatron-core HybridModel that "
            f"builds them (0.19.2 does); this is megatron-core {megatron_core_version()}, which has none"
        )
    if dims.sliding_window is not None:
        raise MapgenError(
            "sliding-window attention in a hybrid model is not supported: megatron-core's "
            "window_attn_skip_freq would count hybrid layers (two per HF layer)"
        )
    if dims.mtp_num_layers and not hybrid_model_has_mtp():
        raise NeedsNewerMegatronCore(
            "multi-token prediction in a hybrid model needs a megatron-core HybridModel that builds MTP "
            f"layers from its layer pattern ('/'; 0.19.2 does); this is megatron-core {megatron_core_version()}, "
            "which has none (build with --model gpt)"
        )
    if vp_stage is not None:
        raise MapgenError(
            "virtual pipeline stages of a hybrid model are set by '|' in its layer pattern; "
            "mapgen builds hybrid models without them"
        )
    config = transformer_config(dims, params_dtype, layout)
    config.num_layers = len(_main_pattern(pattern))  # megatron-core's layer-offset rules count hybrid layers
    stack, norm = hybrid_stack_spec(dims)
    with warnings.catch_warnings(), cuda_device_on_cpu(), local_final_norm(stack, norm):
        warnings.simplefilter("ignore")
        model = model_class(
            config,
            stack,
            vocab_size=vocab_size or dims.vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=dims.share_embeddings_and_output_weights,
            position_embedding_type="yarn" if uses_gpt_yarn(dims) else "rope",
            rotary_percent=dims.rotary_percent,
            rotary_base=dims.rotary_base,
            parallel_output=False,
            **{pattern_keyword: pattern},
        )
        if dims.rope_type == "llama3" and hasattr(model, "rotary_pos_emb"):
            # HybridModel's constructor has no llama3 rope scaling; megatron-core's own
            # RotaryEmbedding has, as GPTModel builds it
            model.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=dims.rotary_percent,
                rotary_base=dims.rotary_base,
                rope_scaling=True,
                rope_scaling_factor=dims.rope_scaling_factor or 8.0,
                use_cpu_initialization=True,
            )
    return model
