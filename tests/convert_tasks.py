"""Functions tests/test_convert.py runs inside spawned gloo processes: megatron-core's own
distributed checkpointing, used directly (no mapgen convert code), as the truth to compare with."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mapgen.common.layout import weight_buffers
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import initialize_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.runtime import ParallelContext
from mapgen.runtime.drivers import load_hf_checkpoint
from mapgen.verify.verdict import same_bits
from mapgen.verify.forward import megatron_logits
from mapgen.verify.megatron_cpu import prepare_cpu_megatron
from mapgen.verify.testing import import_module_from_path

INPUT_IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))


def _setup(module_path: str, layout: ParallelLayout) -> Any:
    module = import_module_from_path(Path(module_path), f"convert_{Path(module_path).stem}")
    initialize_parallel_state(layout)
    prepare_cpu_megatron()
    setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)  # the torch_dist writer's, on CPU
    return module


def _weights(chunk: Any) -> dict[str, torch.Tensor]:
    return {**dict(chunk.named_parameters()), **dict(weight_buffers(chunk))}


def megatron_core_load(module_path: str, hf_dir: str, checkpoint: str, layout: ParallelLayout) -> dict[str, Any]:
    """At `layout`, what megatron-core's own `dist_checkpointing.load` of `checkpoint` (a folder
    with metadata.json) puts in the model, against mapgen's direct import of `hf_dir` at the
    same layout: the names this rank compared and those that differ."""
    from megatron.core import dist_checkpointing

    module = _setup(module_path, layout)
    chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, model=module.MODEL)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    loaded = dist_checkpointing.load({k: c.sharded_state_dict() for k, c in zip(keys, chunks)}, checkpoint)
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(loaded[key])
    direct = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, model=module.MODEL)
    load_hf_checkpoint(module, direct, hf_dir, ParallelContext.from_parallel_state())
    compared, differ = 0, []
    for chunk, twin in zip(chunks, direct):
        ours, theirs = _weights(chunk), _weights(twin)
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            compared += 1
            if not same_bits(tensor.detach(), theirs[name].detach()):
                differ.append(name)
    return {"compared": compared, "differ": differ}


def megatron_core_write(module_path: str, layout: ParallelLayout, out_dir: str, seed: int, iteration: int | None) -> Any:
    """A megatron-core model at `layout` with weights set here (megatron-core's seeded init, then
    seeded noise on every parameter, so that no norm is 1 and no two experts are alike), saved
    by megatron-core's `dist_checkpointing.save` in Megatron-LM's layout (tracker file, release/
    or iter_NNNNNNN/, checkpoint_version, iteration). Returns the model's logits on rank 0."""
    from megatron.core import dist_checkpointing, parallel_state

    module = _setup(module_path, layout)
    torch.manual_seed(seed)
    chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, model=module.MODEL)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            salt = f"{name}/{ep_rank}" if ".local_experts." in name else name
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + zlib.crc32(salt.encode())))
            param.add_(noise * 0.05)
    logits = megatron_logits(chunks[0], INPUT_IDS)
    folder = Path(out_dir) / ("release" if iteration is None else f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    state = {"model": chunks[0].sharded_state_dict(), "checkpoint_version": 3.0, "iteration": iteration or 0}
    dist_checkpointing.save(state, str(folder))
    if dist.get_rank() == 0:
        (Path(out_dir) / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    dist.barrier()
    return logits if dist.get_rank() == 0 else None


def failing_write(job: Any) -> Any:
    """`run_convert` whose megatron-core save fails on every rank after writing part of the
    checkpoint (the way megatron-core reports a failed write: on every rank)."""
    from megatron.core import dist_checkpointing

    from mapgen.convert_rank import run_convert

    original = dist_checkpointing.save

    from torch.distributed.checkpoint.api import CheckpointException

    def save(state: Any, folder: str, *args: Any, **kwargs: Any) -> Any:
        (Path(folder) / "__0_0.distcp").write_bytes(b"partial")
        # as megatron-core's torch_dist writer reports it: a BaseException, missed by `except Exception`
        raise CheckpointException("save", {0: (OSError(28, "No space left on device (simulated)"), None)})

    dist_checkpointing.save = save
    try:
        return run_convert(job)
    finally:
        dist_checkpointing.save = original


def failing_on_one_rank(job: Any, step: str) -> Any:
    """`run_convert` where megatron-core's `step` ("save" or "load") raises on rank 1 only, after
    doing its work (as a failure in megatron-core's own bookkeeping after the collectives would):
    every rank must stop with the same error, none left waiting for rank 1."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mapgen.convert_rank import run_convert

    original = getattr(dist_checkpointing, step)

    def failing(*args: Any, **kwargs: Any) -> Any:
        done = original(*args, **kwargs)
        if dist.get_rank() == 1:
            raise RuntimeError(f"simulated failure inside megatron-core's {step} on rank 1")
        return done

    setattr(dist_checkpointing, step, failing)
    try:
        return run_convert(job)
    finally:
        setattr(dist_checkpointing, step, original)
