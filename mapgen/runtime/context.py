"""Who this rank is in each parallel group: the only run-time input the generated code needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Group:
    """One process group as the conversion sees it: this rank's index, the size, the handle."""

    rank: int = 0
    size: int = 1
    handle: Any = None  # torch.distributed.ProcessGroup; None for a group of one

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a group of size {self.size}")


@dataclass(frozen=True)
class ParallelContext:
    """Tensor (tp), pipeline (pp, with vpp virtual stages), expert (ep) and expert-tensor (etp);
    `stage`: every rank of this rank's pipeline stage (its tp, data, context and expert ranks)."""

    tp: Group = Group()
    pp: Group = Group()
    ep: Group = Group()
    etp: Group = Group()
    vpp_size: int = 1
    stage: Group = Group()

    @staticmethod
    def single() -> ParallelContext:
        return ParallelContext()

    @staticmethod
    def from_parallel_state() -> ParallelContext:
        """The groups megatron-core's `parallel_state` was initialised with."""
        import torch.distributed
        from megatron.core import parallel_state as ps

        def group(handle: Any, rank: int, size: int) -> Group:
            return Group(rank, size, handle if size > 1 else None)

        vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
        stage = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        stage_size = torch.distributed.get_world_size(stage) if stage is not None else 1
        return ParallelContext(
            tp=group(
                ps.get_tensor_model_parallel_group(),
                ps.get_tensor_model_parallel_rank(),
                ps.get_tensor_model_parallel_world_size(),
            ),
            pp=group(
                ps.get_pipeline_model_parallel_group(),
                ps.get_pipeline_model_parallel_rank(),
                ps.get_pipeline_model_parallel_world_size(),
            ),
            ep=group(
                ps.get_expert_model_parallel_group(),
                ps.get_expert_model_parallel_rank(),
                ps.get_expert_model_parallel_world_size(),
            ),
            etp=group(
                ps.get_expert_tensor_parallel_group(),
                ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_world_size(),
            ),
            vpp_size=vpp,
            stage=group(stage, torch.distributed.get_rank(stage) if stage_size > 1 else 0, stage_size),
        )
