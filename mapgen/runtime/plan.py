"""The static tables every generated module carries, and the signatures of its functions."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, Protocol

import torch

from mapgen.common.layout import QKVGeometry
from mapgen.runtime.context import ParallelContext

Loader = Callable[[str], torch.Tensor]


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
    roles: tuple[str, ...]  # "gate_up" is a stacked-experts slice holding [gate; up]
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


@dataclass(frozen=True)
class HFTensorPlan:
    name: str
    shape: tuple[int, ...]
    # the export dtypes in which the HF model keeps this tensor in float32 instead (transformers'
    # `_keep_in_fp32_modules_strict`: bfloat16 and float16; `_keep_in_fp32_modules`: float16)
    float32: tuple[str, ...] = ()
