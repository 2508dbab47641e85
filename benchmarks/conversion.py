"""Import and export seconds, and collective counts per export, of a many-layer Llama with tiny
tensors (so that per-parameter overhead dominates), at TP1, TP2 and PP2 on CPU/gloo.

Run: .venv/bin/python benchmarks/conversion.py [--layers 64 256] [--json out.json]
Each layout runs in 2 spawned processes (TP1 is then two data-parallel replicas); a time is the
slowest rank's in one repeat, best over --repeat repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mapgen.verify import megatron_cpu, testing  # noqa: E402
from mapgen.compiler.build import compile_target  # noqa: E402
from mapgen.common.parallel import ParallelLayout  # noqa: E402
from mapgen.compiler.parallel_state import initialize_parallel_state  # noqa: E402
from mapgen.compiler.model_classes import build_model_chunks  # noqa: E402
from mapgen.runtime import ParallelContext  # noqa: E402
from mapgen.runtime.drivers import DEFAULT_BUCKET_BYTES, Converter  # noqa: E402
from mapgen.verify.processes import spawn  # noqa: E402

COUNTED = ("all_gather", "broadcast", "all_reduce", "all_gather_object", "broadcast_object_list",
           "all_gather_into_tensor", "scatter", "send", "recv", "barrier")


MAX_REPEATS = 100


def measure(
    module_path: str, hf_dir: str, layout: ParallelLayout, repeat: int, bucket_bytes: int, min_seconds: float = 0.0
) -> dict[str, Any]:
    """mapgen's times, `repeat` times over, or more: as many as span `min_seconds` of wall time
    (at most MAX_REPEATS). A mapgen repeat takes milliseconds where Bridge's takes seconds, and
    this machine has slow spells of a second or more (a process timed inside one runs up to
    twice as slow throughout): repeats spread over as much wall time as Bridge's three give both
    tools the same chance of a quiet moment."""
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # the machine's load (1, 5, 15 min)
    module = testing.import_module_from_path(Path(module_path), f"bench_{Path(module_path).parent.name}")
    initialize_parallel_state(layout)
    megatron_cpu.prepare_cpu_megatron()
    chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32)
    ctx = ParallelContext.from_parallel_state()
    # import: a fresh Converter each time (what load_hf_checkpoint does); export: cold, with a
    # fresh Converter, and held, reusing one Converter as repeated weight syncs would; the held
    # Converter also times the weight-sync modes: export in bf16, and the gather-free export_local.
    # Once everything is built, what is alive is collected and frozen (gc.collect, gc.freeze), so
    # that no call pays for a full collection over the model's building and the libraries' objects
    # but only for its own garbage (bridge_runner.py does the same for Bridge).
    held = Converter(module, chunks, ctx)
    gc.collect()
    gc.freeze()

    def export_all(converter: Converter, **options: Any) -> None:
        for _name, _tensor in converter.export(bucket_bytes=bucket_bytes, **options):
            pass

    def export_local() -> None:
        for _piece in held.export_local():
            pass

    calls = {
        "import_s": lambda: Converter(module, chunks, ctx).load(hf_dir),
        "export_cold_s": lambda: export_all(Converter(module, chunks, ctx)),
        "export_s": lambda: export_all(held),
        "export_bf16_s": lambda: export_all(held, dtype=torch.bfloat16),
        "export_local_s": export_local,
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}  # per repeat
    done = 0
    while done < repeat:
        started_repeat = time.perf_counter()
        for name, call in calls.items():
            dist.barrier()
            started = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - started)
        done += 1
        if done == 1:  # the repeats span at least min_seconds (all ranks agree on how many)
            took = torch.tensor([time.perf_counter() - started_repeat], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            repeat = max(repeat, min(MAX_REPEATS, math.ceil(min_seconds / max(float(took), 1e-6))))
    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in COUNTED}

    def counter(name: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            tensor = args[1] if name == "all_gather" else (args[0] if args else None)
            if isinstance(tensor, torch.Tensor):
                counts["bytes"] = counts.get("bytes", 0) + tensor.numel() * tensor.element_size()
            return originals[name](*args, **kwargs)
        return counted

    for name in COUNTED:
        setattr(dist, name, counter(name))
    try:
        exported = sum(1 for _ in held.export(bucket_bytes=bucket_bytes))
        before = dict(counts)
        local_pieces = sum(1 for _ in held.export_local())
        local_counts = {k: v - before.get(k, 0) for k, v in counts.items() if v != before.get(k, 0)}
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    return {"times": timings, "counts": before, "tensors": exported, "params": len(module.PARAMS),
                      "export_local_counts": local_counts, "local_pieces": local_pieces,
                      "load_at_start": load_at_start}


TIMED = ("import_s", "export_s", "export_cold_s", "export_bf16_s", "export_local_s")


def best(per_rank: list[dict[str, Any]], key: str) -> float:
    """The slowest rank's time in each repeat, best over repeats (as bridge_runner.py takes Bridge's)."""
    repeats = len(per_rank[0]["times"][key])
    return min(max(r["times"][key][repeat] for r in per_rank) for repeat in range(repeats))


def first(per_rank: list[dict[str, Any]], key: str) -> float:
    """The slowest rank's time in the first repeat (for import: nothing of the checkpoint known yet)."""
    return max(r["times"][key][0] for r in per_rank)


