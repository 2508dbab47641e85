"""`mapgen convert` throughput against safetensors plus megatron-core's own distributed
checkpointing of the same bytes, measured in the same run.

Run: .venv/bin/python benchmarks/convert_throughput.py [--layers 16 --hidden 512] [--repeat 3] [--json out.json]

Stand-ins (random float32 weights, saved by transformers): a Llama (hidden H, FFN 3H, 8 heads /
2 KV heads, vocabulary 32H; 16 layers of hidden 512: 65M parameters, 260 MB) and a Qwen3-MoE
(the same attention, 8 experts of FFN H/2, top 2; 78M parameters, 311 MB, 531 HF tensors). Each
runs at TP1 in one process, then the Llama at TP2 and the MoE at EP2 in 2 gloo processes
(`--layouts`), started by `mapgen.verify.processes.spawn` as `mapgen convert` starts its ranks.

- mapgen hf-to-megatron: `mapgen.convert_rank.run_convert` (what `mapgen convert` runs in each rank);
  its time is the command's own import and write phases (building the megatron-core model is
  reported apart, as "build"). megatron-to-hf: its load and export phases.
- baseline hf-to-megatron: `safetensors.torch.load_file` of the same HF files, then
  `megatron.core.dist_checkpointing.save` of the loaded tensors as a sharded state dict
  (`ShardedTensor.from_rank_offsets`, HF names, no mapping). On 2 ranks each rank reads
  (safetensors' `get_slice`) and writes only its half of every tensor's rows.
- baseline megatron-to-hf: `dist_checkpointing.load` of the checkpoint mapgen wrote (every model
  tensor, by its key and global shape from the checkpoint's metadata, into empty tensors), then
  `safetensors.torch.save_file` of them. On 2 ranks each rank loads its half of every tensor's
  rows and writes them to a file of its own: no communication, and not an HF checkpoint, where
  mapgen's export all-gathers every sharded tensor over gloo and rank 0 alone writes the HF
  files (`save_hf_checkpoint`). So the 2-process megatron-to-hf ratio is mostly that gather.

Both sides run with the CPU adjustments mapgen convert installs (megatron-core's CPU set-up, a
no-op `torch.cuda.synchronize` for the torch_dist writer) and megatron-core's default save
strategy (its writer forks 2 processes per save and fsyncs; safetensors' save does not fsync,
on either side). megatron-core's writer also starts a multiprocessing Manager at the first save
in a process: that start-up is paid before anything is timed and reported apart (each `mapgen
convert` run pays it once). A time is the slowest rank's, best of --repeat; bytes are the HF
tensors' (the same as the checkpoint's model tensors: no vocabulary padding); MB/s is 1e6 bytes
per second. All files are on the same disk and, after the first repeat, in the page cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mapgen.compiler.build import compile_target  # noqa: E402
from mapgen.common.parallel import ParallelLayout  # noqa: E402
from mapgen.verify import megatron_cpu, testing  # noqa: E402
from mapgen.verify.processes import TaskFailed, spawn  # noqa: E402

# stand-in: (family, spec, the 2-process layout)
MODELS = {
    "llama": ("llama", "specs/llama.yaml", "TP2"),
    "qwen3_moe": ("qwen3_moe", "specs/qwen3_moe.yaml", "EP2"),
}
LAYOUTS = {"TP1": ParallelLayout(), "TP2": ParallelLayout(tp=2), "EP2": ParallelLayout(ep=2, dp=2)}
DIRECTIONS = ("hf-to-megatron", "megatron-to-hf")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def make_model(folder: Path, name: str, layers: int, hidden: int, experts: int) -> tuple[Path, Path]:
    """The stand-in's HF folder and its local module."""
    family, spec, _ = MODELS[name]
    sizes: dict[str, Any] = dict(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=32 * hidden,
    )
    if family == "qwen3_moe":
        sizes.update(head_dim=hidden // 8, num_experts=experts, moe_intermediate_size=hidden // 2)
    hf_dir = folder / name
    testing.save_tiny_model(family, hf_dir, **sizes)
    module = folder / f"{name}_local.py"
    module.write_text(compile_target(f"{name}_local", ROOT / spec, hf_dir / "config.json", "local", "bench"))
    return hf_dir, module


def _fresh(rank: int, *folders: Path, make: bool = False) -> None:
    """Remove `folders` (rank 0), optionally make them again empty; every rank waits."""
    if rank == 0:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
            if make:
                folder.mkdir(parents=True)
    dist.barrier()


def _slowest(seconds: list[float]) -> list[float]:
    """Each entry's slowest rank."""
    values = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [float(v) for v in values]


def _rows(shape: tuple[int, ...], rank: int, world: int) -> tuple[int, int] | None:
    """This rank's rows of a tensor split along dim 0 over the ranks; None: not split (rank 0's)."""
    if world == 1 or not shape or shape[0] % world:
        return None
    step = shape[0] // world
    return rank * step, (rank + 1) * step


def _sharded(key: str, tensor: torch.Tensor, rows: tuple[int, int] | None, rank: int, world: int) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if rows is None:  # whole, written by rank 0
        return ShardedTensor.from_rank_offsets(key, tensor, replica_id=rank)
    return ShardedTensor.from_rank_offsets(key, tensor, (0, rank, world), replica_id=0)


def baseline_hf_to_megatron(hf_dir: Path, out: Path, rank: int, world: int) -> None:
    """safetensors' load of the HF files, megatron-core's save of the same tensors."""
    from megatron.core import dist_checkpointing
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    tensors: dict[str, tuple[torch.Tensor, tuple[int, int] | None]] = {}
    if world == 1:
        for file in files:
            tensors.update((k, (v, None)) for k, v in load_file(file).items())
    else:
        for file in files:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    rows = _rows(tuple(part.get_shape()), rank, world)
                    if rows is not None:
                        tensors[key] = (part[rows[0] : rows[1]], rows)
                    elif rank == 0:
                        tensors[key] = (handle.get_tensor(key), None)
                    else:  # a replica megatron-core does not write: its shape, no bytes read
                        tensors[key] = (torch.empty(part.get_shape(), dtype=SAFETENSORS_DTYPES[part.get_dtype()]), None)
    state = {key: _sharded(key, tensor, rows, rank, world) for key, (tensor, rows) in tensors.items()}
    dist_checkpointing.save(state, str(out))


def baseline_megatron_to_hf(folder: Path, checkpoint: Any, out: Path, rank: int, world: int) -> None:
    """megatron-core's load of the checkpoint's model tensors, safetensors' save of them."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    state = {}
    for key in checkpoint.model_tensors():
        shape, dtype = checkpoint.tensors[key]
        rows = _rows(shape, rank, world)
        local = shape if rows is None else (rows[1] - rows[0], *shape[1:])
        state[key] = _sharded(key, torch.empty(local, dtype=dtype), rows, rank, world)
    loaded = dist_checkpointing.load(state, str(folder))
    # (the loaded dict holds common.pt's entries too)
    mine = {key: loaded[key] for key in state if rank == 0 or _rows(checkpoint.tensors[key][0], rank, world)}
    save_file(mine, str(out / f"rank{rank}.safetensors"), metadata={"format": "pt"})


def measure(module_path: str, hf_dir: str, layout: ParallelLayout, work_dir: str, repeat: int) -> dict[str, Any]:
    """In every rank: mapgen convert both ways and the baselines, best of `repeat`."""
    from mapgen.convert_job import ConvertJob
    from mapgen.convert_rank import _cpu_dist_checkpointing, run_convert
    from mapgen.megatron_checkpoint import read_megatron_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    source = Path(hf_dir)
    config = json.loads((source / "config.json").read_text())
    work = Path(work_dir)
    mcore, back, base_mcore, base_back = work / "mcore", work / "hf_back", work / "base_mcore", work / "base_hf"
    best: dict[str, float] = {}
    phases: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    def mapgen(direction: str, src: Path, out: Path) -> None:
        _fresh(rank, out)
        job = ConvertJob(direction, module_path, str(src), str(out), layout, config, progress=False)
        result = run_convert(job)
        if result.error is not None:
            raise RuntimeError(result.error)
        steps = list(result.seconds)  # build, then the conversion's own phases
        slowest = dict(zip(steps, _slowest([result.seconds[s] for s in steps])))
        keep(f"mapgen_{direction}_build_s", slowest["build"])
        keep(f"mapgen_{direction}_s", sum(v for s, v in slowest.items() if s != "build"))
        for step, seconds in slowest.items():
            phases[f"{direction}_{step}_s"] = min(phases.get(f"{direction}_{step}_s", float("inf")), seconds)

    # megatron-core's torch_dist writer starts a multiprocessing Manager (a spawned Python
    # process) at its first save in a process: paid once, by whichever side saves first, so
    # paid here, before either is timed, and reported apart
    started = time.perf_counter()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if hasattr(filesystem_async, "_get_write_results_queue"):
        filesystem_async._get_write_results_queue()
    writer_startup = _slowest([time.perf_counter() - started])[0]
    for _ in range(repeat):
        mapgen("hf-to-megatron", source, mcore)
        gc.collect()
        # the same CPU adjustments as mapgen convert's ranks (run_convert installed them too)
        megatron_cpu.prepare_cpu_megatron()
        _cpu_dist_checkpointing()
        _fresh(rank, base_mcore, make=True)
        started = time.perf_counter()
        baseline_hf_to_megatron(source, base_mcore, rank, world)
        keep("baseline_hf-to-megatron_s", _slowest([time.perf_counter() - started])[0])
        gc.collect()

        mapgen("megatron-to-hf", mcore, back)
        gc.collect()
        checkpoint = read_megatron_checkpoint(mcore)  # metadata: mapgen reads it before its load phase too
        _fresh(rank, base_back, make=True)
        started = time.perf_counter()
        baseline_megatron_to_hf(checkpoint.folder, checkpoint, base_back, rank, world)
        keep("baseline_megatron-to-hf_s", _slowest([time.perf_counter() - started])[0])
        gc.collect()

    checkpoint = read_megatron_checkpoint(mcore)
    keys = checkpoint.model_tensors()
    model_bytes = sum(math.prod(checkpoint.tensors[k][0]) * checkpoint.tensors[k][1].itemsize for k in keys)
    return best | {"writer_startup_s": writer_startup, "phases": phases, "checkpoint_tensors": len(keys), "checkpoint_bytes": model_bytes}


def hf_bytes(hf_dir: Path) -> tuple[int, int]:
    """(tensors, bytes) of the HF checkpoint's tensors, from the safetensors headers."""
    from safetensors import safe_open

    count = nbytes = 0
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                count += 1
                nbytes += math.prod(part.get_shape()) * SAFETENSORS_DTYPES[part.get_dtype()].itemsize
    return count, nbytes


def machine() -> dict[str, Any]:
    """The CPU, its cores, and the load when the run started (the times are wall-clock)."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--layouts", nargs="+", choices=("TP1", "2-process"), default=["TP1", "2-process"],
                        help="2-process: the Llama at TP2, the MoE at EP2")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    host = machine()
    from tables import run_metadata  # noqa: PLC0415

    meta = run_metadata()  # date, machine and load at the start: docs/benchmarks.md prints them
    with tempfile.TemporaryDirectory() as folder:
        runs = []
        for name in args.models:
            started = time.perf_counter()
            hf_dir, module = make_model(Path(folder), name, args.layers, args.hidden, args.experts)
            print(f"{name}: stand-in and module in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            for which in args.layouts:
                label = "TP1" if which == "TP1" else MODELS[name][2]
                (Path(folder) / f"{name}_{label}").mkdir()
                runs.append((name, hf_dir, module, label))
        for world in (1, 2):
            mine = [r for r in runs if LAYOUTS[r[3]].world_size == world]
            if not mine:
                continue
            tasks = [
                (measure, (str(module), str(hf_dir), LAYOUTS[label], str(Path(folder) / f"{name}_{label}"), args.repeat))
                for name, hf_dir, module, label in mine
            ]
            results = spawn(tasks, world, timeout_s=3600)
            for index, (name, hf_dir, module, label) in enumerate(mine):
                result = results[0][index]
                if isinstance(result, TaskFailed):
                    raise SystemExit(f"{name} {label} failed:\n{result.traceback}")
                tensors, nbytes = hf_bytes(hf_dir)
                row: dict[str, Any] = {"model": name, "layout": label, "processes": world, "hf_tensors": tensors,
                                       "checkpoint_tensors": result["checkpoint_tensors"], "bytes": nbytes,
                                       "checkpoint_bytes": result["checkpoint_bytes"],
                                       "writer_startup_s": round(result["writer_startup_s"], 3)}
                for direction in DIRECTIONS:
                    ours, theirs = result[f"mapgen_{direction}_s"], result[f"baseline_{direction}_s"]
                    row[direction] = {
                        "mapgen_s": round(ours, 4),
                        "mapgen_build_s": round(result[f"mapgen_{direction}_build_s"], 4),
                        "baseline_s": round(theirs, 4),
                        "mapgen_mb_s": round(nbytes / 1e6 / ours, 1),
                        "baseline_mb_s": round(nbytes / 1e6 / theirs, 1),
                        "ratio": round(ours / theirs, 2),
                        "mapgen_phases_s": {k.split("_", 1)[1]: round(v, 4) for k, v in result["phases"].items() if k.startswith(direction)},
                    }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"machine: {host['cpu']}, {host['cores']} cores, load average {host['load_average_1min']} at the start")
    print(f"{'model':<10} {'layout':<6} {'MB':>6} {'direction':<15} {'mapgen s':>9} {'MB/s':>6} "
          f"{'baseline s':>10} {'MB/s':>6} {'ratio':>6} {'build s':>8}")
    for r in rows:
        for direction in DIRECTIONS:
            d = r[direction]
            print(f"{r['model']:<10} {r['layout']:<6} {r['bytes'] / 1e6:>6.1f} {direction:<15} {d['mapgen_s']:>9.3f} "
                  f"{d['mapgen_mb_s']:>6.0f} {d['baseline_s']:>10.3f} {d['baseline_mb_s']:>6.0f} {d['ratio']:>6.2f} "
                  f"{d['mapgen_build_s']:>8.3f}")
    print("ratio: mapgen's time / the baseline's (safetensors + megatron-core dist_checkpointing, the same bytes); "
          "build (the megatron-core model) is not in mapgen's time")
    startup = max((r["writer_startup_s"] for r in rows), default=0.0)
    print(f"megatron-core's torch_dist writer start-up, once per process and in neither time: up to {startup:.1f} s")
    if args.json:
        settings = {"layers": args.layers, "hidden": args.hidden, "experts": args.experts, "repeat": args.repeat}
        args.json.write_text(json.dumps({"meta": meta, "machine": host, "settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
