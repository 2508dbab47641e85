"""`make bench`: mapgen against Megatron-Bridge (the dynamic peer) and against the hardware, in
one run, on the same checkpoints, with the same process layouts.

    .venv/bin/python benchmarks/run.py [--layers 64 256] [--repeat 3] [--json benchmarks/results.json]

Needs .venv-bench (bash benchmarks/bridge_setup.sh) for Megatron-Bridge 0.3.1. For each model
(a Llama with tiny tensors, so per-parameter overhead dominates) and each layout (TP1: 1 process,
TP2 and PP2: 2 gloo processes), both tools import the same safetensors checkpoint into a
megatron-core model built with the local layer spec and export it back; a time is the slowest
rank's, best of --repeat. Both verify their export against the checkpoint's bytes. Then the
bandwidth benchmark (benchmarks/bandwidth.py) and mapgen's collective counts per export.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conversion import make_model, measure  # noqa: E402

from mapgen.compiler.megatron_model import ParallelLayout  # noqa: E402
from mapgen.runtime.drivers import DEFAULT_BUCKET_BYTES  # noqa: E402
from mapgen.verify.jobs import spawn  # noqa: E402

LAYOUTS = {"TP1": ParallelLayout(), "TP2": ParallelLayout(tp=2), "PP2": ParallelLayout(pp=2)}
BRIDGE_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import os

    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def bridge(hf_dir: Path, layout: ParallelLayout, repeat: int) -> dict[str, Any]:
    result = subprocess.run(
        [str(BRIDGE_PYTHON), str(ROOT / "benchmarks" / "bridge_runner.py"), str(hf_dir),
         "--tp", str(layout.tp), "--pp", str(layout.pp), "--repeat", str(repeat)],
        capture_output=True, text=True, timeout=3600,
    )
    if result.returncode != 0:
        raise SystemExit(f"bridge_runner failed:\n{result.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def ours(module: Path, hf_dir: Path, layout: ParallelLayout, repeat: int) -> dict[str, Any]:
    per_rank = spawn([(measure, (str(module), str(hf_dir), layout, repeat, DEFAULT_BUCKET_BYTES))], layout.world_size)
    results = [per_rank[rank][0] for rank in sorted(per_rank)]
    return {
        "import_s": max(r["import_s"] for r in results),
        "export_s": max(r["export_s"] for r in results),
        "export_cold_s": max(r["export_cold_s"] for r in results),
        "collectives": results[0]["counts"],
        "tensors": results[0]["tensors"],
        "params": results[0]["params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
    if not BRIDGE_PYTHON.exists():
        raise SystemExit("run `bash benchmarks/bridge_setup.sh` first (make bench does)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for layers in args.layers:
            hf_dir, module = make_model(Path(folder), layers)
            for name, layout in LAYOUTS.items():
                mine = ours(module, hf_dir, layout, args.repeat)
                theirs = bridge(hf_dir, layout, args.repeat)
                rows.append({
                    "layers": layers,
                    "megatron_params": mine["params"],
                    "layout": name,
                    "mapgen_import_s": round(mine["import_s"], 4),
                    "bridge_import_s": theirs["import_s"],
                    "import_speedup": round(theirs["import_s"] / mine["import_s"], 1),
                    "mapgen_export_s": round(mine["export_s"], 4),
                    "bridge_export_s": theirs["export_s"],
                    "export_speedup": round(theirs["export_s"] / mine["export_s"], 1),
                    "mapgen_export_cold_s": round(mine["export_cold_s"], 4),
                    "export_cold_speedup": round(theirs["export_s"] / mine["export_cold_s"], 1),
                    "bridge_mismatched": theirs["mismatched"],
                    "mapgen_export_collectives": mine["collectives"],
                    "tensors_per_export": mine["tensors"],
                })
                print(json.dumps(rows[-1]), file=sys.stderr)
    bandwidth_json = Path(tempfile.mkstemp(suffix=".json")[1])
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bandwidth.py"), "--json", str(bandwidth_json)],
                   check=True, capture_output=True, text=True)
    hardware = json.loads(bandwidth_json.read_text())

    print(f"machine: {machine()}")
    print("export: mapgen with a held Converter (repeated syncs) / cold (a fresh one) / bridge")
    print(f"{'layers':>6} {'params':>6} {'layout':<6} {'import s mapgen/bridge':>24} {'x':>6} "
          f"{'export s held/cold/bridge':>30} {'x held':>7} {'x cold':>7}")
    for r in rows:
        print(f"{r['layers']:>6} {r['megatron_params']:>6} {r['layout']:<6} "
              f"{r['mapgen_import_s']:>11.4f}/{r['bridge_import_s']:<12.4f} {r['import_speedup']:>6.1f} "
              f"{r['mapgen_export_s']:>9.4f}/{r['mapgen_export_cold_s']:.4f}/{r['bridge_export_s']:<10.4f} "
              f"{r['export_speedup']:>7.1f} {r['export_cold_speedup']:>7.1f}")
    growth = []
    for name in LAYOUTS:
        small, large = (next(r for r in rows if r["layout"] == name and r["layers"] == n) for n in (min(args.layers), max(args.layers)))
        growth.append({
            "layout": name,
            "params_ratio": round(large["megatron_params"] / small["megatron_params"], 2),
            "mapgen_import": round(large["mapgen_import_s"] / small["mapgen_import_s"], 2),
            "bridge_import": round(large["bridge_import_s"] / small["bridge_import_s"], 2),
            "mapgen_export": round(large["mapgen_export_s"] / small["mapgen_export_s"], 2),
            "bridge_export": round(large["bridge_export_s"] / small["bridge_export_s"], 2),
        })
    print(f"growth {min(args.layers)} -> {max(args.layers)} layers (time ratio; parameter ratio {growth[0]['params_ratio']}):")
    for g in growth:
        print(f"  {g['layout']}: import mapgen {g['mapgen_import']}x, bridge {g['bridge_import']}x; "
              f"export mapgen {g['mapgen_export']}x, bridge {g['bridge_export']}x")
    print(f"hardware ({hardware['gb']} GB fp32, one process): copy {hardware['copy_gb_s']} GB/s, "
          f"import {hardware['import_gb_s']} GB/s ({hardware['import_vs_copy']:.0%} of copy), "
          f"export {hardware['export_gb_s']} GB/s ({hardware['export_vs_copy']:.0%} of copy)")
    for r in rows:
        if r["layout"] != "TP1":
            counts = ", ".join(f"{k} {v}" for k, v in sorted(r["mapgen_export_collectives"].items()))
            print(f"collectives per export, {r['layers']} layers {r['layout']} (rank 0; one call per tensor would be "
                  f"{r['tensors_per_export']}): {counts}")
    args.json.write_text(json.dumps({"machine": machine(), "conversion": rows, "growth": growth, "hardware": hardware}, indent=2) + "\n")


if __name__ == "__main__":
    main()
