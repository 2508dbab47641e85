"""Functions the distributed tests run inside spawned gloo processes (see mapgen.verify.processes.spawn)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import initialize_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.runtime import ParallelContext
from mapgen.runtime import collectives, drivers, sync
from mapgen.runtime import save as saving
from mapgen.verify.megatron_cpu import prepare_cpu_megatron
from mapgen.verify.testing import import_module_from_path

OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
TENSOR_COLLECTIVES = ("all_gather", "broadcast", "all_reduce", "scatter", "gather", "send", "recv", "all_to_all")


def _setup(module_path: str, layout: ParallelLayout, model_module_path: str | None = None) -> tuple[Any, list[Any], ParallelContext]:
    module = import_module_from_path(Path(module_path), f"dist_{Path(module_path).stem}")
    model_module = module if model_module_path is None else import_module_from_path(
        Path(model_module_path), f"dist_model_{Path(model_module_path).stem}"
    )
    initialize_parallel_state(layout)
    prepare_cpu_megatron()
    chunks = build_model_chunks(model_module.DIMS, layout, params_dtype=torch.float32, model=model_module.MODEL)
    return module, chunks, ParallelContext.from_parallel_state()


def count_collectives(module_path: str, hf_dir: str, layout: ParallelLayout, bucket_bytes: int) -> dict[str, Any]:
    """Calls and bytes of every torch.distributed collective during import and export."""
    module, chunks, ctx = _setup(module_path, layout)
    counts: dict[str, dict[str, int]] = {}
    originals = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES + TENSOR_COLLECTIVES}

    def wrap(name: str, phase: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            entry = counts.setdefault(phase, {}).setdefault(name, 0)
            counts[phase][name] = entry + 1
            tensor = args[1] if name == "all_gather" else (args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if tensor is not None:
                key = f"{name}_bytes"
                counts[phase][key] = counts[phase].get(key, 0) + tensor.numel() * tensor.element_size()
            return originals[name](*args, **kwargs)
        return counted

    try:
        for phase in ("import", "export"):
            for name in originals:
                setattr(dist, name, wrap(name, phase))
            if phase == "import":
                drivers.load_hf_checkpoint(module, chunks, hf_dir, ctx)
            else:
                exported = sum(1 for _ in drivers.export_hf_tensors(module, chunks, ctx, bucket_bytes=bucket_bytes))
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    return {"counts": counts, "exported": exported, "tensors": len(module.HF_TENSORS), "params": len(module.PARAMS)}


def expect_error(module_path: str, hf_dir: str, layout: ParallelLayout, model_module_path: str | None = None) -> tuple[str | None, float]:
    """(the error this rank raised, seconds until it did) for a load that should fail."""
    started = time.perf_counter()
    try:
        module, chunks, ctx = _setup(module_path, layout, model_module_path)
        drivers.load_hf_checkpoint(module, chunks, hf_dir, ctx)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - started
    return None, time.perf_counter() - started


def save(module_path: str, hf_dir: str, layout: ParallelLayout, out_dir: str, fail_on_file: int | None) -> str | None:
    """Load, then save to out_dir; with fail_on_file, the writer fails writing that file."""
    import json

    module, chunks, ctx = _setup(module_path, layout)
    drivers.load_hf_checkpoint(module, chunks, hf_dir, ctx)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    original_save_file = saving.save_file
    written = []

    def failing_save_file(tensors: Any, path: str, metadata: Any = None) -> None:
        written.append(path)
        if fail_on_file is not None and len(written) == fail_on_file:
            raise OSError("disk full (simulated)")
        original_save_file(tensors, path, metadata=metadata)

    saving.save_file = failing_save_file
    try:
        saving.save_hf_checkpoint(module, chunks, out_dir, config, ctx, max_shard_bytes=20_000)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return f"{type(exc).__name__}: {exc}"
    finally:
        saving.save_file = original_save_file
    return None


# --- vocabulary padding (tests/test_distributed.py's padded-vocabulary block) ---------------


def expect_vocab_error(
    module_path: str, hf_dir: str, layout: ParallelLayout, model_vocab_size: int, make_vocab_size_divisible_by: int
) -> tuple[str | None, float]:
    """(the error this rank raised, seconds until it did) loading into a model built with
    `model_vocab_size` embedding rows, told the vocabulary is padded by `make_vocab_size_divisible_by`."""
    started = time.perf_counter()
    try:
        module = import_module_from_path(Path(module_path), f"dist_vocab_{Path(module_path).stem}")
        initialize_parallel_state(layout)
        prepare_cpu_megatron()
        chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, vocab_size=model_vocab_size)
        ctx = ParallelContext.from_parallel_state()
        drivers.load_hf_checkpoint(module, chunks, hf_dir, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - started
    return None, time.perf_counter() - started


# --- bad input at save time (tests/test_adversarial_runtime.py's distributed rows) ------------


def save_fails(module_path: str, hf_dir: str, layout: ParallelLayout, out_dir: str, fault: str | None) -> dict[str, Any]:
    """Load, then save to out_dir, with `fault` on the writing rank (rank 0): "oserror" or
    "safetensor_error" raised by the writer's second file (simulated), "fsize" a real file-size
    limit (RLIMIT_FSIZE: the kernel refuses the write with EFBIG), None for no fault of ours
    (the target itself is bad). Returns this rank's error, the seconds it took, and whether the
    writer ended in a collective (it must not: the task returns at all)."""
    import json
    import resource
    import signal

    from safetensors import SafetensorError

    module, chunks, ctx = _setup(module_path, layout)
    drivers.load_hf_checkpoint(module, chunks, hf_dir, ctx)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    original_save_file = saving.save_file
    written: list[str] = []
    writer = dist.get_rank() == 0

    def failing_save_file(tensors: Any, path: str, metadata: Any = None) -> None:
        written.append(path)
        if len(written) == 2 and fault == "oserror":
            raise OSError(28, "No space left on device (simulated)")
        if len(written) == 2 and fault == "safetensor_error":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) (simulated)")
        original_save_file(tensors, path, metadata=metadata)

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.getsignal(signal.SIGXFSZ)
    if writer and fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, limits[1]))
    saving.save_file = failing_save_file
    started = time.perf_counter()
    try:
        saving.save_hf_checkpoint(module, chunks, out_dir, config, ctx, max_shard_bytes=20_000)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    finally:
        saving.save_file = original_save_file
        if writer and fault == "fsize":
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, previous)
    return {"error": None, "seconds": time.perf_counter() - started}


# --- weight sync (tests/test_weight_sync.py's one spawn) ----------------------------------------


def _counting(work: Any) -> tuple[Any, dict[str, int]]:
    """work()'s result and the calls of every torch.distributed collective it made."""
    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES + TENSOR_COLLECTIVES + ("all_gather_into_tensor", "barrier")}

    def wrap(name: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return counted

    for name in originals:
        setattr(dist, name, wrap(name))
    try:
        result = work()
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    return result, counts


def export_local_pieces(module_path: str, hf_dir: str, layout: ParallelLayout) -> dict[str, Any]:
    """Load, then this rank's gather-free pieces from a fresh Converter (so not even the
    placement agreement has happened), counting collectives."""
    module, chunks, ctx = _setup(module_path, layout)
    drivers.load_hf_checkpoint(module, chunks, hf_dir, ctx)

    def pieces() -> list[dict[str, Any]]:
        converter = drivers.Converter(module, chunks, ctx)
        return [
            {"name": p.name, "expert": p.expert, "runs": p.runs, "data": p.data.clone(), "replicated": p.replicated,
             "megatron": p.megatron_name, "piece": p.piece, "primary": p.primary}
            for p in converter.export_local()
        ]

    found, counts = _counting(pieces)
    return {"pieces": found, "counts": counts, "rank": dist.get_rank()}


def export_formats(module_path: str, hf_dir: str, layout: ParallelLayout, options: list[dict[str, Any]]) -> dict[str, Any]:
    """Load, then one streamed export per options (held Converter, small buckets): rank 0 returns
    the tensors, every rank a digest of what it saw, and the collectives of each export."""
    import hashlib

    module, chunks, ctx = _setup(module_path, layout)
    converter = drivers.Converter(module, chunks, ctx)
    converter.load(hf_dir)
    results: list[dict[str, Any]] = []
    as_is = [0]  # the tensors that travelled as their flat buffer themselves (sync._travels_as_it_is)
    check = sync._travels_as_it_is

    def counted(*args: Any) -> bool:
        found = check(*args)
        as_is[0] += found
        return found

    sync._travels_as_it_is = counted  # type: ignore[assignment]
    # gloo's gathers in pieces of 64 bytes a rank (4 MiB at real widths): many pieces a bucket here
    piece_bytes, collectives._GLOO_PIECE_BYTES = collectives._GLOO_PIECE_BYTES, 64
    for kwargs in options:
        def run() -> dict[str, torch.Tensor]:
            return {name: tensor.clone() for name, tensor in converter.export(**kwargs)}
        as_is[0] = 0
        tensors, counts = _counting(run)
        digest = hashlib.sha256()
        for name, tensor in tensors.items():
            digest.update(name.encode() + str(tensor.dtype).encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
        bound = converter.export_bound(**kwargs)
        fmt = converter.export_format(**{k: v for k, v in kwargs.items() if k != "bucket_bytes"})
        plans, _ = converter._bucket_plan(kwargs.get("bucket_bytes", drivers.DEFAULT_BUCKET_BYTES), True, fmt)
        ahead = sum(1 for plan in plans if plan.ahead and plan.ahead[ctx.pp.rank] >= 0)  # buckets made ahead here
        results.append({"tensors": tensors if dist.get_rank() == 0 else None, "digest": digest.hexdigest(),
                        "counts": counts, "bound": bound, "ahead": ahead, "as_is": as_is[0]})
    sync._travels_as_it_is = check  # type: ignore[assignment]
    collectives._GLOO_PIECE_BYTES = piece_bytes
    return {"results": results, "rank": dist.get_rank()}


def package_rank_share(package_dir: str, hf_dir: str, layout: ParallelLayout) -> dict[str, Any]:
    """A target package: the parts this rank imports to load and export_local (only its own
    layers and experts), its gather-free pieces, then a gathered export (which reads the rest)."""
    import hashlib
    import sys

    from mapgen.verify.inputs import load_mapping_module

    package = load_mapping_module(package_dir, "dist_package")
    initialize_parallel_state(layout)
    prepare_cpu_megatron()
    chunks = build_model_chunks(package.DIMS, layout, params_dtype=torch.float32, model=package.MODEL)
    ctx = ParallelContext.from_parallel_state()

    def parts() -> list[str]:
        return sorted(name.split(".", 1)[1] for name in sys.modules if name.startswith("dist_package."))

    converter = drivers.Converter(package, chunks, ctx)
    converter.load(hf_dir)
    pieces = [
        {"name": p.name, "expert": p.expert, "runs": p.runs, "data": p.data.clone(), "megatron": p.megatron_name}
        for p in converter.export_local()
    ]
    own = parts()
    digest = hashlib.sha256()
    for name, tensor in converter.export(bucket_bytes=4096):
        digest.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return {"own": own, "after_export": parts(), "pieces": pieces, "digest": digest.hexdigest(), "rank": dist.get_rank(),
            "pp": ctx.pp.rank, "ep": ctx.ep.rank}


# --- engine weights (tests/test_engine.py's one spawn) ------------------------------------------


def engine_sync(module_path: str, hf_dir: str, layout: ParallelLayout, engine_class: Any, bucket_bytes: int) -> dict[str, Any]:
    """Rank 0 feeds a stand-in engine (`engine_class(shapes)`, vLLM's load_weights contract)
    through mapgen.engine_weights while the others drain, three times: a whole sync (counting
    every rank's collectives); one whose engine raises part way, on a tensor of the last layer,
    inside `with` (which drains the rest, so the others finish); a whole sync again (the ranks
    are still in step). Then this rank's export_local pieces, for the parent's PieceReceivers."""
    import dataclasses

    from mapgen.engine import engine_weights

    module, chunks, ctx = _setup(module_path, layout)
    converter = drivers.Converter(module, chunks, ctx)
    converter.load(hf_dir)
    feed = dist.get_rank() == 0
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    started = time.perf_counter()

    def sync(engine: Any) -> dict[str, Any]:
        weights = engine_weights(converter, feed=feed, bucket_bytes=bucket_bytes)
        if feed:
            loaded, left = engine.load_weights(weights), weights.drain()
        else:
            loaded, left = [name for name, _ in weights], None  # yields nothing, runs every collective
        return {"loaded": loaded, "left": left, "handed": weights.handed, "drained": weights.drained,
                "finished": weights.finished}

    engine = engine_class(shapes) if feed else None
    first, counts = _counting(lambda: sync(engine))
    fail_on = [name for name in shapes if name.endswith("self_attn.o_proj.weight")][-1]
    failing = engine_class({n: s for n, s in shapes.items() if n != fail_on}) if feed else None
    error = None
    try:
        with engine_weights(converter, feed=feed, bucket_bytes=bucket_bytes) as weights:
            if feed:
                failing.load_weights(weights)
    except KeyError as exc:
        error = {"args": exc.args, "notes": list(getattr(exc, "__notes__", []))}
    second = {"error": error, "handed": weights.handed, "drained": weights.drained, "finished": weights.finished,
              "fail_on": fail_on}
    again = engine_class(shapes) if feed else None
    third = sync(again)
    seconds = time.perf_counter() - started
    pieces = [dataclasses.replace(p, data=p.data.clone()) for p in converter.export_local()]
    return {"rank": dist.get_rank(), "first": first, "counts": counts, "second": second, "third": third,
            "engine": engine.params if engine is not None else None,
            "again": again.params if again is not None else None, "pieces": pieces, "seconds": seconds}


def arguments_across_ranks(module_path: str, hf_dir: str, layout: ParallelLayout, out_dir: str) -> dict[str, Any]:
    """Export and save called with arguments that differ from rank to rank (or are refused on
    one rank only): each call's outcome on this rank, then a good export, which must still run
    (no rank was left inside a collective)."""
    import json

    module, chunks, ctx = _setup(module_path, layout)
    converter = drivers.Converter(module, chunks, ctx)
    converter.load(hf_dir)
    rank = dist.get_rank()
    calls = {
        "bucket_bytes": lambda: list(converter.export(bucket_bytes=4096 * (1 + rank))),
        "zero on rank 1": lambda: list(converter.export(bucket_bytes=0 if rank == 1 else 4096)),
        "fp8 on rank 0": lambda: list(converter.export(fp8=True if rank == 0 else None)),
        "writer_rank": lambda: saving.save_hf_checkpoint(
            module, chunks, Path(out_dir) / "saved", json.loads((Path(hf_dir) / "config.json").read_text()), ctx,
            writer_rank=rank % 2,
        ),
    }
    outcomes: dict[str, tuple[str, str]] = {}
    for label, call in calls.items():
        try:
            call()
            outcomes[label] = ("ok", "")
        except Exception as exc:  # noqa: BLE001 - the outcome is the result
            outcomes[label] = (type(exc).__name__, str(exc))
    good = sum(1 for _ in converter.export(bucket_bytes=4096))
    return {"outcomes": outcomes, "good": good, "rank": rank, "saved": (Path(out_dir) / "saved").exists()}


def export_quantized(module_path: str, hf_dir: str, layout: ParallelLayout, options: list[dict[str, Any]]) -> dict[str, Any]:
    """MXFP8 / NVFP4 streamed exports (issue 27), as `export_formats` but hashing each tensor's
    bytes flattened (NVFP4's per-tensor `_scale_2` is a 0-d float32): rank 0 returns the
    tensors, every rank a digest of what it saw and the collectives of each export."""
    import hashlib

    module, chunks, ctx = _setup(module_path, layout)
    converter = drivers.Converter(module, chunks, ctx)
    converter.load(hf_dir)
    results: list[dict[str, Any]] = []
    for kwargs in options:
        def run() -> dict[str, torch.Tensor]:
            return {name: tensor.clone() for name, tensor in converter.export(**kwargs)}
        tensors, counts = _counting(run)
        digest = hashlib.sha256()
        for name, tensor in tensors.items():
            digest.update(name.encode() + str(tensor.dtype).encode() + tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        results.append({"tensors": tensors if dist.get_rank() == 0 else None, "digest": digest.hexdigest(), "counts": counts})
    return {"results": results, "rank": dist.get_rank()}


def export_function_fails(module_path: str, hf_dir: str, layout: ParallelLayout) -> dict[str, Any]:
    """An export function that raises on one rank only, in the middle of a held export (small
    buckets): what each rank raised and how many tensors it had been given, then a good export
    on every rank (none was left inside a collective)."""
    module, chunks, ctx = _setup(module_path, layout)
    converter = drivers.Converter(module, chunks, ctx)
    converter.load(hf_dir)
    victim = next(p.megatron_name for p in module.PARAMS if ".layers.1." in p.megatron_name)
    original = module.EXPORTS[victim]

    def broken(parts: Any) -> Any:  # on TP rank 1 of the stage that holds it: one rank
        if ctx.tp.rank == 1:
            raise RuntimeError(f"simulated failure exporting {victim}")
        return original(parts)

    module.EXPORTS[victim] = broken
    found: dict[bool, dict[str, Any]] = {}
    for all_stages in (True, False):  # every rank walks every bucket; each stage its own only
        given, outcome = 0, ("ok", "")
        try:
            for _ in converter.export(bucket_bytes=4096, all_stages=all_stages):
                given += 1
        except Exception as exc:  # noqa: BLE001 - the outcome is the result
            outcome = (type(exc).__name__, str(exc))
        found[all_stages] = {"outcome": outcome, "given": given}
    module.EXPORTS[victim] = original
    good = sum(1 for _ in converter.export(bucket_bytes=4096))
    own = sum(1 for _ in converter.export(bucket_bytes=4096, all_stages=False))
    holds = victim in converter.placement.local
    return {"rank": dist.get_rank(), **found[True], "own_stage": found[False], "good": good, "own": own, "victim": victim, "holds": holds}
