"""Peak memory of a streamed export (weight sync) against its static bound, on a DeepSeek-V3
stand-in of full depth and full expert count (61 layers, the first 3 dense, 256 routed experts
and a shared one; tiny widths: hidden 64, expert FFN 16), at EP2 (two gloo processes, 128 experts
each), for a few bucket sizes and export formats.

Run: .venv/bin/python benchmarks/export_memory.py [--json out.json] [--buckets 4 16 64] [--layers N --experts E]

Each rank builds the megatron-core model (random weights: what is measured is the export's
memory, not the values), then exports once (cold: the agreement and the plan are made) and again
with the same Converter (held, as an RL loop re-syncs), the consumer dropping each tensor as it
comes. Memory is the process's resident set: its high-water mark (VmHWM, reset through
/proc/self/clear_refs before each export) above the resident set just before the export, which
holds the model. The bound is `Converter.export_bound(...)`: one bucket (at most bucket_bytes)
plus one parameter's temporaries plus the last tensor yielded.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS: dict[str, dict[str, Any]] = {
    "model dtype (fp32)": {},
    "bf16": {"dtype": "bfloat16"},
    "bf16 + FP8 128x128": {"dtype": "bfloat16", "fp8": True},
}


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _live() -> int:
    """Bytes allocated through malloc and not freed, in every arena and mapped chunk (glibc's
    mallinfo2: uordblks + hblkhd): what the process holds, whatever the allocator keeps besides."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class _Sampler:
    """The most live malloc bytes above the start, sampled every 0.2 ms in a thread. A sample is
    the smaller of two readings in a row: mallinfo2 adds up the arenas one after another, so a
    reading taken while one thread frees a buffer and another allocates one may count it twice;
    a buffer that is there in both readings counts (what export holds lives for milliseconds;
    a temporary inside one torch operation may be missed)."""

    def __init__(self) -> None:
        self.start = _live()
        self.peak = self.raw = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.raw = max(self.raw, first := _live() - self.start)
            self.peak = max(self.peak, min(first, _live() - self.start))
            time.sleep(0.0002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _live() - self.start)


