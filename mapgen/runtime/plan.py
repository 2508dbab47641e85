"""The static tables every generated module carries, and the signatures of its functions."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, NamedTuple, Protocol

import torch

from mapgen.common.layout import QKVGeometry
from mapgen.runtime.context import ParallelContext

Loader = Callable[[str], torch.Tensor]

# short names for the generated functions' signatures
Ctx = ParallelContext
Out = torch.Tensor | None  # the parameter to import into, or None for a new tensor
Parts = Sequence[torch.Tensor]  # a parameter's shards, in TP (expert-TP) rank order
HFOut = dict[str, torch.Tensor]  # HF name -> full tensor


class ImportFn(Protocol):
    """HF tensors (through `load`) -> this rank's shard, written into `out` when given."""

    def __call__(
        self, ctx: ParallelContext, load: Loader, out: torch.Tensor | None = None
    ) -> torch.Tensor: ...


ExportFn = Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RulePlan:
    """One rule of the spec, as the module applies it: the facts every parameter it produced
    shares. `id` is its stable identity (the Megatron pattern, or the spec's `id:`), which the
    functions' docstrings cite."""

    id: str
    kind: str  # the spec's kind: direct, column, row, replicated, auto, qkv, kv, ...
    megatron: str  # the Megatron name pattern
    hf: tuple[str, ...]  # the HF name pattern of each role, in `roles` order
    roles: tuple[str, ...]  # "gate_up": one [gate; up] tensor (fused, or a stacked-experts slice)
    permute_dims: tuple[int, ...] | None = None
    qkv: QKVGeometry | None = None
    # every parameter of the rule is the weight of a linear layer (not the output layer): what
    # an FP8 block-quantized checkpoint (DeepSeek-V3's) quantizes
    linear_weight: bool = False
    # gated_mlp from one fused HF tensor whose gate and up rows alternate (gpt-oss)
    interleaved: bool = False


@dataclass(frozen=True)
class ParamPlan:
    """One Megatron parameter: its global name and shape, how TP splits it, where it lives, its
    HF tensors, and its two conversion functions."""

    megatron_name: str
    shape: tuple[int, ...]
    dtype: str
    split_dim: int | None  # None: every rank of its TP group holds it whole
    expert_parallel: bool  # sharded over expert-TP and distributed over EP
    layer: int | None
    expert: int | None  # global expert index
    rule: int  # index into the module's RULES
    hf_names: tuple[str, ...]  # `X[i]`: slice i of the stacked-experts tensor X
    importer: ImportFn
    exporter: ExportFn


class ParamRow(NamedTuple):
    """A ParamPlan as a package's part writes it (`P`), without what the part already says: the
    name after the part's PREFIX, the HF tensors as indices into the part's own HF_TENSORS (or,
    for a slice of a stacked-experts tensor another part holds, its whole `X[i]` label), the
    dtype only where it is not the target's `DIMS.params_dtype`; the layer is the part's, and an
    expert's parameter is expert-parallel. `mapgen.runtime.package` makes the ParamPlan."""

    name: str
    shape: tuple[int, ...]
    split_dim: int | None
    expert: int | None
    rule: int
    hf: tuple[int | str, ...]
    importer: ImportFn
    exporter: ExportFn
    dtype: str | None = None


class HFRow(NamedTuple):
    """An HFTensorPlan as a part writes it (`H`): the name after the part's HF_PREFIX, the shape,
    its place in the whole target's HF order, and the dtypes it is kept in float32 for."""

    name: str
    shape: tuple[int, ...]
    at: int
    float32: tuple[str, ...] = ()


@dataclass(frozen=True)
class HFTensorPlan:
    name: str
    shape: tuple[int, ...]
    # the export dtypes in which the HF model keeps this tensor in float32 instead (transformers'
    # `_keep_in_fp32_modules_strict`: bfloat16 and float16; `_keep_in_fp32_modules`: float16)
    float32: tuple[str, ...] = ()
    # where the tensor stands in the target's HF order (a package's parts each hold some of the
    # tensors; their union, sorted by `at`, is the whole table); -1 in a one-file module, whose
    # table is in HF order already
    at: int = -1


@dataclass(frozen=True)
class PartPlan:
    """One file of a target package: its module name, the decoder layer it holds (None for the
    embedding, the output layer, the MTP block, the vision tower), the range of global expert
    indices it holds (None: no experts, or all of the layer's), and how many Megatron parameters
    and HF tensors it holds."""

    module: str
    layer: int | None
    experts: tuple[int, int] | None  # [first, last + 1)
    params: int
    hf_tensors: int
