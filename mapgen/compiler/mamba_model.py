"""megatron-core's Mamba-hybrid model of Nemotron-H, built from local layer specs, and its inventory.

Its layers: Mamba-2 `M`, attention `*`, MLP `-`, experts `E`.

megatron-core's `MambaMixer` needs `mamba_ssm` (Triton kernels: a gated RMSNorm and the chunked
SSD scan) and `einops`; its constructor refuses to run without them and allocates on
`torch.cuda.current_device()`. Without `mamba_ssm` the mixer's module gets, as mapgen does for
flash-linear-attention's gated delta net, the torch stand-ins of `mapgen.compiler.mamba_torch`:

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
import re
import sys
import warnings
from contextlib import contextmanager, nullcontext
from collections.abc import Iterator
from typing import Any

import torch

from mapgen.compiler.cpu_layers import cuda_device_on_cpu
from mapgen.compiler.hybrid_model import hybrid_model_class, hybrid_stack_spec, local_final_norm
from mapgen.compiler.inventory import skeleton_params, to_te_layout
from mapgen.compiler.mamba_torch import TorchRMSNormGated, no_repeat, torch_chunk_scan, torch_rearrange
from mapgen.compiler.megatron_config import transformer_config
from mapgen.compiler.parallel_state import single_process_parallel_state

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
            setattr(module, "repeat", no_repeat)
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

    if vp_stage is not None:
        raise MapgenError("virtual pipeline stages of a hybrid model are set by '|' in its layer pattern; mapgen builds hybrid models without them")
    model_class, pattern_keyword = hybrid_model_class()
    config = transformer_config(dims, params_dtype, layout)
    for name, value in mamba_config_fields(dims).items():
        setattr(config, name, value)
    config.num_layers = len(dims.hybrid_pattern)
    stack, norm = hybrid_stack_spec(dims)
    stack.submodules.mamba_layer = mamba_layer_spec(norm)
    with _quiet(), cuda_device_on_cpu(), local_final_norm(stack, norm):
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

    template = _template_pattern(dims.hybrid_pattern)
    skeleton_dims = replace(
        dims,
        num_layers=len(template),
        hybrid_pattern=template,
        moe_dense_layers=tuple(i for i, symbol in enumerate(template) if symbol != "E"),
    )
    with single_process_parallel_state(), torch.device("meta"):
        skeleton = build_mamba_model(skeleton_dims)
    params = skeleton_params(skeleton, dims.params_dtype)
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
