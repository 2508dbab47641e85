"""Build the megatron-core model that a set of model dims describes (GPTModel, HybridModel; the
local layer spec, or TransformerEngine's for GPTModel), and set up its parallel state."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import HashStore  # type: ignore[attr-defined]

from mapgen.common.console import native_stdout_silenced
from mapgen.common.dims import ModelDims
from mapgen.common.layout import MODEL_CLASSES
from mapgen.compiler.dsa_model import dsa_config, has_dsa, use_dsa_attention

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


def ensure_single_process_parallel_state() -> None:
    """A world of one process, so megatron-core can build a model outside any launcher."""
    from megatron.core import parallel_state

    with native_stdout_silenced():
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

    def problems(self) -> list[str]:
        """What megatron-core would refuse about this layout, said in its terms up front."""
        found = [f"{name} must be positive" for name in ("tp", "pp", "vpp", "ep", "dp") if getattr(self, name) < 1]
        expert_grid = self.ep * (self.etp or self.tp)
        per_stage = self.tp * self.dp
        if not found and per_stage % expert_grid:
            found.append(
                f"each pipeline stage has tp x dp = {per_stage} ranks, which expert-TP x EP = "
                f"{expert_grid} does not divide (raise dp)"
            )
        return found

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


def destroy_parallel_state() -> None:
    """megatron-core's `destroy_model_parallel` forgets its process groups without destroying
    them; each gloo group keeps its threads and sockets, so a process that initialises many
    layouts in turn (the distributed tests, `mapgen verify` of several jobs) grew by 50-60
    threads per layout. Destroy every group but the default one as well."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    world = distributed_c10d.GroupMember.WORLD
    for group in list(distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)


def initialize_parallel_state(layout: ParallelLayout) -> None:
    """(Re)initialise megatron-core's groups for `layout` in an initialised process group."""
    from megatron.core import parallel_state

    from mapgen.common.errors import MapgenError

    if problems := layout.problems():
        raise MapgenError(f"layout {layout}: " + "; ".join(problems))
    if parallel_state.model_parallel_is_initialized():
        destroy_parallel_state()
    with native_stdout_silenced():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
        )


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
    with warnings.catch_warnings(), _cuda_device_on_cpu():
        warnings.simplefilter("ignore")
        if te:
            block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
        else:
            block_spec = get_gpt_decoder_block_spec(
                _without_linear_attention(config), use_transformer_engine=False, normalization=dims.normalization,
                vp_stage=vp_stage,
            )
            if dims.layernorm_zero_centered_gamma:
                _zero_centered_norms(block_spec)
            if dims.linear_attention_layers:
                _gated_delta_net_layers(block_spec, config, dims, vp_stage)
            if dims.multi_latent_attention:
                _mla_without_transformer_engine()
                for layer_spec in block_spec.layer_specs:
                    layer_spec.submodules.self_attention.submodules.core_attention = _mla_core_attention()
            if has_dsa(dims):
                use_dsa_attention(block_spec, config)
        for layer_spec in block_spec.layer_specs:
            _mla_q_proj_without_norm(layer_spec.submodules.self_attention, dims)
        mtp_block_spec = None
        if dims.mtp_num_layers:
            # megatron-core's own MTP block spec: its layer is the decoder's last layer spec,
            # built on the last (virtual) pipeline stage only
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

            mtp_block_spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=te, vp_stage=vp_stage)
            if mtp_block_spec is not None and dims.layernorm_zero_centered_gamma and not te:
                # enorm, hnorm and final_layernorm: TENorm in the TE spec, zero-centred as every norm
                _zero_centered_norms(mtp_block_spec)
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


def _without_linear_attention(config: Any) -> Any:
    """megatron-core builds gated delta net layers only through its TransformerEngine block spec
    (`get_transformer_block_with_experimental_attention_variant_spec`), and its local GPT block
    spec refuses the variant (0.19); the local block spec is made without it, and
    `_gated_delta_net_layers` puts megatron-core's GatedDeltaNet into the layers that have it."""
    if config.experimental_attention_variant is None:
        return config
    from dataclasses import replace as with_fields

    return with_fields(config, experimental_attention_variant=None, linear_attention_freq=None)


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm with megatron-core's zero-centred gamma, y = x / rms(x) * (1 + gamma), computed in
    float32 and cast back to the input's dtype (TransformerEngine's RMSNorm with
    zero_centered_gamma, which the TE layer spec builds; megatron-core's local torch norm refuses
    layernorm_zero_centered_gamma and its fused one needs Apex on a GPU). Same parameter,
    `weight`, initialised to zeros."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x.float()
        value = value * torch.rsqrt(value.pow(2).mean(-1, keepdim=True) + self.eps)
        return (value * (1.0 + self.weight.float())).to(x.dtype)


def _local_norm_classes() -> tuple[type, ...]:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    try:
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return (WrappedTorchNorm, FusedLayerNorm)
    except ImportError:
        return (WrappedTorchNorm,)


