"""Peak memory of a streamed export (weight sync) against its static bound, on a DeepSeek-V3
stand-in of full depth and full expert count (61 layers, the first 3 dense, 256 routed experts
and a shared one; tiny widths: hidden 64, expert FFN 16), at EP2 (two gloo processes, 128 experts
each), for a few bucket sizes and export formats.

Run: .venv/bin/python benchmarks/export_memory.py [--json out.json] [--buckets 4 16 64] [--formats ...] [--layers N --experts E]

For each format and bucket size, a fresh pair of processes builds the megatron-core model (random
weights: what is measured is the export's memory, not the values), then exports once (cold: the
agreement and the plan are made) and again with the same Converter (held, as an RL loop
re-syncs), the consumer dropping each tensor as it comes. Two figures:

- live: the bytes allocated through malloc and not yet freed, in every arena (glibc's mallinfo2,
  sampled every 0.2 ms; see `_Sampler`), above their value at the start of the export: what the
  export holds;
- RSS: the resident set's high-water mark over both exports (VmHWM, reset through
  /proc/self/clear_refs once the model is built) above the resident set with the model built:
  what the machine sees, including what glibc keeps of what was freed.

The bound is `Converter.export_bound(...)`: one bucket (at most bucket_bytes) plus one
parameter's temporaries plus the last tensor yielded.
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


def measure(module_path: str, layout: Any, label: str, mib: int) -> dict[str, Any]:
    """One rank of a fresh pair of processes: the model built, then one format and bucket size
    exported twice (cold, then held) with its bound."""
    import gc

    import torch
    import torch.distributed as dist

    from mapgen.compiler.parallel_state import initialize_parallel_state
    from mapgen.compiler.model_classes import build_model_chunks
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.drivers import Converter
    from mapgen.verify.megatron_cpu import prepare_cpu_megatron
    from mapgen.verify.testing import import_module_from_path

    torch.set_num_threads(1)
    module = import_module_from_path(Path(module_path), "export_memory_standin")
    initialize_parallel_state(layout)
    prepare_cpu_megatron()
    chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, model=module.MODEL)
    ctx = ParallelContext.from_parallel_state()
    options = FORMATS[label]
    converter = Converter(module, chunks, ctx)
    bound = converter.export_bound(bucket_bytes=mib * 2**20, **options)
    row: dict[str, Any] = {
        "format": label, "bucket_mib": mib, "buckets": bound.buckets, "bound_mib": round(bound.total / 2**20, 2),
        "bound_parts_mib": [round(x / 2**20, 3) for x in (bound.bucket, bound.transient, bound.held)],
        "model_mib": round(sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()) / 2**20, 1),
        "params": len(module.PARAMS), "hf_tensors": len(module.HF_TENSORS),
    }
    gc.collect()
    dist.barrier()
    model_rss = _status("VmRSS")  # the process with its model built: the baseline of both exports
    _reset_peak()
    for phase in ("cold", "held"):
        gc.collect()
        dist.barrier()
        sampler = _Sampler()
        t = time.perf_counter()
        count = nbytes = 0
        for _name, tensor in converter.export(bucket_bytes=mib * 2**20, **options):
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
        row[f"{phase}_s"] = round(time.perf_counter() - t, 2)
        row[f"{phase}_live_mib"] = round(sampler.stop() / 2**20, 2)
        row[f"{phase}_live_single_reading_mib"] = round(sampler.raw / 2**20, 2)
        row[f"{phase}_rss_mib"] = round((_status("VmHWM") - model_rss) / 2**20, 2)  # since the model was built
        row["tensors"], row["exported_mib"] = count, round(nbytes / 2**20, 1)
    row["rank"] = dist.get_rank()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--buckets", type=int, nargs="+", default=[4, 16, 64], help="bucket sizes in MiB")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args()
    from tables import run_metadata  # noqa: PLC0415

    meta = run_metadata()  # date, machine and load at the start: docs/benchmarks.md prints them

    import transformers

    from mapgen.compiler.build import compile_target
    from mapgen.common.parallel import ParallelLayout
    from mapgen.verify.processes import spawn
    from mapgen.verify.testing import import_module_from_path

    fields = json.loads((ROOT / "specs/configs/deepseek_v3.json").read_text())
    tiny = {k: v for k, v in fields.items() if k not in ("quantization_config", "auto_map", "torch_dtype")}
    tiny.update(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, vocab_size=128, num_hidden_layers=args.layers,
        n_routed_experts=args.experts, dtype="float32",
        num_nextn_predict_layers=0,  # the main model only, as these figures were first measured
    )
    layout = ParallelLayout(ep=2, dp=2)
    rows: list[list[dict[str, Any]]] = []
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
        for label in args.formats:
            for mib in args.buckets:  # fresh processes for each: the model's memory is the baseline
                results = spawn([(measure, (str(module_path), layout, label, mib))], layout.world_size, timeout_s=3600)
                rows.append([results[r][0] for r in sorted(results)])
        print(f"EP2 runs ({len(rows)} pairs of processes): {time.perf_counter() - t:.1f} s", flush=True)
    first = rows[0][0]
    print(f"DeepSeek-V3 stand-in, {args.layers} layers x {args.experts} experts, EP2: {first['params']} parameters, "
          f"{first['hf_tensors']} HF tensors, {first['exported_mib']} MiB in fp32; {first['model_mib']} MiB of weights per rank")
    print(f"{'format':<20} {'bucket':>8} {'buckets':>7} {'bound':>9}   {'held: live':>14}   {'cold: live':>14}   "
          f"{'RSS above model':>15} {'held s':>7}")
    for both in rows:
        row = both[0]

        def pair(key: str) -> str:
            return " / ".join(f"{b[key]:.1f}" for b in both)

        print(f"{row['format']:<20} {row['bucket_mib']:>4} MiB {row['buckets']:>7} {row['bound_mib']:>5.1f} MiB   "
              f"{pair('held_live_mib'):>14}   {pair('cold_live_mib'):>14}   {pair('held_rss_mib'):>15} "
              f"{max(b['held_s'] for b in both):>7.2f}")
    print("(MiB, rank 0 / rank 1: live = bytes allocated and not freed above the start of the export (glibc mallinfo2, "
          "sampled every 0.2 ms); RSS = the resident set's high-water mark over both exports above the resident set "
          "with the model built)")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "layers": args.layers, "experts": args.experts, "layout": "ep2",
                                         "machine": os.uname().machine, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
