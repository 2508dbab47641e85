"""What the runtime's parts pass each other: a mapping module (a generated module, or a target
package's view of one) and its placement on this rank (which parameters this rank holds)."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

from mapgen.runtime.ownership import Owner
from mapgen.runtime.plan import ExportFn, HFTensorPlan, ImportFn, ParamPlan


class MappingModule(Protocol):
    TARGET: str
    PARAMS: tuple[ParamPlan, ...]
    HF_TENSORS: tuple[HFTensorPlan, ...]
    IMPORTS: dict[str, ImportFn]
    EXPORTS: dict[str, ExportFn]
    TIED: dict[str, str]


Module = MappingModule | ModuleType


@dataclass(frozen=True)
class Placement:
    """Where every parameter of the module lives under this layout, and what this rank holds."""

    owners: dict[str, Owner]  # global megatron name -> owning (pp rank, vp stage)
    local: dict[str, torch.Tensor]  # global name -> this rank's parameter (or weight buffer)
    tied: dict[str, torch.Tensor]  # tied copies this rank holds (global name -> param)
    dtype: torch.dtype
    expert_ranks: dict[str, tuple[int, int]] | None = None  # expert param -> (EP rank, local index)
    vocab: frozenset[str] = frozenset()  # vocabulary parameters (see `vocab_params`)
    key: tuple[object, ...] | None = None  # the module's layout as `memo` keys it; None when placing failed
