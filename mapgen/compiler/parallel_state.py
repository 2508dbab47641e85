"""megatron-core's parallel state for building models: a one-process world, a layout's groups.

A world of one process outside any launcher, and the model-parallel groups of a
`ParallelLayout` (re)initialised and destroyed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from torch.distributed import HashStore  # type: ignore[attr-defined]

from mapgen.common.console import native_stdout_silenced
from mapgen.common.parallel import ParallelLayout


def ensure_single_process_parallel_state() -> None:
    """A world of one process, so megatron-core can build a model outside any launcher."""
    from megatron.core import parallel_state

    with native_stdout_silenced():
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()


@contextmanager
def single_process_parallel_state() -> Iterator[None]:
    """`ensure_single_process_parallel_state` for a while: what it set up, it tears down."""
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    created_state = not parallel_state.model_parallel_is_initialized()
    ensure_single_process_parallel_state()
    try:
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


def destroy_parallel_state() -> None:
    """megatron-core's `destroy_model_parallel` forgets its process groups without destroying
    them; each gloo group keeps its threads and sockets, so a process that initialises many
    layouts in turn (the distributed tests, `mapgen verify` of several jobs) grew by 50-60
    threads per layout. Destroy every group but the default one as well."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    world = distributed_c10d.GroupMember.WORLD
    for group in list(distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)


def initialize_parallel_state(layout: ParallelLayout) -> None:
    """(Re)initialise megatron-core's groups for `layout` in an initialised process group."""
    from megatron.core import parallel_state

    from mapgen.common.errors import MapgenError

    if problems := layout.problems():
        raise MapgenError(f"layout {layout}: " + "; ".join(problems))
    if parallel_state.model_parallel_is_initialized():
        destroy_parallel_state()
    with native_stdout_silenced():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
        )