def make_moe_model(folder: Path, layers: int, experts: int = 64) -> tuple[Path, Path]:
    """A Qwen3-MoE with tiny tensors (hidden 32, expert FFN 16) and `experts` experts in every
    layer, saved in folder, and its local module (experts as megatron-core's SequentialMLP)."""
    hf_dir = folder / f"qwen3_moe{layers}x{experts}"
    testing.save_tiny_model("qwen3_moe", hf_dir, num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                            moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=experts, num_experts_per_tok=4)
    module = hf_dir / "mapping.py"
    module.write_text(compile_target("mapping", ROOT / "specs/qwen3_moe.yaml", hf_dir / "config.json", "local", "bench"))
    return hf_dir, module


def make_model(folder: Path, layers: int) -> tuple[Path, Path]:
    """A many-layer Llama with tiny tensors (hidden 32) saved in folder, and its local module."""
    hf_dir = folder / f"llama{layers}"
    testing.save_tiny_model("llama", hf_dir, num_hidden_layers=layers, hidden_size=32,
                            intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    module = hf_dir / "mapping.py"
    module.write_text(compile_target("mapping", ROOT / "specs/llama.yaml", hf_dir / "config.json", "local", "bench"))
    return hf_dir, module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    layouts = {"TP1": ParallelLayout(dp=2), "TP2": ParallelLayout(tp=2), "PP2": ParallelLayout(pp=2)}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tasks = []
        labels = []
        for layers in args.layers:
            hf_dir, module = make_model(Path(folder), layers)
            for name, layout in layouts.items():
                for bucket_bytes, bucket_name in ((DEFAULT_BUCKET_BYTES, "256MiB"), (1, "per-tensor")):
                    tasks.append((measure, (str(module), str(hf_dir), layout, args.repeat, bucket_bytes)))
                    labels.append((layers, name, bucket_name))
        results = spawn(tasks, 2)
    for index, (layers, name, bucket_name) in enumerate(labels):
        per_rank = [results[rank][index] for rank in sorted(results)]
        rows.append({
            "layers": layers,
            "layout": name,
            "buckets": bucket_name,
            "params": per_rank[0]["params"],
            **{key: round(best(per_rank, key), 4) for key in TIMED},
            "export_collectives_rank0": per_rank[0]["counts"],
            "export_local_collectives": [r["export_local_counts"] for r in per_rank],
        })
    print(f"{'layers':>6} {'params':>6} {'layout':<6} {'buckets':<10} {'import s':>9} {'export s':>9}  export collectives (rank 0)")
    for r in rows:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["export_collectives_rank0"].items()))
        print(f"{r['layers']:>6} {r['params']:>6} {r['layout']:<6} {r['buckets']:<10} {r['import_s']:>9.4f} {r['export_s']:>9.4f}  {counts}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
