"""CPU stand-ins for the megatron-core layers that need TransformerEngine, Apex or fla on a GPU.

They let megatron-core's local layer specs build and run on a CPU: zero-centred RMSNorm, gated
delta net layers without flash-linear-attention, multi-latent attention without TE, and the
CUDA device megatron-core asks for while building."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mapgen.common.dims import ModelDims


def without_linear_attention(config: Any) -> Any:
    """megatron-core builds gated delta net layers only through its TransformerEngine block spec
    (`get_transformer_block_with_experimental_attention_variant_spec`), and its local GPT block
    spec refuses the variant (0.19); the local block spec is made without it, and
    `gated_delta_net_layers` puts megatron-core's GatedDeltaNet into the layers that have it."""
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


def zero_centered_norms(block_spec: Any) -> None:
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


def zero_centered_spec(spec: Any) -> Any:
    """`zero_centered_norms` of one module spec (a hybrid stack's layer)."""
    from types import SimpleNamespace

    holder = SimpleNamespace(layer_specs=[spec], layer_norm=None)
    zero_centered_norms(holder)
    return holder.layer_specs[0]


def _torch_l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """flash-linear-attention's `l2norm` (x / sqrt(sum(x^2) + eps), eps 1e-6) in torch."""
    return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def gated_delta_net_without_fla() -> type:
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


def gated_delta_net_layers(block_spec: Any, config: Any, dims: ModelDims, vp_stage: int | None) -> None:
    """The local block spec's layers that have a gated delta net get megatron-core's
    GatedDeltaNet as token mixer, with the local linears and norm where its TransformerEngine
    spec has TE's (in_proj: TELayerNormColumnParallelLinear there, so its input norm is the
    layer's own input_layernorm here)."""
    from dataclasses import replace as with_fields

    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    gated_delta_net = gated_delta_net_without_fla()
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
def cuda_device_on_cpu() -> Iterator[None]:
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


def mla_q_proj_without_norm(attention: Any, dims: ModelDims) -> None:
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


def mla_without_transformer_engine() -> None:
    """megatron-core's MLA module believes TransformerEngine is there whenever megatron-core's TE
    extension imports, which it does without TE (its classes are then None)."""
    import importlib.util

    import megatron.core.transformer.multi_latent_attention as mla

    if importlib.util.find_spec("transformer_engine") is None:
        mla.HAVE_TE = False


@functools.cache
def mla_core_attention() -> type:
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
