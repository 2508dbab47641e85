"""The static tables every generated module carries, and the signatures of its functions."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable

import torch

from mapgen.runtime.context import ParallelContext

Loader = Callable[[str], torch.Tensor]
ImportFn = Callable[[ParallelContext, Loader], torch.Tensor]
ExportFn = Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ParamPlan:
    """One Megatron parameter: its global name and shape, how TP splits it, where it lives."""

    megatron_name: str
    shape: tuple[int, ...]
    dtype: str
    split_dim: int | None  # None: every rank of its TP group holds it whole
    expert_parallel: bool  # sharded over expert-TP and distributed over EP
    layer: int | None
    expert: int | None
    hf_names: tuple[str, ...]


@dataclass(frozen=True)
class HFTensorPlan:
    name: str
    shape: tuple[int, ...]