def _zero_centered_norms(block_spec: Any) -> None:
    """Every norm of the local block spec becomes `ZeroCenteredRMSNorm` (RMSNorm only)."""
    from dataclasses import fields

    from megatron.core.transformer.spec_utils import ModuleSpec

    norms = _local_norm_classes()

    def swap(node: Any) -> Any:
        if isinstance(node, type) and issubclass(node, norms):
            return ZeroCenteredRMSNorm
        if isinstance(node, ModuleSpec):
            if isinstance(node.module, type) and issubclass(node.module, norms):
                node.module = ZeroCenteredRMSNorm
            if node.submodules is not None and hasattr(node.submodules, "__dataclass_fields__"):
                for f in fields(node.submodules):
                    setattr(node.submodules, f.name, swap(getattr(node.submodules, f.name)))
        return node

    for layer_spec in block_spec.layer_specs:
        swap(layer_spec)
    if hasattr(block_spec, "layer_norm"):  # (an MTP block spec has none)
        block_spec.layer_norm = swap(block_spec.layer_norm)


def _zero_centered_spec(spec: Any) -> Any:
    """`_zero_centered_norms` of one module spec (a hybrid stack's layer)."""
    from types import SimpleNamespace

    holder = SimpleNamespace(layer_specs=[spec], layer_norm=None)
    _zero_centered_norms(holder)
    return holder.layer_specs[0]


def _torch_l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """flash-linear-attention's `l2norm` (x / sqrt(sum(x^2) + eps), eps 1e-6) in torch."""
    return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def _gated_delta_net_without_fla() -> type:
    """megatron-core's GatedDeltaNet class. Without flash-linear-attention (fla, Triton kernels:
    GPU only) installed, its constructor refuses to run, and its forward calls fla's l2norm even
    in deterministic mode, where it otherwise runs its own torch code; a torch l2norm of fla's
    formula stands in and the constructor's check is lifted. With fla installed nothing changes."""
    import importlib.util
    import sys

    try:
        from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    except ImportError as error:
        from mapgen.common.errors import MapgenError

        raise MapgenError(f"this megatron-core has no GatedDeltaNet (gated delta net layers need 0.16 or later): {error}")
    if importlib.util.find_spec("fla") is None:
        for cls in GatedDeltaNet.__mro__:
            module = sys.modules.get(cls.__module__)
            if module is not None and hasattr(module, "HAVE_FLA"):
                setattr(module, "HAVE_FLA", True)
                setattr(module, "l2norm", _torch_l2norm)
    return _cpu_gated_delta_net(GatedDeltaNet)


@functools.cache
def _cpu_gated_delta_net(base: type) -> type:
    """megatron-core's GatedDeltaNet, initialising its own parameters (dt_bias ones, A_log the
    log of uniform draws from A_init_range, conv1d uniform with conv_init) with torch's default
    generator: its `reset_parameters` forks megatron-core's CUDA RNG tracker, which a CPU process
    has not set up. Same class name, parameters and forward; the initial values are imported
    over anyway."""

    def reset_parameters(self: Any) -> None:
        if not self.config.perform_initialization:
            return
        with torch.no_grad():
            if self.conv_init is not None:
                torch.nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
            self.dt_bias.fill_(1.0)
            if self.A_log.device.type != "meta":
                self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*self.A_init_range).log())

    return type(base.__name__, (base,), {"reset_parameters": reset_parameters, "__module__": base.__module__})


def _gated_delta_net_layers(block_spec: Any, config: Any, dims: ModelDims, vp_stage: int | None) -> None:
    """The local block spec's layers that have a gated delta net get megatron-core's
    GatedDeltaNet as token mixer, with the local linears and norm where its TransformerEngine
    spec has TE's (in_proj: TELayerNormColumnParallelLinear there, so its input norm is the
    layer's own input_layernorm here)."""
    from dataclasses import replace as with_fields

    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    gated_delta_net = _gated_delta_net_without_fla()
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    linear = set(dims.linear_attention_layers)
    for index, layer_spec in enumerate(block_spec.layer_specs):
        if first + index not in linear:
            continue
        norm = layer_spec.submodules.input_layernorm
        mixer = ModuleSpec(
            module=gated_delta_net,
            submodules=GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear),
        )
        block_spec.layer_specs[index] = ModuleSpec(
            module=layer_spec.module,
            params=dict(layer_spec.params),
            submodules=with_fields(layer_spec.submodules, self_attention=mixer),
        )