def _trim() -> None:
    """Give the memory the allocator keeps after frees back to the system (glibc's malloc_trim),
    so that the resident set before an export is the model and what is live, and pages the
    export reuses count again when it touches them."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(module_path: str, layout: Any, bucket_sizes: list[int], formats: list[str]) -> dict[str, Any]:
    """One rank: every (format, bucket size) export, cold then held, with its bound."""
    import gc

    import torch
    import torch.distributed as dist

    from mapgen.compiler.megatron_model import build_model_chunks, initialize_parallel_state
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.drivers import Converter
    from mapgen.verify.testing import import_module_from_path, prepare_cpu_megatron

    torch.set_num_threads(1)
    started = time.perf_counter()
    module = import_module_from_path(Path(module_path), "export_memory_standin")
    initialize_parallel_state(layout)
    prepare_cpu_megatron()
    chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, model=module.MODEL)
    ctx = ParallelContext.from_parallel_state()
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    setup_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    for label in formats:
        options = FORMATS[label]
        for mib in bucket_sizes:
            converter = Converter(module, chunks, ctx)
            bound = converter.export_bound(bucket_bytes=mib * 2**20, **options)
            row: dict[str, Any] = {"format": label, "bucket_mib": mib, "buckets": bound.buckets,
                                   "bound_mib": round(bound.total / 2**20, 2),
                                   "bound_parts_mib": [round(x / 2**20, 3) for x in (bound.bucket, bound.transient, bound.held)]}
            for phase in ("cold", "held"):
                gc.collect()
                _trim()
                dist.barrier()
                before = _status("VmRSS")
                _reset_peak()
                sampler = _Sampler()
                t = time.perf_counter()
                count = nbytes = 0
                for _name, tensor in converter.export(bucket_bytes=mib * 2**20, **options):
                    count += 1
                    nbytes += tensor.numel() * tensor.element_size()
                seconds = time.perf_counter() - t
                live = sampler.stop()
                peak = _status("VmHWM") - before
                row[f"{phase}_peak_mib"] = round(peak / 2**20, 2)
                row[f"{phase}_live_mib"] = round(live / 2**20, 2)
                row[f"{phase}_live_single_reading_mib"] = round(sampler.raw / 2**20, 2)
                row[f"{phase}_s"] = round(seconds, 2)
                row["tensors"], row["exported_mib"] = count, round(nbytes / 2**20, 1)
            rows.append(row)
            del converter
    return {"rank": dist.get_rank(), "model_mib": round(model_bytes / 2**20, 1), "setup_s": round(setup_s, 1), "rows": rows,
            "params": len(module.PARAMS), "hf_tensors": len(module.HF_TENSORS)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--buckets", type=int, nargs="+", default=[4, 16, 64], help="bucket sizes in MiB")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument(
        "--mmap-threshold", type=int, default=None,
        help="run the ranks with glibc's MALLOC_MMAP_THRESHOLD_ set (bytes): allocations from that size "
        "up are mapped and given back when freed, and the threshold no longer rises",
    )
    args = parser.parse_args()
    if args.mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # the spawned ranks inherit it

    import transformers

    from mapgen.compiler.build import compile_target
    from mapgen.compiler.megatron_model import ParallelLayout
    from mapgen.verify.jobs import spawn
    from mapgen.verify.testing import import_module_from_path

    fields = json.loads((ROOT / "specs/configs/deepseek_v3.json").read_text())
    tiny = {k: v for k, v in fields.items() if k not in ("quantization_config", "auto_map", "torch_dtype")}
    tiny.update(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, vocab_size=128, num_hidden_layers=args.layers,
        n_routed_experts=args.experts, dtype="float32",
    )
    layout = ParallelLayout(ep=2, dp=2)
    with tempfile.TemporaryDirectory() as folder:
        config_dir = Path(folder) / "hf"
        transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny).save_pretrained(config_dir)
        t = time.perf_counter()
        source = compile_target("deepseek_standin", ROOT / "specs/deepseek_v3.yaml", config_dir / "config.json", "local", "bench")
        module_path = Path(folder) / "deepseek_standin.py"
        module_path.write_text(source)
        module = import_module_from_path(module_path, "export_memory_parent")  # compiles the .pyc once
        print(f"module built and imported: {time.perf_counter() - t:.1f} s, {len(module.PARAMS)} parameters, "
              f"{len(module.HF_TENSORS)} HF tensors", flush=True)
        t = time.perf_counter()
        results = spawn([(measure, (str(module_path), layout, args.buckets, args.formats))], layout.world_size, timeout_s=3600)
        print(f"EP2 runs: {time.perf_counter() - t:.1f} s", flush=True)
    per_rank = [results[r][0] for r in sorted(results)]
    print(f"DeepSeek-V3 stand-in, {args.layers} layers x {args.experts} experts, EP2: {per_rank[0]['params']} parameters, "
          f"{per_rank[0]['hf_tensors']} HF tensors; model per rank "
          + ", ".join(f"{r['model_mib']} MiB" for r in per_rank))
    print(f"{'format':<20} {'bucket':>8} {'buckets':>7} {'bound':>9}   {'held: live':>14} {'RSS':>15}   "
          f"{'cold: live':>14} {'RSS':>15} {'held s':>7}")
    for index, row in enumerate(per_rank[0]["rows"]):
        both = [r["rows"][index] for r in per_rank]

        def pair(key: str) -> str:
            return " / ".join(f"{b[key]:.1f}" for b in both)

        print(f"{row['format']:<20} {row['bucket_mib']:>4} MiB {row['buckets']:>7} {row['bound_mib']:>5.1f} MiB   "
              f"{pair('held_live_mib'):>14} {pair('held_peak_mib'):>15}   {pair('cold_live_mib'):>14} "
              f"{pair('cold_peak_mib'):>15} {max(b['held_s'] for b in both):>7.2f}")
    print("(MiB above the start of the export, rank 0 / rank 1: live = bytes allocated and not freed (glibc "
          "mallinfo2, sampled every 0.2 ms); RSS = resident-set high-water mark; "
          f"{per_rank[0]['rows'][0]['exported_mib']} MiB of HF tensors in fp32 per rank per export)")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "experts": args.experts, "layout": "ep2",
                                         "mmap_threshold": args.mmap_threshold,
                                         "machine": os.uname().machine, "ranks": per_rank}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
