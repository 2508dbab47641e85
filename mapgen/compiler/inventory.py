"""Every Megatron parameter of a model, read from megatron-core's own skeletons; the inventory types.

`MegatronParam` and `HFTensor` are the two models' tensors as the compiler sees them (the HF
ones are listed by `mapgen.compiler.hf_tensors`). The parameters come from a megatron-core
GPTModel skeleton on the `meta` device (local layer spec, SequentialMLP experts). Decoder layers
of one kind (dense, or with experts) are alike, so one layer of each kind is built and the rest
are index arithmetic; `tests/test_inventory.py` checks that this equals a full build. Persistent
buffers that hold weights (the MoE router's `expert_bias`) are part of the inventory. The
HybridModel's are the GPTModel's renamed (`hybrid_inventory`); LLaVAModel's and the Mamba
model's are their own modules' (`mapgen.compiler.model_classes` says which).

The `te` layout is derived from the local one by `to_te_layout` (TransformerEngine does not
install on CPU machines). What changes, per decoder layer:

| local name (module)                                 | te name (module)                                   |
|-----------------------------------------------------|----------------------------------------------------|
| input_layernorm.{weight,bias}, where the layer has linear_qkv | self_attention.linear_qkv.layer_norm_{weight,bias} (TELayerNormColumnParallelLinear) |
| pre_mlp_layernorm.{weight,bias}, where the layer has a dense mlp.linear_fc1 | mlp.linear_fc1.layer_norm_{weight,bias} (TELayerNormColumnParallelLinear) |
| self_attention.linear_qkv.*, mlp.linear_fc1.* (ColumnParallelLinear) | same name (TELayerNormColumnParallelLinear) |
| input_layernorm.{weight,bias}, where the layer has a gated delta net | self_attention.in_proj.layer_norm_{weight,bias} (TELayerNormColumnParallelLinear) |
| self_attention.in_proj.* (ColumnParallelLinear, gated delta net) | same name (TELayerNormColumnParallelLinear) |
| self_attention.q_layernorm.* (MLA)                  | self_attention.linear_q_up_proj.layer_norm_* (TELayerNormColumnParallelLinear) |
| self_attention.kv_layernorm.* (MLA)                 | self_attention.linear_kv_up_proj.layer_norm_* (TELayerNormColumnParallelLinear) |
| linear_q_up_proj.*, linear_kv_up_proj.* (ColumnParallelLinear, MLA) | same name (TELayerNormColumnParallelLinear) |
| linear_q_down_proj.*, linear_kv_down_proj.* (ColumnParallelLinear, MLA) | same name (TELinear, duplicated: no TP split) |
| mlp.experts.local_experts.E.linear_fc1.weight (SequentialMLP) | mlp.experts.linear_fc1.weightE (TEColumnParallelGroupedLinear) |
| mlp.experts.local_experts.E.linear_fc2.weight (SequentialMLP) | mlp.experts.linear_fc2.weightE (TERowParallelGroupedLinear) |
| other ColumnParallelLinear / RowParallelLinear (shared experts, ...) | same name (TEColumnParallelLinear / TERowParallelLinear) |
| input_layernorm, pre_mlp_layernorm that stay (MLA, MoE layers), q/k_layernorm, final_layernorm | same name (TENorm) |

Embedding, output layer and router are megatron-core's own modules in both layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from mapgen.common.dims import ModelDims
from mapgen.common.layout import canonical_name, weight_buffers
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.compiler.hybrid_model import build_hybrid_model
from mapgen.compiler.parallel_state import single_process_parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


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
    # the dtypes in which transformers keeps this tensor in float32 instead (its model class's
    # `_keep_in_fp32_modules_strict`: bfloat16 and float16; `_keep_in_fp32_modules`: float16)
    float32: tuple[str, ...] = ()


def gpt_inventory(dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
    """Every parameter of the GPTModel in `layout`'s names; `te_name` is always the te layout's
    name, which spec rules are written against."""
    local = _local_inventory(dims)
    te = to_te_layout(local)
    if layout == "te":
        return tuple(replace(p, te_name=p.name) for p in te)
    return tuple(replace(p, te_name=t.name) for p, t in zip(local, te))


# In megatron-core's HybridModel each decoder layer of a GPTModel is two layers: attention at
# 2L (its input norm, self_attention.*), then the MLP at 2L+1 (pre_mlp_layernorm, mlp.*); the
# final norm is `decoder.final_norm`. The names are otherwise the GPTModel's, in either layout.
_MLP_PART = ("mlp.", "pre_mlp_layernorm.")
_GPT_FINAL_NORM, _HYBRID_FINAL_NORM = "decoder.final_layernorm.", "decoder.final_norm."


# The MTP layer's transformer layer is a HybridStack of the same two layers (its `layers.0` and
# `layers.1`) in the HybridModel.
_MTP_TRANSFORMER_LAYER = re.compile(r"^(mtp\.layers\.\d+\.transformer_layer\.)")


def hybrid_name(gpt_name: str) -> str:
    """The HybridModel name of a GPTModel parameter (see above)."""
    mtp = _MTP_TRANSFORMER_LAYER.match(gpt_name)
    if mtp is not None:
        rest = gpt_name[mtp.end():]
        return f"{mtp.group(1)}layers.{1 if rest.startswith(_MLP_PART) else 0}.{rest}"
    layer = _LAYER.match(gpt_name)
    if layer is None:
        return gpt_name.replace(_GPT_FINAL_NORM, _HYBRID_FINAL_NORM, 1)
    rest = gpt_name[layer.end():]
    index = 2 * int(layer.group(1)) + (1 if rest.startswith(_MLP_PART) else 0)
    return f"decoder.layers.{index}.{rest}"


def hybrid_inventory(dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
    """The HybridModel's parameters, from a megatron-core HybridModel skeleton with one GPT
    layer of each kind (so its names, shapes and TP partitions are megatron-core's own),
    expanded to every layer; te names and module kinds follow the GPTModel's te rename.
    Raises if the skeleton's parameters are not exactly the renamed GPTModel ones."""
    from mapgen.common.errors import MapgenError

    gpt_local = _local_inventory(dims)
    gpt_te = to_te_layout(gpt_local)
    kinds, skeleton_dims = _skeleton_dims(dims)
    with single_process_parallel_state(), torch.device("meta"):
        skeleton = build_hybrid_model(skeleton_dims)
    built = {p.name: p for p in skeleton_params(skeleton, dims.params_dtype)}
    unused = set(built)
    template_layer = {kind: kinds.index(kind) for kind in kinds}  # GPT layer -> skeleton layer
    found: list[MegatronParam] = []
    problems: list[str] = []
    for local, te in zip(gpt_local, gpt_te):
        name = hybrid_name(local.name)
        template = local.name  # the same parameter in the skeleton's layer of this kind
        if local.layer is not None:
            template = _LAYER.sub(f"decoder.layers.{template_layer[_layer_kind(dims, local.layer)]}.", local.name, count=1)
        skeleton_name = hybrid_name(template)
        param = built.get(skeleton_name)
        unused.discard(skeleton_name)
        if param is None or (param.shape, param.partition_dim) != (local.shape, local.partition_dim):
            problems.append(f"{skeleton_name}: GPTModel has {local.shape} (TP dim {local.partition_dim}), HybridModel {param and (param.shape, param.partition_dim)}")
            continue
        layer = _LAYER.match(name)
        hybrid_te = hybrid_name(te.name)
        found.append(
            replace(
                te if layout == "te" else param,
                name=hybrid_te if layout == "te" else name,
                layer=int(layer.group(1)) if layer else None,
                expert=local.expert,
                te_name=te.name,
            )
        )
    problems += [f"{name}: in the HybridModel only" for name in sorted(unused)]
    if problems:
        raise MapgenError("megatron-core's HybridModel does not hold the GPTModel's parameters: " + "; ".join(problems[:5]))
    return tuple(found)


# Parameters that megatron-core splits over TP without marking them `tensor_model_parallel`: their
# module's `sharded_state_dict` states the split instead. The learnable softmax offset (attention
# sinks) holds one value per attention head of the rank (`DotProductAttention` builds it with
# num_attention_heads_per_partition rows and checkpoints it as {'softmax_offset': 0}).
_STATE_DICT_PARTITIONS = {("DotProductAttention", "softmax_offset"): 0, ("TEDotProductAttention", "softmax_offset"): 0}


def skeleton_params(model: Any, dtype: str) -> list[MegatronParam]:
    """Parameters of a skeleton; all carry the model's dtype (torch norms are built in fp32,
    but megatron-core's mixed-precision wrapper and TE hold them in the params dtype). Weight
    buffers keep their own dtype, as megatron-core keeps them."""
    modules = dict(model.named_modules())
    found: list[MegatronParam] = []
    tensors = [(n, p, dtype) for n, p in model.named_parameters()]
    tensors += [(n, b, str(b.dtype).removeprefix("torch.")) for n, b in weight_buffers(model)]
    for module_name, param, param_dtype in tensors:
        owner = modules[module_name.rsplit(".", 1)[0]]
        name = canonical_name(module_name)
        partitioned = bool(getattr(param, "tensor_model_parallel", False))
        if partitioned and not hasattr(param, "partition_dim"):
            # megatron-core's GatedDeltaNet marks conv1d.weight, A_log and dt_bias
            # tensor-parallel without a partition_dim; its sharded_state_dict splits them along dim 0
            setattr(param, "partition_dim", 0)
        stated = _STATE_DICT_PARTITIONS.get((type(owner).__name__, name.rsplit(".", 1)[-1]))
        layer = _LAYER.match(name)
        expert = _EXPERT.search(name)
        found.append(
            MegatronParam(
                name=name,
                shape=tuple(param.shape),
                dtype=param_dtype,
                module_kind=type(owner).__name__,
                partition_dim=int(param.partition_dim) if partitioned else stated,
                layer=int(layer.group(1)) if layer else None,
                expert=int(expert.group(1)) if expert else None,
                parallel_mode=getattr(owner, "parallel_mode", None),
            )
        )
    return found


LayerKind = tuple[bool, bool]  # (has experts, has a gated delta net instead of self-attention)


def _layer_kind(dims: ModelDims, index: int) -> LayerKind:
    return index in set(dims.moe_layers), index in set(dims.linear_attention_layers)


def _skeleton_dims(dims: ModelDims) -> tuple[list[LayerKind], ModelDims]:
    """The kinds of decoder layer the model has (with experts or not, dense first; with
    self-attention or a gated delta net) and the dims of a skeleton with one layer of each: its
    layer i is of kinds[i]. With multi-token prediction the model's last layer's kind comes last:
    megatron-core builds the MTP layer from the decoder's last layer spec. Attention windows
    shape no parameter."""
    kinds = sorted({_layer_kind(dims, index) for index in range(dims.num_layers)})
    if dims.mtp_num_layers:
        last = _layer_kind(dims, dims.num_layers - 1)
        kinds = [kind for kind in kinds if kind != last] + [last]
    return kinds, replace(
        dims,
        num_layers=len(kinds),
        moe_dense_layers=tuple(i for i, kind in enumerate(kinds) if not kind[0]),
        linear_attention_layers=tuple(i for i, kind in enumerate(kinds) if kind[1]),
        sliding_window=None,
        sliding_window_layers=(),
    )


def _local_inventory(dims: ModelDims) -> tuple[MegatronParam, ...]:
    """One skeleton layer of each kind (dense first, then with experts), copied to every layer
    of that kind."""
    kinds, skeleton_dims = _skeleton_dims(dims)
    with single_process_parallel_state(), torch.device("meta"):
        skeleton = build_gpt_model(skeleton_dims)
    params = skeleton_params(skeleton, dims.params_dtype)
    before = [p for p in params if p.name.startswith("embedding.")]
    templates = {kind: [p for p in params if p.layer == i] for i, kind in enumerate(kinds)}
    # the MTP block (megatron-core builds it between the decoder and the output layer) last, so
    # a model's parameters keep their order with or without it
    mtp = [p for p in params if p.name.startswith("mtp.")]
    after = [p for p in params if p not in before and p.layer is None and p not in mtp] + mtp
    expanded = list(before)
    for index in range(dims.num_layers):
        template = templates[_layer_kind(dims, index)]
        prefix = f"decoder.layers.{index}."
        expanded.extend(
            replace(p, name=prefix + _LAYER.sub("", p.name, count=1), layer=index)
            for p in template
        )
    expanded.extend(after)
    return tuple(expanded)


# (local norm, the linear TE fuses it into): the norm moves only where its layer has that linear
_TE_NORM_FUSIONS = (
    (".input_layernorm.", ".self_attention.linear_qkv."),
    (".pre_mlp_layernorm.", ".mlp.linear_fc1."),
    (".self_attention.q_layernorm.", ".self_attention.linear_q_up_proj."),
    (".self_attention.kv_layernorm.", ".self_attention.linear_kv_up_proj."),
    (".input_layernorm.", ".self_attention.in_proj."),  # gated delta net (TELayerNormColumnParallelLinear)
    (".norm.", ".mixer.in_proj."),  # a Mamba layer's pre-norm (mapgen/compiler/mamba_model.py)
)
_TE_FUSED = tuple(linear for _, linear in _TE_NORM_FUSIONS)
_DSA_INDEXER = ".self_attention.core_attention.indexer.linear_wk.weight"
_TE_DUPLICATED = (".self_attention.linear_q_down_proj.", ".self_attention.linear_kv_down_proj.")
_TE_GROUPED = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(\w+)$")
_NORMS = ("RMSNorm", "LayerNorm", "WrappedTorchNorm", "FusedLayerNorm", "ZeroCenteredRMSNorm")


def to_te_layout(params: tuple[MegatronParam, ...]) -> tuple[MegatronParam, ...]:
    """Names and module kinds of megatron-core's TransformerEngine layer spec (see module doc)."""
    names = {p.name for p in params}
    renamed: list[MegatronParam] = []
    for p in params:
        name, kind, partition, mode = p.name, p.module_kind, p.partition_dim, p.parallel_mode
        for norm, linear in _TE_NORM_FUSIONS:
            head, found, tail = name.partition(norm)
            # a DSA layer (DeepSeek-V3.2) keeps its MLA norms unfused in TE too: its indexer reads the normed q
            dsa = norm.startswith(".self_attention.") and f"{head}{_DSA_INDEXER}" in names
            if found and f"{head}{linear}weight" in names and not dsa:
                name, kind = f"{head}{linear}layer_norm_{tail}", "TELayerNormColumnParallelLinear"
        grouped = _TE_GROUPED.search(name)
        if grouped:
            expert, linear, leaf = grouped.groups()
            name = name[: grouped.start()] + f".mlp.experts.{linear}.{leaf}{expert}"
            kind = "TEColumnParallelGroupedLinear" if linear == "linear_fc1" else "TERowParallelGroupedLinear"
        elif any(d in name for d in _TE_DUPLICATED) or kind == "DuplicatedLinear":  # + the DSA indexer's
            kind, partition, mode = "TELinear", None, "duplicated"
        elif kind == "ColumnParallelLinear" and any(f in name for f in _TE_FUSED):
            kind = "TELayerNormColumnParallelLinear"
        elif kind == "ColumnParallelLinear" and not name.startswith("output_layer."):
            kind = "TEColumnParallelLinear"
        elif kind == "RowParallelLinear":
            kind = "TERowParallelLinear"
        elif kind in _NORMS:
            kind = "TENorm"
        renamed.append(replace(p, name=name, module_kind=kind, partition_dim=partition, parallel_mode=mode))
    return tuple(renamed)
