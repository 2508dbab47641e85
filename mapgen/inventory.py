"""Every Megatron parameter and every HF tensor of a model, read from the libraries themselves.

The Megatron side comes from a megatron-core GPTModel skeleton on the `meta` device (local
layer spec). All decoder layers of a dense model are alike, so one layer is built and the rest
are index arithmetic; `tests/test_inventory.py` checks that this equals a full build.

The `te` layout is derived from the local one by `to_te_layout` (TransformerEngine does not
install on CPU machines). What changes, per decoder layer:

| local name (module)                                 | te name (module)                                   |
|-----------------------------------------------------|----------------------------------------------------|
| input_layernorm.{weight,bias} (RMSNorm/LayerNorm)   | self_attention.linear_qkv.layer_norm_{weight,bias} (TELayerNormColumnParallelLinear) |
| pre_mlp_layernorm.{weight,bias} (RMSNorm/LayerNorm) | mlp.linear_fc1.layer_norm_{weight,bias} (TELayerNormColumnParallelLinear) |
| self_attention.linear_qkv.* (ColumnParallelLinear)  | same name (TELayerNormColumnParallelLinear)        |
| mlp.linear_fc1.* (ColumnParallelLinear)             | same name (TELayerNormColumnParallelLinear)        |
| *.linear_proj.*, mlp.linear_fc2.* (RowParallelLinear) | same name (TERowParallelLinear)                  |
| q_layernorm/k_layernorm, final_layernorm (torch norms) | same name (TENorm)                              |

Embedding and output layer are megatron-core's own modules in both layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from mapgen.dims import ModelDims

LAYOUTS = ("te", "local")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class MegatronParam:
    name: str
    shape: tuple[int, ...]
    dtype: str
    module_kind: str  # class name of the owning module
    partition_dim: int | None  # megatron-core's own TP partition of this parameter
    layer: int | None
    expert: int | None = None
    parallel_mode: str | None = None  # TELinear's parallel_mode, where the module has one
    te_name: str = ""  # the name in the te layout, which spec rules are written against


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]


def megatron_inventory(dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
    """Every parameter in `layout`'s names; `te_name` is always the te layout's name, so one
    set of spec rules serves both layouts."""
    local = _local_inventory(dims)
    te = to_te_layout(local)
    if layout == "te":
        return tuple(replace(p, te_name=p.name) for p in te)
    return tuple(replace(p, te_name=t.name) for p, t in zip(local, te))


def _skeleton_params(model: Any, dtype: str) -> list[MegatronParam]:
    """Parameters of a skeleton; all carry the model's dtype (torch norms are built in fp32,
    but megatron-core's mixed-precision wrapper and TE hold them in the params dtype)."""
    modules = dict(model.named_modules())
    found: list[MegatronParam] = []
    for name, param in model.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        partitioned = bool(getattr(param, "tensor_model_parallel", False))
        layer = _LAYER.match(name)
        found.append(
            MegatronParam(
                name=name,
                shape=tuple(param.shape),
                dtype=dtype,
                module_kind=type(owner).__name__,
                partition_dim=int(param.partition_dim) if partitioned else None,
                layer=int(layer.group(1)) if layer else None,
                parallel_mode=getattr(owner, "parallel_mode", None),
            )
        )
    return found


def _local_inventory(dims: ModelDims) -> tuple[MegatronParam, ...]:
    from mapgen.megatron_model import build_gpt_model, single_process_parallel_state

    one_layer = replace(dims, num_layers=1)
    with single_process_parallel_state(), torch.device("meta"):
        skeleton = build_gpt_model(one_layer)
    params = _skeleton_params(skeleton, dims.params_dtype)
    before = [p for p in params if p.name.startswith("embedding.")]
    layer0 = [p for p in params if p.layer == 0]
    after = [p for p in params if p not in before and p not in layer0]
    expanded = list(before)
    for index in range(dims.num_layers):
        prefix = f"decoder.layers.{index}."
        expanded.extend(
            replace(p, name=prefix + p.name.removeprefix("decoder.layers.0."), layer=index)
            for p in layer0
        )
    expanded.extend(after)
    return tuple(expanded)


_TE_NORM_RENAMES = (
    (".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
    (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"),
)
_TE_FUSED = (".self_attention.linear_qkv.", ".mlp.linear_fc1.")


def to_te_layout(params: tuple[MegatronParam, ...]) -> tuple[MegatronParam, ...]:
    """Names and module kinds of megatron-core's TransformerEngine layer spec (see module doc)."""
    renamed: list[MegatronParam] = []
    for p in params:
        name, kind = p.name, p.module_kind
        for old, new in _TE_NORM_RENAMES:
            if old in name:
                head, tail = name.split(old)
                name, kind = head + new + tail, "TELayerNormColumnParallelLinear"
        if kind == "ColumnParallelLinear" and any(f in name for f in _TE_FUSED):
            kind = "TELayerNormColumnParallelLinear"
        elif kind == "ColumnParallelLinear" and not name.startswith("output_layer."):
            kind = "TEColumnParallelLinear"
        elif kind == "RowParallelLinear":
            kind = "TERowParallelLinear"
        elif kind in ("RMSNorm", "LayerNorm", "WrappedTorchNorm", "FusedLayerNorm"):
            kind = "TENorm"
        renamed.append(replace(p, name=name, module_kind=kind))
    return tuple(renamed)


def hf_inventory(architecture: str, config_fields: dict[str, Any]) -> tuple[HFTensor, ...]:
    """The tensors `save_pretrained` writes for this architecture and config, in model order."""
    import transformers

    model_type = config_fields.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("config has no 'model_type'")
    fields = {k: v for k, v in config_fields.items() if k not in ("model_type", "quantization_config")}
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    model_class = getattr(transformers, architecture)
    with torch.device("meta"):
        model = model_class._from_config(hf_config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not getattr(hf_config, "tie_word_embeddings", False):
        tied = set()
    return tuple(
        HFTensor(name, tuple(tensor.shape))
        for name, tensor in model.state_dict().items()
        if name not in tied
    )