@contextmanager
def _cuda_device_on_cpu() -> Iterator[None]:
    """Some megatron-core modules ask for the CUDA device even when told to build on the CPU."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _mla_q_proj_without_norm(attention: Any, dims: ModelDims) -> None:
    """Multi-latent attention without a q down-projection (q_lora_rank null: Moonlight): the
    q projection reads the normalized hidden state as it is, and only the kv latent has a norm
    (qk_layernorm). megatron-core 0.19 (its QKNormConfigResolver) makes linear_q_proj a fused
    norm+linear whenever qk_layernorm is set and q_lora_rank is not (TransformerEngine: an extra
    RMSNorm no checkpoint has; the local spec: refused); its MLA layers here resolve their norms
    as for a q down-projection, and keep the spec's plain linear_q_proj (as 0.16.1 builds it).
    Megatron-Bridge does the same (NVIDIA-NeMo/Megatron-Bridge#5261)."""
    if not dims.multi_latent_attention or dims.q_lora_rank is not None:
        return
    try:
        from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver  # noqa: F401
    except ImportError:  # megatron-core 0.16: linear_q_proj is the spec's
        return
    if not getattr(attention.module, "plain_q_projection", False):  # a spec shared by layers
        attention.module = _plain_q_proj(attention.module)


@functools.cache
def _plain_q_proj(base: type) -> type:
    import copy

    from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

    class PlainQProjection(base):  # type: ignore[misc]
        plain_q_projection = True

        def _resolve_qk_norm_config(self, submodules: Any) -> Any:
            as_if = copy.copy(self.config)
            as_if.q_lora_rank = 1  # resolved as with a q down-projection, which is not built
            resolved = QKNormConfigResolver(as_if, submodules).resolve()
            resolved["linear_q_proj"] = submodules.linear_q_proj
            return resolved

    PlainQProjection.__name__ = PlainQProjection.__qualname__ = base.__name__
    return PlainQProjection


def _mla_without_transformer_engine() -> None:
    """megatron-core's MLA module believes TransformerEngine is there whenever megatron-core's TE
    extension imports, which it does without TE (its classes are then None)."""
    import importlib.util

    import megatron.core.transformer.multi_latent_attention as mla

    if importlib.util.find_spec("transformer_engine") is None:
        mla.HAVE_TE = False


@functools.cache
def _mla_core_attention() -> type:
    """megatron-core's local DotProductAttention for MLA. Its arithmetic already handles query/key
    heads wider than value heads; only its constructor refuses MLA's channel arguments, and its
    output width must be the value heads'."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):  # type: ignore[misc]
        def __init__(
            self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

        def forward(self, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            return super().forward(query, key.contiguous(), value.contiguous(), *args, **kwargs)

    return MLADotProductAttention




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


def _hybrid_stack_spec(dims: ModelDims) -> tuple[Any, Any]:
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
        _mla_without_transformer_engine()
        dense.self_attention.submodules.core_attention = _mla_core_attention()
        _mla_q_proj_without_norm(dense.self_attention, dims)
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
        slots = {name: _zero_centered_spec(spec) for name, spec in slots.items()}
        norm = ZeroCenteredRMSNorm
    if dims.linear_attention_layers:  # 'G': the layer's input norm, then megatron-core's GatedDeltaNet
        from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mixer = ModuleSpec(
            module=_gated_delta_net_without_fla(),
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
def _local_final_norm(stack: Any, norm: Any) -> Iterator[None]:
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
    stack, norm = _hybrid_stack_spec(dims)
    with warnings.catch_warnings(), _cuda_device_on_cpu(), _local_final_norm(stack, norm):
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


def build_model(dims: ModelDims, model: str = "gpt", **kwargs: Any) -> Any:
    """`build_gpt_model` or `build_hybrid_model`, by the module's model class."""
    if model not in MODEL_CLASSES:
        raise ValueError(f"model class must be one of {', '.join(MODEL_CLASSES)}, got {model!r}")
    if model == "llava":
        from mapgen.compiler.llava_model import build_llava_model

        return build_llava_model(dims, **kwargs)
    if model == "mamba":
        from mapgen.compiler.mamba_model import build_mamba_model

        return build_mamba_model(dims, **kwargs)
    return (build_hybrid_model if model == "hybrid" else build_gpt_model)(dims, **kwargs)


def _params_in(model: Any, dtype: torch.dtype) -> None:
    """Every parameter in `dtype`, as Megatron-LM's mixed-precision wrapper (`Float16Module`)
    holds them: the local spec's torch norms are built in float32 whatever `params_dtype` says.
    Buffers keep their dtype (the router's expert_bias stays float32, as megatron-core keeps it)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def build_model_chunks(
    dims: ModelDims,
    layout: ParallelLayout,
    params_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    model: str = "gpt",
) -> list[Any]:
    """This rank's model chunks (one per virtual pipeline stage) under initialised groups;
    `vocab_size` as in `build_gpt_model`."""
    from megatron.core import parallel_state

    chunks = []
    for vp_stage in range(layout.vpp):
        stage = vp_stage if layout.vpp > 1 else None
        chunk = build_model(
            dims,
            model,
            params_dtype=params_dtype,
            layout=layout,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            vocab_size=vocab_size,
        )
        _params_in(chunk, params_dtype or DTYPES[dims.params_dtype])
        chunk.eval()
        chunks.append(chunk)
    return chunks
