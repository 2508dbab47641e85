"""megatron-core's DeepSeek sparse attention (DSA) layer, built without TransformerEngine.

DeepSeek-V3.2 is DeepSeek-V3 with a "lightning indexer" in every attention layer that picks,
for each query, the `index_topk` keys the attention may see. megatron-core 0.19 builds it as
`AbsorbedMLASelfAttention` (multi-latent attention with the key/value up-projection absorbed
into the query and the output) around a `DSAttention` core holding a `DSAIndexer`; its only
layer-spec helper (`get_dsa_module_spec_for_backend`) takes a backend, and megatron-core ships
the one it needs (a `linear()` for the duplicated indexer projections) with TransformerEngine
only. This module writes the same spec from megatron-core's local modules:

| module | here | megatron-core TE spec |
|---|---|---|
| linear_q_down_proj, linear_kv_down_proj | ColumnParallelLinear (gathered) | TELinear (duplicated) |
| linear_q_up_proj, linear_kv_up_proj | ColumnParallelLinear | TEColumnParallelLinear |
| q_layernorm, kv_layernorm | local RMSNorm (not fused: the indexer reads the normalized q) | TENorm |
| core_attention.indexer.linear_wq_b / linear_wk / linear_weights_proj | `DuplicatedLinear` | TELinear (duplicated) |
| core_attention.indexer.k_norm | local LayerNorm (weight and bias) | TENorm |
| linear_proj | RowParallelLinear | TERowParallelLinear |

The layer is run as transformers runs DeepSeek-V3.2: `dsa_indexer_rotate_activation` off (the
Hadamard rotation of DeepSeek's reference code needs `fast_hadamard_transform`, bf16 and CUDA;
it leaves q.k unchanged and transformers omits it), the indexer's rope non-interleaved on its
first qk_pos_emb_head_dim channels, its key LayerNorm at eps 1e-6, and megatron-core's unfused
torch path (`dsa_kernel_backend: "none"`).

`AbsorbedMLASelfAttention` asserts sequence parallelism whenever TP > 1 (megatron-core trains it
that way); mapgen runs without it, where every TP rank holds the whole sequence, so the layer is
given a view of the config whose tensor_model_parallel_size is 1 (it reads that field only for
the assertion and for an output-shape check; its heads are split by its TP group).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from mapgen.common.dims import ModelDims

# transformers' DeepseekV32Indexer builds its key norm as nn.LayerNorm(index_head_dim, eps=1e-6)
INDEXER_K_NORM_EPS = 1e-6


def has_dsa(dims: ModelDims) -> bool:
    """Whether the model's attention layers carry a DSA indexer."""
    return bool(getattr(dims, "dsa_indexer_n_heads", 0))


def dsa_config(dims: ModelDims) -> dict[str, Any]:
    """The TransformerConfig fields of DSA attention (none for a model without an indexer)."""
    if not has_dsa(dims):
        return {}
    why = dsa_supported()
    if why is not None:
        from mapgen.common.errors import NeedsNewerMegatronCore

        raise NeedsNewerMegatronCore(
            f"DeepSeek sparse attention (a DSA indexer) needs megatron-core 0.19 or later: megatron-core "
            f"{_version()} cannot run it on the CPU: {why}"
        )
    return dict(
        experimental_attention_variant="dsa",
        dsa_indexer_n_heads=dims.dsa_indexer_n_heads,
        dsa_indexer_head_dim=dims.dsa_indexer_head_dim,
        dsa_indexer_topk=dims.dsa_indexer_topk,
        dsa_indexer_rope_interleaved=False,
        dsa_indexer_rotate_activation=False,
        dsa_indexer_k_norm_epsilon=INDEXER_K_NORM_EPS,
    )  # dsa_kernel_backend: megatron-core's default "none", its unfused torch path (a run choice)


def dsa_supported() -> str | None:
    """None where this megatron-core builds DSA layers mapgen can run on the CPU, else why not."""
    try:
        from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexer  # noqa: F401
        from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError:
        return "it has no DSA indexer (megatron.core.transformer.experimental_attention_variant.dsa)"
    if "dsa_indexer_rotate_activation" not in TransformerConfig.__dataclass_fields__:
        return (
            "its DSA indexer always applies the Hadamard rotation, which needs fast_hadamard_transform, "
            "bfloat16 and CUDA (TransformerConfig has no dsa_indexer_rotate_activation to leave it out, as "
            "transformers does), and it has no AbsorbedMLASelfAttention for the DSA layer"
        )
    try:
        from megatron.core.transformer.experimental_attention_variant.absorbed_mla import (  # noqa: F401
            AbsorbedMLASelfAttention,
        )
    except ImportError:
        return "it has no AbsorbedMLASelfAttention (experimental_attention_variant.absorbed_mla)"
    return None


def _version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


class DuplicatedLinear(torch.nn.Module):
    """A linear layer every TP rank holds whole (megatron-core's TELinear with parallel_mode
    'duplicated', which the DSA indexer's projections are): returns (output, None)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Any,
        bias: bool = False,
        skip_bias_add: bool = False,
        parallel_mode: str | None = "duplicated",
        **_: Any,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("the DSA indexer's projections have no bias")
        self.parallel_mode = parallel_mode
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if self.weight.device.type != "meta" and config.perform_initialization:
            init_method(self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(x, self.weight), None


@functools.cache
def _absorbed_mla_without_sequence_parallel() -> type:
    from megatron.core.transformer.experimental_attention_variant.absorbed_mla import AbsorbedMLASelfAttention

    class AbsorbedMLAWholeSequence(AbsorbedMLASelfAttention):  # type: ignore[misc]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            whole = copy.copy(config)
            whole.tensor_model_parallel_size = 1
            super().__init__(whole, *args, **kwargs)

    AbsorbedMLAWholeSequence.__name__ = AbsorbedMLAWholeSequence.__qualname__ = AbsorbedMLASelfAttention.__name__
    return AbsorbedMLAWholeSequence


def dsa_attention_spec(config: Any) -> Any:
    """The ModuleSpec of one DSA self-attention (megatron-core's `get_dsa_module_spec_for_backend`
    with the local modules of the table above)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.experimental_attention_variant.absorbed_mla import (
        AbsorbedMLASelfAttentionSubmodules,
    )
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexer,
        DSAIndexerSubmodules,
        DSAttention,
        DSAttentionSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    backend = LocalSpecProvider()
    rms_norm = config.normalization == "RMSNorm"
    indexer = ModuleSpec(
        module=DSAIndexer,
        submodules=DSAIndexerSubmodules(
            linear_wq_b=DuplicatedLinear,
            linear_wk=DuplicatedLinear,
            k_norm=backend.layer_norm(rms_norm=False, for_qk=True),
            linear_weights_proj=DuplicatedLinear,
        ),
    )
    qk_norm = backend.layer_norm(rms_norm=rms_norm, for_qk=True)
    return ModuleSpec(
        module=_absorbed_mla_without_sequence_parallel(),
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=AbsorbedMLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=ModuleSpec(module=DSAttention, submodules=DSAttentionSubmodules(indexer=indexer)),
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            kv_layernorm=qk_norm,
        ),
    )


def use_dsa_attention(block_spec: Any, config: Any) -> None:
    """Every layer of a local GPT block spec gets DSA self-attention (all of DeepSeek-V3.2's
    attention layers, and its MTP layer, which megatron-core builds from the last layer spec)."""
    attention = dsa_attention_spec(config)
    for layer_spec in block_spec.layer_specs:
        layer_spec.submodules.self_attention = attention
