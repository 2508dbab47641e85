"""The Megatron model dims a family spec translates an HF config into."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mapgen.common.limits import MAX_EXPERT_LAYERS, MAX_EXPERTS, MAX_LAYERS

# megatron-core's llama-3 rope scaling takes only the factor from its caller; the other three
# parameters are fixed in `RotaryEmbedding._apply_scaling`.
MEGATRON_LLAMA3_ROPE = {
    "rope_scaling_low_freq_factor": 1.0,
    "rope_scaling_high_freq_factor": 4.0,
    "rope_scaling_original_max_position_embeddings": 8192,
}

DTYPES = ("float32", "bfloat16", "float16")
# megatron-core activation functions a spec may name (quick_gelu: x * sigmoid(1.702 x), gpt-oss)
ACTIVATIONS = ("silu", "gelu", "quick_gelu", "squared_relu")  # squared_relu: relu(x)^2 (Nemotron-H)
SOFTMAX_TYPES = ("vanilla", "off-by-one", "learnable")  # megatron-core's TransformerConfig.softmax_type
# a LLaVA model's vision tower and projector (ModelDims.vision)
VISION_DIMS = frozenset(
    (
        "vision_num_layers", "vision_hidden_size", "vision_ffn_hidden_size", "vision_num_attention_heads",
        "vision_kv_channels", "vision_layernorm_epsilon", "vision_activation", "vision_image_size",
        "vision_patch_size", "vision_num_channels", "drop_vision_class_token", "projector_activation",
        "image_token_index",
    )
)
# ModelDims fields added after modules were checked in: a module's DIMS names them only where
# they differ from their default, so modules built before them keep their bytes
LATE_FIELDS = frozenset(
    {"softmax_type", "glu_linear_offset", "activation_func_clamp_value", "rope_correction_range_round_to_int",
     # gated delta net (Qwen3-Next)
     "linear_attention_layers", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
     "linear_num_key_heads", "linear_num_value_heads",
     # multi-token prediction (DeepSeek-V3)
     "mtp_num_layers",
     # DeepSeek sparse attention's indexer (DeepSeek-V3.2)
     "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk",
     # Mamba-hybrid models (Nemotron-H)
     "hybrid_pattern", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim"}
) | VISION_DIMS


@dataclass(frozen=True)
class ModelDims:
    """Everything needed to build the megatron-core model and to shape every parameter."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    layernorm_epsilon: float = 1e-5
    normalization: str = "RMSNorm"
    activation: str = "silu"
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    attention_output_gate: bool = False
    # sliding-window attention: each query sees this many positions, itself included (HF's
    # sliding_window), in the decoder layers listed; None: full attention in every layer
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    layernorm_zero_centered_gamma: bool = False
    share_embeddings_and_output_weights: bool = False
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_type: str = "default"
    rope_scaling_factor: float | None = None
    rope_scaling_low_freq_factor: float | None = None
    rope_scaling_high_freq_factor: float | None = None
    rope_scaling_original_max_position_embeddings: int | None = None
    params_dtype: str = "float32"
    # yarn rope scaling (DeepSeek-V3); factor and original length are the fields above
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    # mixture of experts: None experts is a dense model
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    # the decoder layers whose MLP is dense (DeepSeek's first_k_dense_replace, Qwen3-MoE's
    # mlp_only_layers and decoder_sparse_step); every other layer has experts
    moe_dense_layers: tuple[int, ...] = ()
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    # multi-latent attention (DeepSeek-V2/V3)
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_head_dim: int = 0  # the part of each query/key head without rope
    qk_pos_emb_head_dim: int = 0
    v_head_dim: int = 0
    # fields added later (gpt-oss): written into a module's DIMS only where they differ from
    # their default (`LATE_FIELDS`), so modules built before them keep their bytes
    # attention sinks: megatron-core's softmax_type ('learnable': a softmax offset per head)
    softmax_type: str = "vanilla"
    # gated linear units: act(gate) * (up + glu_linear_offset), gate clamped from above and up
    # clamped to [-v, v] by activation_func_clamp_value (megatron-core's TransformerConfig fields)
    glu_linear_offset: float = 0.0
    activation_func_clamp_value: float | None = None
    # yarn: whether the correction range is rounded to integers (HF's rope_scaling.truncate)
    rope_correction_range_round_to_int: bool = True
    # multi-token prediction (DeepSeek-V3's num_nextn_predict_layers): megatron-core's MTP block
    # of this many layers on the last pipeline stage; 0: none
    mtp_num_layers: int = 0
    # gated delta net (Qwen3-Next's linear attention): the decoder layers whose token mixer is a
    # GatedDeltaNet instead of self-attention (megatron-core's linear_attention_freq), and its sizes
    linear_attention_layers: tuple[int, ...] = ()
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    # DeepSeek sparse attention (DeepSeek-V3.2, with multi-latent attention): every attention
    # layer's indexer heads, head size and the keys it keeps per query; 0 heads: no indexer
    dsa_indexer_n_heads: int = 0
    dsa_indexer_head_dim: int = 0
    dsa_indexer_topk: int = 0
    # Mamba-hybrid models (Nemotron-H, mapgen/compiler/mamba_model.py): megatron-core's hybrid layer
    # pattern, one symbol per decoder layer (M Mamba-2, * attention, - MLP, E experts), and the
    # Mamba-2 mixer's sizes; "" for every other model
    hybrid_pattern: str = ""
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_num_groups: int = 0
    mamba_state_dim: int = 0
    # a LLaVA model's vision tower (megatron-core's CLIPViTModel) and projector; the dims above
    # are its language model's. None: no vision tower (every other model)
    vision_num_layers: int | None = None  # the layers LLaVA uses (HF's vision_feature_layer)
    vision_hidden_size: int = 0
    vision_ffn_hidden_size: int = 0
    vision_num_attention_heads: int = 0
    vision_kv_channels: int = 0
    vision_layernorm_epsilon: float = 1e-5
    vision_activation: str = "quick_gelu"
    vision_image_size: int = 0
    vision_patch_size: int = 0
    vision_num_channels: int = 3
    drop_vision_class_token: bool = True
    projector_activation: str = "gelu"
    image_token_index: int = 0

    @property
    def vision(self) -> bool:
        """Whether the model has a vision tower (a LLaVA model)."""
        return self.vision_num_layers is not None

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global indices of the decoder layers with an expert MLP."""
        if self.num_moe_experts is None:
            return ()
        dense = set(self.moe_dense_layers)
        return tuple(index for index in range(self.num_layers) if index not in dense)

    @property
    def window_attention_layers(self) -> tuple[int, ...]:
        """Global indices of the decoder layers whose attention has a sliding window."""
        return self.sliding_window_layers if self.sliding_window is not None else ()

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every value megatron-core cannot build or would build wrongly."""
        found: list[tuple[str, str]] = []
        for name in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "vocab_size",
            "max_position_embeddings", "layernorm_epsilon", "rotary_base",
        ):
            if getattr(self, name) <= 0:
                found.append((name, f"must be positive, got {getattr(self, name)}"))
        for name in (
            "rope_scaling_factor", "moe_shared_expert_intermediate_size", "q_lora_rank", "moe_router_topk_scaling_factor",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                found.append((name, f"must be positive (or null), got {value}"))
        if self.mtp_num_layers < 0 or self.mtp_num_layers > MAX_LAYERS:
            found.append(("mtp_num_layers", f"must be 0 (no multi-token prediction) up to {MAX_LAYERS:,}, got {self.mtp_num_layers}"))
        if self.dsa_indexer_n_heads:  # DeepSeek sparse attention: megatron-core's indexer on MLA
            if not self.multi_latent_attention or self.q_lora_rank is None:
                found.append(("dsa_indexer_n_heads", "a DSA indexer needs multi-latent attention with a q_lora_rank"))
            if not self.qk_pos_emb_head_dim <= self.dsa_indexer_head_dim or self.dsa_indexer_topk <= 0:
                found.append(("dsa_indexer_head_dim", f"must be at least qk_pos_emb_head_dim {self.qk_pos_emb_head_dim}, "
                              f"with a positive dsa_indexer_topk; got {self.dsa_indexer_head_dim}, {self.dsa_indexer_topk}"))
        if not 0 < self.rotary_percent <= 1:
            found.append(("rotary_percent", f"must be in (0, 1], got {self.rotary_percent}"))
        if self.num_layers > MAX_LAYERS:
            found.append(
                ("num_layers", f"{self.num_layers:,} is over mapgen's limit of {MAX_LAYERS:,} layers (every layer's "
                 "parameters get functions of their own; see mapgen/common/limits.py)")
            )
        if self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups:
            found.append(
                (
                    "num_query_groups",
                    f"{self.num_query_groups} does not divide num_attention_heads "
                    f"{self.num_attention_heads}",
                )
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            found.append(("normalization", f"must be RMSNorm or LayerNorm, got {self.normalization!r}"))
        if self.vision:
            found += self._vision_problems()
        if self.activation not in ACTIVATIONS:
            found.append(("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"))
        if self.softmax_type not in SOFTMAX_TYPES:
            found.append(("softmax_type", f"must be one of {', '.join(SOFTMAX_TYPES)}, got {self.softmax_type!r}"))
        if self.activation_func_clamp_value is not None and self.activation_func_clamp_value <= 0:
            found.append(("activation_func_clamp_value", f"must be positive (or null), got {self.activation_func_clamp_value}"))
        if (self.glu_linear_offset or self.activation_func_clamp_value is not None) and not self.gated_linear_unit:
            found.append(("glu_linear_offset", "and activation_func_clamp_value apply to gated linear units only"))
        if self.params_dtype not in DTYPES:
            found.append(("params_dtype", f"must be one of {', '.join(DTYPES)}, got {self.params_dtype!r}"))
        if self.rope_type not in ("default", "llama3", "yarn"):
            found.append(("rope_type", f"{self.rope_type!r} is not supported (default, llama3, yarn)"))
        if self.rope_type == "yarn" and self.rope_scaling_factor is None:
            found.append(("rope_scaling_factor", "is needed for yarn rope scaling"))
        if self.num_moe_experts is not None:
            found += self._moe_problems()
        if self.sliding_window is not None and self.sliding_window < 1:
            found.append(("sliding_window", f"must be positive, got {self.sliding_window}"))
        found += self._layer_list_problems("sliding_window_layers")
        if self.multi_latent_attention:
            for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    found.append((name, f"must be positive with multi_latent_attention, got {getattr(self, name)}"))
        found += self._linear_attention_problems()
        if self.rope_type == "llama3" and self.rope_scaling_factor is None:
            found.append(("rope_scaling_factor", "is needed for llama3 rope scaling"))
        if self.rope_type == "llama3":
            for name, fixed in MEGATRON_LLAMA3_ROPE.items():
                value = getattr(self, name)
                if value is not None and value != fixed:
                    found.append(
                        (
                            name,
                            f"is {value}, but megatron-core's llama3 rope scaling is fixed at {fixed}",
                        )
                    )
        return found

    def _vision_problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for name in (
            "vision_num_layers", "vision_hidden_size", "vision_ffn_hidden_size", "vision_num_attention_heads",
            "vision_kv_channels", "vision_image_size", "vision_patch_size", "vision_num_channels",
            "vision_layernorm_epsilon",
        ):
            if getattr(self, name) <= 0:
                found.append((name, f"must be positive, got {getattr(self, name)}"))
        if (self.vision_num_layers or 0) > MAX_LAYERS:
            found.append(("vision_num_layers", f"{self.vision_num_layers:,} is over mapgen's limit of {MAX_LAYERS:,} layers"))
        if self.vision_patch_size > 0 and self.vision_image_size % self.vision_patch_size:
            found.append(
                ("vision_image_size", f"{self.vision_image_size} is no multiple of the patch size {self.vision_patch_size}")
            )
        if self.vision_activation not in ("quick_gelu", "gelu"):
            found.append(("vision_activation", f"must be quick_gelu or gelu, got {self.vision_activation!r}"))
        if self.projector_activation not in ("gelu",):
            found.append(("projector_activation", f"must be gelu, got {self.projector_activation!r}"))
        return found

    def _moe_problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        experts = self.num_moe_experts or 0
        if experts <= 0:
            found.append(("num_moe_experts", f"must be positive, got {experts}"))
        if experts > MAX_EXPERTS:
            found.append(("num_moe_experts", f"{experts:,} is over mapgen's limit of {MAX_EXPERTS:,} experts (see mapgen/common/limits.py)"))
        elif self.num_layers <= MAX_LAYERS and experts * len(self.moe_layers) > MAX_EXPERT_LAYERS:
            found.append(
                ("num_moe_experts", f"{experts:,} in {len(self.moe_layers):,} layers are "
                 f"{experts * len(self.moe_layers):,} expert-layers, over mapgen's limit of {MAX_EXPERT_LAYERS:,} "
                 "(every expert of every layer gets functions of its own; see mapgen/common/limits.py)")
            )
        groups_topk = self.moe_router_group_topk
        if groups_topk is not None and not 0 < groups_topk <= (self.moe_router_num_groups or groups_topk):
            found.append(("moe_router_group_topk", f"must be in 1..{self.moe_router_num_groups}, got {groups_topk}"))
        if not 0 < self.moe_router_topk <= max(experts, 1):
            found.append(("moe_router_topk", f"must be in 1..{experts}, got {self.moe_router_topk}"))
        if self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size <= 0:
            found.append(("moe_ffn_hidden_size", f"must be positive, got {self.moe_ffn_hidden_size}"))
        found += self._layer_list_problems("moe_dense_layers")
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            found.append(("moe_router_score_function", f"must be softmax or sigmoid, got {self.moe_router_score_function!r}"))
        groups = self.moe_router_num_groups
        if groups is not None and (groups <= 0 or experts % groups):
            found.append(("moe_router_num_groups", f"{groups} does not divide {experts} experts"))
        return found

    def _linear_attention_problems(self) -> list[tuple[str, str]]:
        found = self._layer_list_problems("linear_attention_layers")
        if not self.linear_attention_layers:
            return found
        for name in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_num_key_heads", "linear_num_value_heads"):
            if getattr(self, name) <= 0:
                found.append((name, f"must be positive with linear_attention_layers, got {getattr(self, name)}"))
        keys, values = self.linear_num_key_heads, self.linear_num_value_heads
        if keys > 0 and values % keys:
            found.append(("linear_num_value_heads", f"{values} is no multiple of linear_num_key_heads {keys} (megatron-core)"))
        if self.multi_latent_attention:
            found.append(("linear_attention_layers", "gated delta net layers with multi_latent_attention are not supported"))
        return found

    def _layer_list_problems(self, name: str) -> list[tuple[str, str]]:
        outside = [index for index in getattr(self, name) if not 0 <= index < self.num_layers]
        if not outside:
            return []
        return [(name, f"names layer(s) {', '.join(map(str, outside))}, outside 0..{self.num_layers - 1}")]

    def as_literal_items(self) -> list[tuple[str, Any]]:
        return [
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in LATE_FIELDS or getattr(self, f.name) != f.default
        ]


DIM_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(ModelDims)}
REQUIRED_DIMS = tuple(
    name
    for name, f in DIM_FIELDS.items()
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


MAX_INT = 2**63 - 1  # torch's sizes and indices are int64


def _finite(value: int | float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def coerce(name: str, value: Any) -> Any:
    """Convert an evaluated expression to the dim's declared type, or raise TypeError."""
    kind = DIM_FIELDS[name].type
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind.startswith("tuple[int"):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_INT for v in value
        ):
            raise TypeError(f"must be a list of layer indices, got {_short(value)}")
        return tuple(sorted(set(value)))
    if value is None:
        if "None" in kind:
            return None
        raise TypeError("is null")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise TypeError(f"must be true or false, got {_short(value)}")
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value != int(value):
            raise TypeError(f"must be an integer, got {_short(value)}")
        if abs(int(value)) > MAX_INT:
            raise TypeError(f"must be an integer of at most 63 bits, got one of {int(value).bit_length()} bits")
        return int(value)
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"must be a number, got {_short(value)}")
        if not _finite(value):
            raise TypeError(f"must be a finite number, got {_short(value)}")
        return float(value)
    if not isinstance(value, str):
        raise TypeError(f"must be a string, got {_short(value)}")
    return value
