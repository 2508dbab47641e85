"""`make bench`: mapgen against Megatron-Bridge 0.3.1 and 0.6.2 (the dynamic peers) and against the
hardware, in one run, on the same checkpoints, with the same process layouts.

    .venv/bin/python benchmarks/run.py [--layers 64 256] [--moe-layers 4 16] [--experts 64] [--repeat 3]
                                       [--bridges 0.3.1 0.6.2] [--json benchmarks/results.json]

Needs .venv-bench (Bridge 0.3.1) and .venv-bench062 (Bridge 0.6.2): `bash benchmarks/bridge_setup.sh`
(make bench runs it). Models: a Llama with tiny tensors (hidden 32, so per-parameter overhead
dominates) at each of --layers, at TP1 (1 process), TP2 and PP2 (2 gloo processes); and a Qwen3-MoE
with tiny tensors and --experts experts in every layer at each of --moe-layers, at EP2 (2 gloo
processes, half the experts each). For each layout, mapgen, then each Bridge release, import
the same safetensors checkpoints into a megatron-core model built with the local layer spec and
export them back; a time is the slowest rank's in one repeat, best over the repeats: Bridge's
--repeat of them, mapgen's as many as span --min-seconds of wall time (at least --repeat; a mapgen
repeat takes milliseconds, Bridge's seconds, and the machine has slow spells of a second or more,
so both tools' repeats span comparable time). Every Bridge export is checked
against the checkpoint's bytes (and, at EP2, every rank's imported experts). mapgen (public API,
`Converter`): import with a fresh Converter; export with a held Converter (repeated weight syncs),
with a fresh one (cold), in bf16 (held), and gather-free (`export_local`, held); the first import
of each checkpoint (first repeat) is reported beside the best. Before the first timed call each tool's
process collects and freezes what it has built (gc.freeze), so a call pays for collecting its own
garbage only, not for a full collection over the model and the libraries. The machine's
load average is recorded at the start of each case of each tool (`load_at_start`). Results are
written after each layout, so a run cut short keeps what it measured. Then the bandwidth
benchmark (benchmarks/bandwidth.py) and mapgen's collective counts per export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conversion import TIMED, best, first, make_model, make_moe_model, measure  # noqa: E402

from mapgen.common.parallel import ParallelLayout  # noqa: E402
from mapgen.runtime.drivers import DEFAULT_BUCKET_BYTES  # noqa: E402
from mapgen.verify.processes import spawn  # noqa: E402

LAYOUTS = {"TP1": ParallelLayout(), "TP2": ParallelLayout(tp=2), "PP2": ParallelLayout(pp=2)}
MOE_LAYOUTS = {"EP2": ParallelLayout(ep=2, dp=2)}
BRIDGES = {"0.3.1": ROOT / ".venv-bench" / "bin" / "python", "0.6.2": ROOT / ".venv-bench062" / "bin" / "python"}

# issue 13's targets against Bridge 0.6.2 (times faster), and gather-free against gathered
TARGETS = {"import": 100.0, "export TP1/TP2": 20.0, "export PP2": 100.0, "export EP2": 20.0, "gather-free TP2": 5.0}


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def bridge(python: Path, hf_dirs: list[Path], layout: ParallelLayout, repeat: int) -> list[dict[str, Any]]:
    """One run of bridge_runner.py in `python`'s venv over `hf_dirs` (one set of processes)."""
    result = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / "bridge_runner.py"), *map(str, hf_dirs),
         "--tp", str(layout.tp), "--pp", str(layout.pp), "--ep", str(layout.ep), "--repeat", str(repeat),
         "--timeout", "7200"],
        capture_output=True, text=True, timeout=7500,
    )
    if result.returncode != 0:
        raise SystemExit(f"bridge_runner ({python}) failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    if len(rows) != len(hf_dirs):
        raise SystemExit(f"bridge_runner ({python}) gave {len(rows)} results for {len(hf_dirs)} checkpoints")
    return rows


def ours(cases: list[tuple[Path, Path]], layout: ParallelLayout, repeat: int, min_seconds: float) -> list[dict[str, Any]]:
    """mapgen on each (module, checkpoint), one after another in one set of processes."""
    tasks = [(measure, (str(module), str(hf_dir), layout, repeat, DEFAULT_BUCKET_BYTES, min_seconds))
             for hf_dir, module in cases]
    per_rank = spawn(tasks, layout.world_size, timeout_s=7200)
    rows = []
    for index in range(len(cases)):
        results = [per_rank[rank][index] for rank in sorted(per_rank)]
        rows.append({
            **{key: best(results, key) for key in TIMED},
            "import_first_s": first(results, "import_s"),
            "collectives": results[0]["counts"],
            "export_local_collectives": {k: v for r in results for k, v in r["export_local_counts"].items()},
            "tensors": results[0]["tensors"],
            "params": results[0]["params"],
            "load_at_start": results[0]["load_at_start"],
            "repeats": len(results[0]["times"]["import_s"]),
        })
    return rows


def ratio(slow: float | None, fast: float) -> float | None:
    return None if slow is None else round(slow / fast, 1)


def row_for(model: str, layers: int, experts: int | None, name: str, mine: dict[str, Any],
            theirs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": model, "layers": layers, "experts": experts, "megatron_params": mine["params"], "layout": name,
        "load_at_start": {"mapgen": mine["load_at_start"]} | {rel: b["load_at_start"] for rel, b in theirs.items()},
        "mapgen": {key: round(mine[key], 4) for key in (*TIMED, "import_first_s")},
        "gather_free_speedup": round(mine["export_s"] / mine["export_local_s"], 1),
        "mapgen_export_collectives": mine["collectives"],
        "mapgen_export_local_collectives": mine["export_local_collectives"],
        "tensors_per_export": mine["tensors"],
        "mapgen_repeats": mine.get("repeats"),
        "bridge": theirs,
        "speedup": {},
    }
    for release, b in theirs.items():
        row["speedup"][release] = {
            "import": ratio(b["import_s"], mine["import_s"]),
            "import_first": ratio(b.get("import_first_s"), mine["import_first_s"]),
            "export_held": ratio(b["export_s"], mine["export_s"]),
            "export_cold": ratio(b["export_s"], mine["export_cold_s"]),
            # both sides' plans made once: Bridge's conversion tasks passed in, a held Converter
            "export_held_vs_bridge_held_tasks": ratio(b["export_held_s"], mine["export_s"]),
            "export_bf16": ratio(b.get("export_bf16_s"), mine["export_bf16_s"]),
        }
    return row


def fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def report(rows: list[dict[str, Any]], releases: list[str], hardware: dict[str, Any] | None) -> list[str]:
    out = [f"machine: {machine()}"]
    versions = {rel: next((r["bridge"][rel] for r in rows if rel in r["bridge"]), {}) for rel in releases}
    for rel, v in versions.items():
        if v:
            out.append(f"Bridge {rel}: Python {v['python']}, torch {v['torch']}, megatron-core {v['megatron_core']}, "
                       f"transformers {v['transformers']}")
    repeats = sorted({r["mapgen_repeats"] for r in rows if r.get("mapgen_repeats")})
    bridge_repeats = sorted({r["bridge_repeats"] for r in rows if r.get("bridge_repeats")})
    out.append(f"repeats: Bridge {', '.join(map(str, bridge_repeats))}; mapgen as many as span --min-seconds, at least "
               f"--repeat ({', '.join(map(str, repeats))} per case)")
    out.append("times in s, best of the repeats, slowest rank; x = Bridge's time / mapgen's. mapgen export: held "
               "Converter / fresh (cold); Bridge export: export_hf_weights as called")
    head = f"{'model':<14} {'params':>6} {'layout':<6} {'import mapgen':>13}"
    for rel in releases:
        head += f" {'Bridge ' + rel:>13} {'x':>6}"
    head += f" {'export held/cold':>17}"
    for rel in releases:
        head += f" {'Bridge ' + rel:>13} {'x held':>7} {'x cold':>7}"
    out.append(head)
    for r in rows:
        label = f"{r['model']}{r['layers']}" + (f"x{r['experts']}" if r["experts"] else "")
        m = r["mapgen"]
        line = f"{label:<14} {r['megatron_params']:>6} {r['layout']:<6} {m['import_s']:>13.4f}"
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            line += f" {fmt(b.get('import_s'), 13, 4)} {fmt(s.get('import'), 6)}"
        line += f" {m['export_s']:>8.4f}/{m['export_cold_s']:<8.4f}"
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            line += f" {fmt(b.get('export_s'), 13, 4)} {fmt(s.get('export_held'), 7)} {fmt(s.get('export_cold'), 7)}"
        out.append(line)
    out.append("")
    out.append("weight-sync modes (held Converter): gather-free export_local vs mapgen's gathered export; bf16 export vs "
               "Bridge 0.6.2's weight_dtype=bf16; mapgen held vs Bridge with its conversion tasks made once")
    out.append(f"{'model':<14} {'layout':<6} {'gathered':>9} {'local':>9} {'x':>6} {'local collectives':>18} "
               f"{'bf16':>9} {'Bridge bf16':>11} {'x':>6}" + "".join(f" {'Br ' + rel + ' tasks':>14} {'x':>6}" for rel in releases))
    for r in rows:
        label = f"{r['model']}{r['layers']}" + (f"x{r['experts']}" if r["experts"] else "")
        m = r["mapgen"]
        local = sum(v for k, v in r["mapgen_export_local_collectives"].items() if k != "bytes")
        b062, s062 = r["bridge"].get("0.6.2", {}), r["speedup"].get("0.6.2", {})
        line = (f"{label:<14} {r['layout']:<6} {m['export_s']:>9.4f} {m['export_local_s']:>9.4f} "
                f"{r['gather_free_speedup']:>6.1f} {local:>18} {m['export_bf16_s']:>9.4f} "
                f"{fmt(b062.get('export_bf16_s'), 11, 4)} {fmt(s062.get('export_bf16'), 6)}")
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            line += f" {fmt(b.get('export_held_s'), 14, 4)} {fmt(s.get('export_held_vs_bridge_held_tasks'), 6)}"
        out.append(line)
    out.append("")
    out.append("first import of the checkpoint in the process (the first repeat: mapgen has parsed nothing of it yet; "
               "the table above takes the best repeat)")
    for r in rows:
        label = f"{r['model']}{r['layers']}" + (f"x{r['experts']}" if r["experts"] else "")
        line = f"  {label:<14} {r['layout']:<6} mapgen {r['mapgen']['import_first_s']:.4f}"
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            line += f"; Bridge {rel} {fmt(b.get('import_first_s'), 0, 4).strip()} ({fmt(s.get('import_first'), 0).strip()}x)"
        out.append(line)
    out.append("")
    for r in rows:
        for rel, b in r["bridge"].items():
            notes = []
            if b.get("mismatched"):
                notes.append(f"{b['mismatched']} exported tensors differ from the checkpoint {b.get('mismatched_per_export')}")
            if b.get("import_expert_mismatched"):
                notes.append(f"{b['import_expert_mismatched']} imported expert weights differ from the checkpoint")
            if b.get("export_error"):
                notes.append(f"export failed: {b['export_error']}")
            if notes:
                out.append(f"Bridge {rel}, {r['model']}{r['layers']} {r['layout']}: " + "; ".join(notes))
    out.extend(growth_lines(rows, releases))
    out.extend(target_lines(rows))
    out.append("load average (1, 5, 15 min) at the start of each case: " + "; ".join(
        f"{r['model']}{r['layers']} {r['layout']} " + ", ".join(f"{k} {v[0]}" for k, v in r["load_at_start"].items())
        for r in rows))
    if hardware:
        out.append(f"hardware ({hardware['gb']} GB fp32, one process): copy {hardware['copy_gb_s']} GB/s, "
                   f"import {hardware['import_gb_s']} GB/s ({hardware['import_vs_copy']:.0%} of copy), "
                   f"export {hardware['export_gb_s']} GB/s ({hardware['export_vs_copy']:.0%} of copy)")
    for r in rows:
        if r["layout"] != "TP1":
            counts = ", ".join(f"{k} {v}" for k, v in sorted(r["mapgen_export_collectives"].items()))
            out.append(f"collectives per export, {r['model']}{r['layers']} {r['layout']} (rank 0; one call per tensor "
                       f"would be {r['tensors_per_export']}): {counts}")
    return out


def growth(rows: list[dict[str, Any]], releases: list[str]) -> list[dict[str, Any]]:
    found = []
    for model in sorted({r["model"] for r in rows}):
        for name in sorted({r["layout"] for r in rows if r["model"] == model}):
            same = sorted((r for r in rows if r["model"] == model and r["layout"] == name), key=lambda r: r["layers"])
            if len(same) < 2:
                continue
            small, large = same[0], same[-1]
            g: dict[str, Any] = {
                "model": model, "layout": name, "layers": [small["layers"], large["layers"]],
                "params_ratio": round(large["megatron_params"] / small["megatron_params"], 2),
            }
            for key in ("import_s", "export_s", "export_cold_s", "export_local_s"):
                g[f"mapgen_{key}"] = round(large["mapgen"][key] / small["mapgen"][key], 2)
            for rel in releases:
                for key in ("import_s", "export_s"):
                    a, b = small["bridge"].get(rel, {}).get(key), large["bridge"].get(rel, {}).get(key)
                    g[f"bridge_{rel}_{key}"] = round(b / a, 2) if a and b else None
            found.append(g)
    return found


def growth_lines(rows: list[dict[str, Any]], releases: list[str]) -> list[str]:
    out = []
    for g in growth(rows, releases):
        line = (f"growth {g['model']} {g['layout']} {g['layers'][0]} -> {g['layers'][1]} layers (time ratio; "
                f"parameter ratio {g['params_ratio']}): mapgen import {g['mapgen_import_s']}x, export held "
                f"{g['mapgen_export_s']}x, cold {g['mapgen_export_cold_s']}x, local {g['mapgen_export_local_s']}x")
        for rel in releases:
            imp, exp = (g[f"bridge_{rel}_{key}"] for key in ("import_s", "export_s"))
            line += f"; Bridge {rel} import {'-' if imp is None else f'{imp}x'}, export {'-' if exp is None else f'{exp}x'}"
        out.append(line)
    return out


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Every ratio issue 13 sets a target for, against Bridge 0.6.2, met or not."""
    out = ["targets (issue 13, against Bridge 0.6.2):"]

    def check(label: str, value: float | None, target: float) -> None:
        verdict = "n/a" if value is None else ("met" if value >= target else "NOT met")
        out.append(f"  {label}: {'-' if value is None else value}x (target >= {target:g}x) {verdict}")

    for r in rows:
        s = r["speedup"].get("0.6.2")
        where = f"{r['model']}{r['layers']} {r['layout']}"
        if s is None:
            continue
        if r["model"] == "llama":
            check(f"import {where}", s["import"], TARGETS["import"])
            key = "export PP2" if r["layout"] == "PP2" else "export TP1/TP2"
            check(f"export held {where}", s["export_held"], TARGETS[key])
            check(f"export cold {where}", s["export_cold"], TARGETS[key])
            if r["layout"] == "TP2":
                check(f"gather-free vs gathered {where}", r["gather_free_speedup"], TARGETS["gather-free TP2"])
        else:
            check(f"export held {where}", s["export_held"], TARGETS["export EP2"])
            check(f"export cold {where}", s["export_cold"], TARGETS["export EP2"])
    for g in growth(rows, ["0.6.2"]):
        if g["model"] == "llama":
            worst = max(g["mapgen_import_s"], g["mapgen_export_s"], g["mapgen_export_cold_s"])
            out.append(f"  linear growth {g['layout']}: mapgen's worst time ratio {worst}x for {g['params_ratio']}x "
                       f"the parameters {'met' if worst <= g['params_ratio'] else 'NOT met'} (at most linear)")
    return out


def growth_profile(layer_counts: list[int], calls: int = 400) -> list[str]:
    """TP1, one process: the held export's CPU time (process_time, immune to the scheduler) at each
    depth, beside torch alone cloning every parameter of the same model, and each function's
    share under cProfile (CPU-time timer). Says whether a superlinear growth is mapgen's (its
    functions' time grows faster than their calls) or torch's per-byte cost (the torch-only
    baseline grows as much)."""
    import cProfile  # noqa: PLC0415
    import gc  # noqa: PLC0415
    import pstats  # noqa: PLC0415
    import statistics  # noqa: PLC0415
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from mapgen.compiler.parallel_state import ensure_single_process_parallel_state  # noqa: PLC0415
    from mapgen.compiler.model_classes import build_model_chunks  # noqa: PLC0415
    from mapgen.runtime.drivers import Converter  # noqa: PLC0415
    from mapgen.verify import megatron_cpu, testing  # noqa: PLC0415

    torch.set_num_threads(1)
    ensure_single_process_parallel_state()
    megatron_cpu.prepare_cpu_megatron()
    found: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for layers in layer_counts:
            hf_dir, module_path = make_model(Path(folder), layers)
            module = testing.import_module_from_path(module_path, f"growth{layers}")
            chunks = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=torch.float32)
            Converter(module, chunks).load(hf_dir)
            held = Converter(module, chunks)
            params = [p for chunk in chunks for p in chunk.parameters()]

            def export() -> None:
                for _ in held.export():
                    pass

            def clone_all() -> None:
                for p in params:
                    p.detach().clone()

            export()
            gc.collect()
            gc.freeze()
            row: dict[str, Any] = {"bytes": sum(p.numel() * p.element_size() for p in params)}
            for name, call in (("export", export), ("clone", clone_all)):
                cpu = []
                for _ in range(calls):
                    started = time.process_time()
                    call()
                    cpu.append(time.process_time() - started)
                row[name] = statistics.median(cpu)
            profiler = cProfile.Profile(time.process_time)
            for _ in range(calls // 2):
                profiler.enable()
                export()
                profiler.disable()
            stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            row["functions"] = {f"{Path(f).name}:{line}({fn})": (own, n) for (f, line, fn), (_c, n, own, _cum, _) in stats.items()}
            found[layers] = row
            gc.unfreeze()
    small, large = found[layer_counts[0]], found[layer_counts[-1]]
    out = [f"growth profile, TP1, {layer_counts[0]} -> {layer_counts[-1]} layers ({small['bytes']} -> {large['bytes']} bytes), "
           f"median CPU time of {calls} calls:",
           f"  mapgen held export {small['export'] * 1e3:.3f} -> {large['export'] * 1e3:.3f} ms "
           f"({large['export'] / small['export']:.2f}x)",
           f"  torch alone, clone every parameter {small['clone'] * 1e3:.3f} -> {large['clone'] * 1e3:.3f} ms "
           f"({large['clone'] / small['clone']:.2f}x)",
           "  under cProfile, each function's own CPU time and its calls (ratio large / small):"]
    top = sorted(large["functions"], key=lambda f: -large["functions"][f][0])[:10]
    for function in top:
        a, b = small["functions"].get(function, (0.0, 0)), large["functions"][function]
        time_ratio = f"{b[0] / a[0]:.2f}x" if a[0] else "-"
        call_ratio = f"{b[1] / a[1]:.2f}x" if a[1] else "-"
        out.append(f"    {function[:70]:<70} time {time_ratio:>7} calls {call_ratio:>7}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--moe-layers", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=6.0,
                        help="mapgen repeats at least this long per case (more repeats than --repeat where fast)")
    parser.add_argument("--bridges", nargs="+", default=list(BRIDGES), choices=list(BRIDGES))
    parser.add_argument("--layouts", nargs="+", default=[*LAYOUTS, *MOE_LAYOUTS], choices=[*LAYOUTS, *MOE_LAYOUTS])
    parser.add_argument("--no-hardware", action="store_true", help="skip the bandwidth benchmark")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--txt", type=Path, help="also write the printed report here (after each layout too)")
    parser.add_argument("--growth-profile", action="store_true",
                        help="only profile the TP1 export's growth over --layers in CPU time (no Bridge) and print it")
    args = parser.parse_args()
    if args.growth_profile:
        print("\n".join(growth_profile(args.layers)))
        return
    for release in args.bridges:
        if not BRIDGES[release].exists():
            raise SystemExit(f"no venv for Bridge {release}: run `bash benchmarks/bridge_setup.sh` first (make bench does)")
    rows: list[dict[str, Any]] = []
    from tables import run_metadata  # noqa: PLC0415

    meta = run_metadata()  # date, machine and load at the start: docs/benchmarks.md prints them

    def write(hardware: dict[str, Any] | None, final: bool) -> None:
        lines = report(rows, args.bridges, hardware)
        args.json.write_text(json.dumps({"meta": meta, "machine": machine(), "complete": final, "conversion": rows,
                                         "growth": growth(rows, args.bridges), "hardware": hardware}, indent=2) + "\n")
        if args.txt:
            args.txt.write_text("\n".join(lines) + "\n")
        if final:
            print("\n".join(lines))

    with tempfile.TemporaryDirectory() as folder:
        dense = [make_model(Path(folder), layers) for layers in args.layers]
        moe = [make_moe_model(Path(folder), layers, args.experts) for layers in args.moe_layers]
        plan = {name: ("llama", args.layers, None, dense, layout) for name, layout in LAYOUTS.items()}
        plan |= {name: ("qwen3_moe", args.moe_layers, args.experts, moe, layout) for name, layout in MOE_LAYOUTS.items()}
        for name in args.layouts:  # in the order given
            model, layer_counts, experts, cases, layout = plan[name]
            if not cases:
                continue
            mine = ours(cases, layout, args.repeat, args.min_seconds)
            theirs = {rel: bridge(BRIDGES[rel], [hf for hf, _ in cases], layout, args.repeat) for rel in args.bridges}
            for index, layers in enumerate(layer_counts):
                rows.append(row_for(model, layers, experts, name, mine[index],
                                    {rel: theirs[rel][index] for rel in args.bridges}) | {"bridge_repeats": args.repeat})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(None, False)
    hardware = None
    if not args.no_hardware:
        bandwidth_json = Path(tempfile.mkstemp(suffix=".json")[1])
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bandwidth.py"), "--json", str(bandwidth_json)],
                       check=True, capture_output=True, text=True)
        hardware = json.loads(bandwidth_json.read_text())
    write(hardware, True)


if __name__ == "__main__":
    main()
