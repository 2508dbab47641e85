"""The static tables every generated module carries, and the signatures of its functions."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, Protocol

import torch

from mapgen.runtime.context import ParallelContext

Loader = Callable[[str], torch.Tensor]


class ImportFn(Protocol):
    """HF tensors (through `load`) -> this rank's shard, written into `out` when given."""

    def __call__(
        self, ctx: ParallelContext, load: Loader, out: torch.Tensor | None = None
    ) -> torch.Tensor: ...


ExportFn = Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]]


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
    hf_names: tuple[str, ...]
    importer: ImportFn
    exporter: ExportFn


@dataclass(frozen=True)
class HFTensorPlan:
    name: str
    shape: tuple[int, ...]
