"""megatron-core's Mamba-hybrid model (Nemotron-H: Mamba-2 `M`, attention `*`, MLP `-`, experts `E`
layers) built from local layer specs, with torch stand-ins for the GPU-only pieces of its Mamba mixer.

megatron-core's `MambaMixer` needs `mamba_ssm` (Triton kernels: a gated RMSNorm and the chunked
SSD scan) and `einops`; its constructor refuses to run without them and allocates on
`torch.cuda.current_device()`. Without `mamba_ssm` the mixer's module gets, as mapgen does for
flash-linear-attention's gated delta net:

- `TorchRMSNormGated`: mamba_ssm's `RMSNorm` with a gate (norm_before_gate False): y = x * silu(z),
  then RMS-normalised over groups of `group_size` channels, times `weight`, in float32;
- `torch_chunk_scan`: `mamba_chunk_scan_combined`'s arithmetic in torch, chunk by chunk (the
  within-chunk part in quadratic form, the state carried between chunks);
- `rearrange`: the einops patterns the mixer uses (`torch_rearrange`), where einops is absent.

The mixer then runs its own non-fused path (`use_mamba_mem_eff_path` False: megatron-core's
`_ssm_prefill`), whose causal convolution is already torch (`causal_conv1d` absent). With
mamba_ssm installed (a GPU machine) nothing is replaced.

The stack: megatron-core 0.19's `HybridModel` (`hybrid_layer_pattern`) or 0.16's `MambaModel`
(`hybrid_override_pattern`), one Megatron layer per HF block, the pattern being the config's
`hybrid_override_pattern` itself; no positional embedding (Nemotron-H's attention has no rope).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import sys
import warnings
from contextlib import contextmanager, nullcontext
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

# -- torch stand-ins for mamba_ssm and einops -------------------------------------------------


class TorchRMSNormGated(torch.nn.Module):
    """mamba_ssm's gated RMSNorm (`mamba_ssm.ops.triton.layernorm_gated.RMSNorm`) with
    `norm_before_gate=False`, as megatron-core's MambaMixer builds it: same constructor, same
    parameter `weight`; forward(x, z) = rmsnorm_groups(x * silu(z)) * weight, in float32, cast
    back to x's dtype."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if norm_before_gate:
            raise ValueError("the torch gated RMSNorm stand-in normalises after the gate only")
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        value = x.float()
        if z is not None:
            value = value * F.silu(z.float())
        groups = value.reshape(*value.shape[:-1], -1, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        normed: torch.Tensor = groups.flatten(-2) * self.weight.float()
        return normed.to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: Any = (), metadata: Any = None) -> Any:
        """megatron-core's ExtendedRMSNorm's: the weight split over TP along dim 0."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets
        )


def torch_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    initial_states: torch.Tensor | None = None,
    **_: Any,
) -> Any:
    """The SSD scan of Mamba-2 (`mamba_chunk_scan_combined`'s contract) in float32 torch.

    x [b, l, h, p], dt [b, l, h], A [h] (negative), B and C [b, l, g, n] (h a multiple of g),
    D [h] or [h, p]. Per head, with a_t = dt_t * A and the state S [p, n]:
    S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t + D x_t  (times silu(z_t) if z).
    Computed per chunk of `chunk_size` positions: inside a chunk the quadratic form
    y_i = sum_{j<=i} exp(sum_{j<k<=i} a_k) (C_i . B_j) dt_j x_j, plus the state entering the
    chunk decayed to i; the state leaving it is carried to the next chunk."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    step = dt.float()
    if dt_bias is not None:
        step = step + dt_bias.float()
    if dt_softplus:
        step = F.softplus(step)
    step = step.clamp(min=dt_limit[0], max=dt_limit[1])
    values = x.float()
    keys = B.float().repeat_interleave(per_group, dim=2)  # [b, l, h, n]
    queries = C.float().repeat_interleave(per_group, dim=2)
    log_decay = step * A.float()  # [b, l, h]
    state = (
        initial_states.float().clone()
        if initial_states is not None
        else values.new_zeros(batch, heads, head_dim, keys.shape[-1])
    )
    outputs = []
    for start in range(0, length, chunk_size):
        span = slice(start, min(start + chunk_size, length))
        size = span.stop - span.start
        cumulative = log_decay[:, span].cumsum(dim=1)  # [b, c, h]: log decay from the chunk start to i
        causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
        between = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [b, i, j, h]
        decay = torch.where(causal[None, :, :, None], between, float("-inf")).exp()
        scores = torch.einsum("bihn,bjhn->bijh", queries[:, span], keys[:, span]) * decay
        inputs = values[:, span] * step[:, span, :, None]  # dt_j x_j
        y = torch.einsum("bijh,bjhp->bihp", scores, inputs)
        y = y + torch.einsum("bihn,bhpn->bihp", queries[:, span], state) * cumulative.exp()[..., None]
        to_end = (cumulative[:, -1:, :] - cumulative).exp()  # [b, c, h]
        state = state * cumulative[:, -1, :].exp()[:, :, None, None] + torch.einsum(
            "bjh,bjhp,bjhn->bhpn", to_end, inputs, keys[:, span]
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=1) if outputs else values.clone()
    if D is not None:
        skip = D.float()
        y = y + values * (skip[:, None] if skip.dim() == 1 else skip)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


_GROUP = re.compile(r"\(([^)]*)\)|(\S+)")


def _axes(side: str) -> list[list[str]]:
    """einops' axis groups of one side of a pattern: `b l (h p)` -> [[b], [l], [h, p]]."""
    return [match.group(1).split() if match.group(1) is not None else [match.group(2)] for match in _GROUP.finditer(side)]


def torch_rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """einops' `rearrange` for patterns of named axes, parenthesised groups and the literal 1
    (what megatron-core's Mamba mixer uses): split the input's groups into their axes, permute,
    merge the output's groups."""
    left, right = (_axes(side) for side in pattern.split("->"))
    if len(left) != tensor.dim():
        raise ValueError(f"rearrange {pattern!r}: {tensor.dim()} dims for {len(left)} groups")
    known = dict(sizes)
    shape: list[int] = []
    names: list[str] = []
    for group, extent in zip(left, tensor.shape):
        free = [name for name in group if name != "1" and name not in known]
        fixed = math.prod(known[name] for name in group if name != "1" and name in known)
        if len(free) > 1:
            raise ValueError(f"rearrange {pattern!r}: group {group} has more than one unknown size")
        if free:
            known[free[0]] = extent // fixed
        for name in group:
            if name != "1":
                shape.append(known[name])
                names.append(name)
    value = tensor.reshape(shape)
    order = [name for group in right for name in group if name != "1"]
    value = value.permute([names.index(name) for name in order])
    return value.reshape([math.prod(known[n] for n in group if n != "1") for group in right])


def _no_repeat(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("einops.repeat (Mamba context parallelism) has no torch stand-in in mapgen; install einops")


# -- the mixer ---------------------------------------------------------------------------------


# megatron-core 0.16's mixer imports Triton kernels of its dynamic-batching inference at module
# level; without Triton (torch's CPU wheels) that module is replaced by one whose functions refuse
_TRITON_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def _without_triton_tensor_ops() -> None:
    import types

    if importlib.util.find_spec("triton") is not None or _TRITON_TENSOR_OPS in sys.modules:
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("megatron-core's dynamic-batching Mamba inference needs Triton (not installed)")

    module = types.ModuleType(_TRITON_TENSOR_OPS, "mapgen's stand-in: Triton is not installed")
    for name in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
        setattr(module, name, refuse)
    sys.modules[_TRITON_TENSOR_OPS] = module


def mamba_mixer_class() -> type:
    """megatron-core's MambaMixer, made to build and run without mamba_ssm (and einops, and on
    megatron-core 0.16 Triton) by the stand-ins above; unchanged where mamba_ssm is installed."""
    _without_triton_tensor_ops()
    from megatron.core.ssm import mamba_context_parallel
    from megatron.core.ssm import mamba_mixer as mixer_module

    if importlib.util.find_spec("einops") is None:
        for module in (mixer_module, mamba_context_parallel):
            setattr(module, "HAVE_EINOPS", True)
            setattr(module, "rearrange", torch_rearrange)
            setattr(module, "repeat", _no_repeat)
    if importlib.util.find_spec("mamba_ssm") is None:
        setattr(mixer_module, "HAVE_MAMBA_SSM", True)
        setattr(mixer_module, "RMSNormGated", TorchRMSNormGated)
        setattr(mixer_module, "ExtendedRMSNorm", TorchRMSNormGated)
        setattr(mixer_module, "mamba_chunk_scan_combined", torch_chunk_scan)
    return _cpu_mamba_mixer(mixer_module.MambaMixer)


class _NoFork:
    def fork(self, *args: Any, **kwargs: Any) -> Any:
        return nullcontext()


@functools.cache
def _cpu_mamba_mixer(base: type) -> type:
    """megatron-core's MambaMixer whose constructor draws its initial values (conv, dt_bias,
    A_log) from torch's default generator when there is no CUDA: it forks megatron-core's CUDA
    RNG tracker, which a CPU process has not set up. Same class name, parameters and forward;
    the initial values are imported over anyway."""

    constructor: Any = getattr(base, "__init__")

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        module: Any = sys.modules[base.__module__]
        if torch.cuda.is_available():
            constructor(self, *args, **kwargs)
            return
        original = module.get_cuda_rng_tracker
        module.get_cuda_rng_tracker = lambda *a, **k: _NoFork()
        try:
            constructor(self, *args, **kwargs)
        finally:
            module.get_cuda_rng_tracker = original

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


# -- the model ---------------------------------------------------------------------------------

MAMBA_RUN_FIELDS = {
    # the mixer's own torch path (`_ssm_prefill`) instead of mamba_ssm's fused kernel
    "use_mamba_mem_eff_path": False,
}


def mamba_config_fields(dims: Any) -> dict[str, Any]:
    """The TransformerConfig fields of the Mamba mixer (sizes from the dims)."""
    return dict(
        mamba_state_dim=dims.mamba_state_dim,
        mamba_head_dim=dims.mamba_head_dim,
        mamba_num_groups=dims.mamba_num_groups,
        mamba_num_heads=dims.mamba_num_heads,
        is_hybrid_model=True,
        **MAMBA_RUN_FIELDS,
    )


def mamba_layer_spec(norm: Any) -> Any:
    """megatron-core's MambaLayer with local linears: the block's pre-norm `norm`, the mixer's
    in_proj column-parallel and out_proj row-parallel (the TE spec fuses the norm into in_proj)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    mixer_class = mamba_mixer_class()
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    mixer = ModuleSpec(
        module=mixer_class,
        submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
    )
    return ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(norm=norm, mixer=mixer, mamba_bda=get_bias_dropout_add))


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_mamba_model(
    dims: Any,
    *,
    params_dtype: torch.dtype | None = None,
    layout: Any = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    vocab_size: int | None = None,
) -> Any:
    """megatron-core's HybridModel (0.19) or MambaModel (0.16) of a Nemotron-H model: the
    config's hybrid_override_pattern as its layer pattern (one Megatron layer per HF block),
    local layers, no positional embedding. Use `torch.device("meta")` for a skeleton."""
    from mapgen.common.errors import MapgenError
    from mapgen.compiler.megatron_model import (
        _cuda_device_on_cpu,
        _hybrid_stack_spec,
        _local_final_norm,
        hybrid_model_class,
        transformer_config,
    )

    if vp_stage is not None:
        raise MapgenError("virtual pipeline stages of a hybrid model are set by '|' in its layer pattern; mapgen builds hybrid models without them")
    model_class, pattern_keyword = hybrid_model_class()
    config = transformer_config(dims, params_dtype, layout)
    for name, value in mamba_config_fields(dims).items():
        setattr(config, name, value)
    config.num_layers = len(dims.hybrid_pattern)
    stack, norm = _hybrid_stack_spec(dims)
    stack.submodules.mamba_layer = mamba_layer_spec(norm)
    with _quiet(), _cuda_device_on_cpu(), _local_final_norm(stack, norm):
        return model_class(
            config,
            stack,
            vocab_size=vocab_size or dims.vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=dims.share_embeddings_and_output_weights,
            position_embedding_type="none",
            parallel_output=False,
            **{pattern_keyword: dims.hybrid_pattern},
        )


# -- the parameter inventory ------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _template_pattern(pattern: str) -> str:
    """One layer of each symbol of `pattern`, in order of first appearance."""
    return "".join(dict.fromkeys(pattern))


# A Mamba mixer's parameters in the order megatron-core 0.19 registers them; 0.16 registers them
# in another order, and the generated module must not depend on the installed release
_MIXER_ORDER = (
    "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.dt_bias", "mixer.A_log", "mixer.D",
    "mixer.in_proj.weight", "mixer.norm.weight", "mixer.out_proj.weight",
)


def _mixer_ordered(params: list[Any]) -> list[Any]:
    """One layer's parameters with a Mamba mixer's in `_MIXER_ORDER`, the others after them in
    their own order."""
    def key(item: tuple[int, Any]) -> int:
        position, param = item
        within = _LAYER.sub("", param.name, count=1)
        return _MIXER_ORDER.index(within) if within in _MIXER_ORDER else len(_MIXER_ORDER) + position

    return [param for _, param in sorted(enumerate(params), key=key)]


def mamba_inventory(dims: Any, layout: str) -> tuple[Any, ...]:
    """Every parameter of the Mamba-hybrid model in `layout`'s names, `te_name` the te layout's:
    a skeleton on the meta device with one layer of each symbol of the pattern, copied to every
    layer of that symbol."""
    from dataclasses import replace

    from mapgen.compiler.inventory import _skeleton_params, to_te_layout
    from mapgen.compiler.megatron_model import single_process_parallel_state

    template = _template_pattern(dims.hybrid_pattern)
    skeleton_dims = replace(
        dims,
        num_layers=len(template),
        hybrid_pattern=template,
        moe_dense_layers=tuple(i for i, symbol in enumerate(template) if symbol != "E"),
    )
    with single_process_parallel_state(), torch.device("meta"):
        skeleton = build_mamba_model(skeleton_dims)
    params = _skeleton_params(skeleton, dims.params_dtype)
    per_symbol = {symbol: _mixer_ordered([p for p in params if p.layer == i]) for i, symbol in enumerate(template)}
    local = [p for p in params if p.name.startswith("embedding.")]
    for index, symbol in enumerate(dims.hybrid_pattern):
        prefix = f"decoder.layers.{index}."
        local.extend(replace(p, name=prefix + _LAYER.sub("", p.name, count=1), layer=index) for p in per_symbol[symbol])
    local.extend(p for p in params if p.layer is None and not p.name.startswith("embedding."))
    te = to_te_layout(tuple(local))  # a Mamba layer's norm fuses into its in_proj
    if layout == "te":
        return tuple(replace(p, te_name=p.name) for p in te)
    return tuple(replace(p, te_name=t.name) for p, t in zip(local, te))
