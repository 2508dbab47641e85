"""What the package form of a generated target costs on disk and at import, next to the one-file form.

Run: .venv/bin/python benchmarks/target_form.py [--json out.json] [--markdown out.md]
     [--targets a,b] [--repeat N] [--quick]

Targets (default): every target of specs/targets.yaml checked in under generated/, plus
qwen3_next_80b_a3b and qwen3_235b_a22b, which are not checked in and are built here with
`mapgen build SPEC CONFIG -o TMP/<name>` (their build time is recorded). Checked-in packages are
copied to a temporary folder first, so that a concurrent rebuild of generated/ cannot change them
mid-run and no bytecode is ever written into the tree.

Sizes, per target: the package's bytes, number of .py files, its largest file, its Megatron
parameters (the sum of PARTS' params) and bytes per parameter; and, where the target existed then,
the one-file module's bytes at git revision 9b11921 (the last one-file form) and its bytes per
parameter (over the package's parameter count).

Imports, each in a fresh child process running a small script: the child first imports torch,
mapgen.runtime and mapgen.runtime.package (not timed), then times (time.perf_counter) the import
of the target and the view the runtime takes of it, and reports its peak RSS (getrusage
ru_maxrss). A baseline child that only does the untimed imports gives the RSS every child starts
from; each figure is given raw and as the delta over that baseline. The peak is torch's import
transient's unless the target adds more than that headroom, so a small share reads 0 (or a
fraction of a MiB below, noise) there; the child therefore also reports its RSS growth, the
resident set after the timed region minus before it (/proc/self/statm), which does resolve it.
- cold: no bytecode anywhere for the target. The child sets sys.pycache_prefix to a fresh empty
  folder (after torch and mapgen are imported, so only the target's own files are affected, and
  any __pycache__ beside the sources is ignored) and sys.dont_write_bytecode.
- warm: the target's bytecode is first written with `python -X pycache_prefix=DIR -m compileall`,
  and the child sets sys.pycache_prefix to DIR.
The child reports how many of the target's modules had bytecode on disk (0 cold, all warm) and
every other module the timed import pulled in (none is expected), so either mistake shows.
Views: `whole` = whole_view(package) (every part); `rank` = rank_view at PP4 x EP8, the rank
(pp_rank=0, ep_rank=0): layers [0, ceil(L/4)) with L = the PARTS table's largest layer + 1, experts
[0, ceil(E/8)) with E = DIMS.num_moe_experts (0 for a dense model); for GPT-model targets only
(a hybrid package's layers are HybridModel layers, LLaVA has no pipeline parallelism); `old` =
`import` of the one-file module of revision 9b11921, cold, for the largest targets (OLD_IMPORTS).
Each figure is the best time and the smallest RSS of --repeat runs (3); a measurement whose first
run takes over SLOW_S seconds (its best so far) is run twice at most. Ratios: rank / whole, of the
time, the peak RSS delta (negative deltas counted as 0) and the RSS growth; and whole / one-file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OLD_REV = "9b11921"
# built here, not checked in: name -> (spec, config)
BUILT = {
    "qwen3_next_80b_a3b": ("specs/qwen3_next.yaml", "specs/configs/qwen3_next_80b_a3b.json"),
    "qwen3_235b_a22b": ("specs/qwen3_moe.yaml", "specs/configs/qwen3_235b_a22b.json"),
}
QUICK = ("qwen3_next_80b_a3b", "llama3_2_1b")
# targets whose one-file module of OLD_REV is imported too (the before figures)
OLD_IMPORTS = ("qwen3_next_80b_a3b", "deepseek_v3", "qwen3_235b_a22b")
PP, EP = 4, 8
SLOW_S = 10.0
GOAL = 1 / 8  # rank share / whole, cold, for Qwen3-Next
GOAL_TARGET = "qwen3_next_80b_a3b"

CHILD = textwrap.dedent(
    """
    import importlib, json, os, resource, sys, time

    def rss_kib():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    import torch, mapgen.runtime
    from mapgen.runtime.package import rank_view, whole_view

    job = json.loads(sys.argv[1])
    result = {}
    if job["view"] != "baseline":
        sys.dont_write_bytecode = True
        sys.pycache_prefix = job["pycache_prefix"]
        sys.path.insert(0, job["folder"])
        name = job["module"]
        before = set(sys.modules)
        resident = rss_kib()
        started = time.perf_counter()
        module = importlib.import_module(name)
        if job["view"] == "whole":
            view = whole_view(module)
        elif job["view"] == "rank":
            view = rank_view(module, range(*job["layers"]), tuple(job["experts"]))
        else:
            view = module
        seconds = time.perf_counter() - started
        grown = rss_kib() - resident
        mine = [m for m in set(sys.modules) - before if m == name or m.startswith(name + ".")]
        result = {
            "seconds": seconds,
            "rss_growth_kib": grown,
            "modules": len(mine),
            "with_bytecode": sum(os.path.exists(sys.modules[m].__spec__.cached or "") for m in mine),
            "others": sorted(set(sys.modules) - before - set(mine)),
            "params": len(view.PARAMS),
            "parts": len(getattr(view, "parts", ())),
        }
    result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result))
    """
)


@dataclass
class Target:
    name: str
    folder: Path  # holds the package <folder>/<name>/
    source: str  # "checked in" or "built"
    package: ModuleType
    build_s: float | None = None
    old_path: Path | None = None  # the one-file module of OLD_REV, extracted
    old_bytes: int | None = None
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / self.name


# ---------------------------------------------------------------- static figures


def load_package(folder: Path, name: str) -> ModuleType:
    """The package's __init__ alone (no part is imported), under a private module name."""
    import importlib.util

    key = f"_target_form_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(
        key, folder / name / "__init__.py", submodule_search_locations=[str(folder / name)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def num_layers(package: ModuleType) -> int:
    return 1 + max((p.layer for p in package.PARTS if p.layer is not None), default=-1)


def rank_layout(package: ModuleType, pp: int = PP, ep: int = EP) -> dict[str, Any] | None:
    """The decoder layers and experts of the rank (pp_rank=0, ep_rank=0) at PP `pp` x EP `ep`,
    from the package's static plan, or None where the layout does not apply (hybrid, LLaVA)."""
    if getattr(package, "MODEL", "gpt") != "gpt":
        return None
    layers = num_layers(package)
    experts = getattr(package.DIMS, "num_moe_experts", None) or 0
    return {
        "layout": f"PP{pp} x EP{ep}, pp_rank 0, ep_rank 0",
        "layers": [0, math.ceil(layers / pp)],
        "experts": [0, math.ceil(experts / ep)],
        "num_layers": layers,
        "num_experts": experts,
    }


def sizes(path: Path) -> dict[str, int]:
    files = [f for f in path.rglob("*.py") if "__pycache__" not in f.parts]
    sizes_ = [f.stat().st_size for f in files]
    return {"bytes": sum(sizes_), "files": len(files), "largest_file_bytes": max(sizes_)}


def old_size(name: str) -> int | None:
    out = subprocess.run(
        ["git", "cat-file", "-s", f"{OLD_REV}:generated/{name}.py"], cwd=ROOT, capture_output=True, text=True
    )
    return int(out.stdout) if out.returncode == 0 else None


def extract_old(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    with path.open("wb") as handle:
        subprocess.run(["git", "show", f"{OLD_REV}:generated/{name}.py"], cwd=ROOT, stdout=handle, check=True)
    return path


# ---------------------------------------------------------------- child measurements


def run_child(script: Path, job: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(job)], env=env, cwd=tempfile.gettempdir(),
        capture_output=True, text=True, timeout=900,
    )
    if out.returncode:
        raise RuntimeError(f"child {job} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def aggregate(runs: list[dict[str, Any]], baseline_kib: int | None) -> dict[str, Any]:
    """Best time and smallest peak RSS over the runs; RSS also as the delta over the baseline."""
    rss = min(r["maxrss_kib"] for r in runs)
    figure: dict[str, Any] = {"runs": len(runs), "rss_mib": round(rss / 1024, 1)}
    if "seconds" in runs[0]:
        figure["seconds"] = round(min(r["seconds"] for r in runs), 4)
        figure["all_seconds"] = [round(r["seconds"], 4) for r in runs]
        figure["rss_growth_mib"] = round(min(r["rss_growth_kib"] for r in runs) / 1024, 1)
        for key in ("params", "parts", "modules", "with_bytecode"):
            figure[key] = runs[0][key]
        figure["others"] = runs[0]["others"]
    if baseline_kib is not None:
        figure["rss_delta_mib"] = round((rss - baseline_kib) / 1024, 1)
    return figure


def measure(
    script: Path, job: dict[str, Any], repeat: int, baseline_kib: int | None, scratch: Path, warm_prefix: Path | None
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    while len(runs) < repeat:
        if job["view"] != "baseline":
            if warm_prefix is None:  # cold: a fresh empty bytecode folder every run
                job["pycache_prefix"] = tempfile.mkdtemp(prefix="cold-", dir=scratch)
            else:
                job["pycache_prefix"] = str(warm_prefix)
        runs.append(run_child(script, job))
        if len(runs) >= 2 and min(r.get("seconds", 0) for r in runs) > SLOW_S:
            break
    figure = aggregate(runs, baseline_kib)
    if job["view"] != "baseline":
        want = 0 if warm_prefix is None else figure["modules"]
        if figure["with_bytecode"] != want:
            raise RuntimeError(f"{job}: {figure['with_bytecode']} of {figure['modules']} modules had bytecode")
    return figure


def compile_bytecode(path: Path, prefix: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-X", f"pycache_prefix={prefix}", "-m", "compileall", "-q", str(path)],
        check=True, capture_output=True,
    )
    return time.perf_counter() - started


def _pos(x: float) -> float:
    """A peak-RSS delta under the baseline (noise) as 0."""
    return x if x > 0 else 0.0


def ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or whole is None or whole <= 0:
        return None
    return round(part / whole, 4)


def measure_target(
    target: Target, script: Path, repeat: int, baseline_kib: int, scratch: Path, old_import: bool, log: Any
) -> dict[str, Any]:
    imports: dict[str, Any] = {}
    layout = rank_layout(target.package)
    prefix = scratch / f"warm-{target.name}"
    compile_s = compile_bytecode(target.path, prefix)
    base = {"folder": str(target.folder), "module": target.name}
    for view in ("whole", "rank"):
        if view == "rank" and layout is None:
            continue
        job = dict(base, view=view)
        if view == "rank":
            assert layout is not None
            job.update(layers=layout["layers"], experts=layout["experts"])
        figures = {}
        for kind, warm in (("cold", None), ("warm", prefix)):
            figures[kind] = measure(script, dict(job), repeat, baseline_kib, scratch, warm)
            log(f"  {target.name} {view} {kind}: {figures[kind]['seconds']:.3f} s, "
                f"{figures[kind]['rss_delta_mib']} MiB peak over baseline, {figures[kind]['rss_growth_mib']} MiB growth")
        imports[view] = figures
    if old_import and target.old_path is not None:
        job = {"folder": str(target.old_path.parent), "module": target.name, "view": "old"}
        imports["old"] = {"cold": measure(script, job, repeat, baseline_kib, scratch, None)}
        log(f"  {target.name} old cold: {imports['old']['cold']['seconds']:.3f} s, "
            f"{imports['old']['cold']['rss_delta_mib']} MiB peak over baseline, "
            f"{imports['old']['cold']['rss_growth_mib']} MiB growth")
    ratios: dict[str, Any] = {}
    if "rank" in imports:
        for kind in ("cold", "warm"):
            whole, rank = imports["whole"][kind], imports["rank"][kind]
            ratios[kind] = {
                "time": ratio(rank["seconds"], whole["seconds"]),
                "rss_delta": ratio(_pos(rank["rss_delta_mib"]), whole["rss_delta_mib"]),
                "rss_growth": ratio(_pos(rank["rss_growth_mib"]), whole["rss_growth_mib"]),
                "rss_raw": ratio(rank["rss_mib"], whole["rss_mib"]),
            }
    if "old" in imports:
        ratios["whole_cold_vs_old"] = {
            "time": ratio(imports["whole"]["cold"]["seconds"], imports["old"]["cold"]["seconds"]),
            "rss_delta": ratio(imports["whole"]["cold"]["rss_delta_mib"], imports["old"]["cold"]["rss_delta_mib"]),
            "rss_growth": ratio(imports["whole"]["cold"]["rss_growth_mib"], imports["old"]["cold"]["rss_growth_mib"]),
        }
    return {"bytecode_compile_s": round(compile_s, 2), "rank_layout": layout, "imports": imports, "ratios": ratios}


# ---------------------------------------------------------------- targets


def checked_in() -> list[str]:
    import yaml

    entries = yaml.safe_load((ROOT / "specs" / "targets.yaml").read_text())["targets"]
    return [name for name in entries if (ROOT / "generated" / name / "__init__.py").is_file()]


def prepare(names: list[str], scratch: Path, log: Any) -> list[Target]:
    new_dir, old_dir = scratch / "new", scratch / "old"
    new_dir.mkdir()
    targets = []
    for name in names:
        build_s = None
        if (ROOT / "generated" / name / "__init__.py").is_file():
            shutil.copytree(ROOT / "generated" / name, new_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
            source = "checked in"
        elif name in BUILT:
            spec, config = BUILT[name]
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", "from mapgen.cli import main; main()", "build", spec, config,
                 "-o", str(new_dir / name)],
                cwd=ROOT, check=True, capture_output=True,
            )
            build_s = round(time.perf_counter() - started, 1)
            source = "built"
            log(f"built {name} in {build_s} s")
        else:
            raise SystemExit(f"{name}: not checked in under generated/ and not one of {sorted(BUILT)}")
        target = Target(name, new_dir, source, load_package(new_dir, name), build_s=build_s, old_bytes=old_size(name))
        targets.append(target)
    return targets


def static_row(target: Target) -> dict[str, Any]:
    params = sum(p.params for p in target.package.PARTS)
    new = sizes(target.path)
    new["params"] = params
    new["bytes_per_param"] = round(new["bytes"] / params, 1)
    new["parts"] = len(target.package.PARTS)
    row: dict[str, Any] = {"target": target.name, "source": target.source, "model": target.package.MODEL,
                           "build_s": target.build_s, "package": new}
    row["one_file"] = None if target.old_bytes is None else {
        "rev": OLD_REV, "bytes": target.old_bytes, "bytes_per_param": round(target.old_bytes / params, 1),
    }
    return row


# ---------------------------------------------------------------- report


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    rows = result["targets"]
    size_rows = []
    for r in rows:
        new, old = r["package"], r["one_file"]
        size_rows.append([
            r["target"], r["source"], str(new["files"]), _mb(new["bytes"]), _mb(new["largest_file_bytes"]),
            str(new["params"]), f"{new['bytes_per_param']:.0f}",
            _mb(old and old["bytes"]), "-" if old is None else f"{old['bytes_per_param']:.0f}",
        ])
    import_rows = []
    for r in rows:
        for view, figures in r["imports"].items():
            what = view
            if view == "rank":
                lay = r["rank_layout"]
                what = f"rank L{lay['layers'][0]}-{lay['layers'][1] - 1} E[{lay['experts'][0]},{lay['experts'][1]})"
            elif view == "old":
                what = f"one-file ({OLD_REV})"
            cold, warm = figures["cold"], figures.get("warm")
            import_rows.append([
                r["target"], what, str(cold["params"]), str(cold["modules"]),
                _f(cold["seconds"]), _f(warm and warm["seconds"]),
                _f(cold["rss_mib"], "{:.0f}"), _f(_pos(cold["rss_delta_mib"]), "{:.0f}"),
                _f(cold["rss_growth_mib"], "{:.1f}"),
                _f(warm and _pos(warm["rss_delta_mib"]), "{:.0f}"), _f(warm and warm["rss_growth_mib"], "{:.1f}"),
                str(cold["runs"]),
            ])
    ratio_rows = []
    for r in rows:
        ra = r["ratios"]
        if "cold" not in ra and "whole_cold_vs_old" not in ra:
            continue
        cold, warm, old = ra.get("cold", {}), ra.get("warm", {}), ra.get("whole_cold_vs_old", {})
        verdict = ""
        if r["target"] == GOAL_TARGET and cold:
            met = all(cold[k] is not None and cold[k] <= GOAL for k in ("time", "rss_delta", "rss_growth"))
            verdict = "met" if met else "NOT met"
        ratio_rows.append([
            r["target"], _f(cold.get("time")), _f(cold.get("rss_delta")), _f(cold.get("rss_growth")),
            _f(warm.get("time")), _f(warm.get("rss_growth")),
            _f(old.get("time")), _f(old.get("rss_delta")), _f(old.get("rss_growth")), verdict,
        ])
    return [
        ("Sizes (MB = 10^6 bytes; params = Megatron parameters, the sum of PARTS)",
         ["target", "source", "files", "package MB", "largest file MB", "params", "B/param",
          f"one-file MB ({OLD_REV})", "one-file B/param"], size_rows),
        (f"Imports (seconds: best of runs; MiB: the smallest peak RSS, raw and over the baseline child's "
         f"{result['baseline']['rss_mib']} MiB (0: under torch's import peak), and the smallest RSS growth "
         f"over the import; rank = PP{PP} x EP{EP}, pp_rank 0, ep_rank 0)",
         ["target", "view", "params", "modules", "cold s", "warm s", "cold peak", "cold +peak", "cold growth",
          "warm +peak", "warm growth", "runs"], import_rows),
        (f"Ratios (rank / whole, and whole / one-file: time, peak RSS over the baseline, RSS growth; "
         f"'-': the denominator is 0; goal for {GOAL_TARGET}, cold: each <= 1/{round(1 / GOAL)})",
         ["target", "cold time", "cold +peak", "cold growth", "warm time", "warm growth",
          "whole/one-file cold time", "whole/one-file +peak", "whole/one-file growth", "goal"], ratio_rows),
    ]


def text_report(result: dict[str, Any]) -> str:
    out = []
    for title, header, rows in tables(result):
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        out.append(title)
        out.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        out.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
        out.append("")
    meta = result["meta"]
    out.append(f"run time {meta['run_s']:.0f} s, load average at start {meta['load_average_start']}, "
               f"at end {meta['load_average_end']}")
    return "\n".join(out)


def markdown_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [
        "# Target form: package vs one-file module",
        "",
        f"Generated by `benchmarks/target_form.py` on {meta['date']}; do not edit by hand.",
        "",
        f"- machine: {meta['platform']}, {meta['cpu_count']} CPUs; Python {meta['python']}, torch {meta['torch']}",
        f"- load average (1, 5, 15 min): {meta['load_average_start']} at start, {meta['load_average_end']} at end",
        f"- repeats: {meta['repeat']} (best time, smallest RSS; a measurement whose best is over {SLOW_S:.0f} s:"
        " 2 at most);"
        f" run time {meta['run_s']:.0f} s",
        f"- one-file form: git revision {OLD_REV}; cold = no bytecode, warm = bytecode written beforehand",
        "",
    ]
    for title, header, rows in tables(result):
        out += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def run(names: list[str], repeat: int, old_imports: tuple[str, ...], log: Any = print) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "repeat": repeat, "old_rev": OLD_REV, "pp": PP, "ep": EP,
    }
    sys.dont_write_bytecode = True  # reading the packages' __init__ here writes nothing beside them
    with tempfile.TemporaryDirectory(prefix="target_form-") as tmp:
        scratch = Path(tmp)
        script = scratch / "child.py"
        script.write_text(CHILD)
        targets = prepare(names, scratch, log)
        baseline = measure(script, {"view": "baseline"}, repeat, None, scratch, None)
        baseline_kib = round(baseline["rss_mib"] * 1024)
        log(f"baseline child (torch + mapgen.runtime): {baseline['rss_mib']} MiB")
        rows = []
        for target in targets:
            row = static_row(target)
            row["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
            if target.name in old_imports and target.old_bytes is not None:
                target.old_path = extract_old(target.name, scratch / "old")
            row.update(measure_target(target, script, repeat, baseline_kib, scratch, target.name in old_imports, log))
            rows.append(row)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["run_s"] = round(time.perf_counter() - started, 1)
    return {"meta": meta, "baseline": baseline, "targets": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--targets", help="comma-separated target names (default: checked in + built)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        names, repeat = list(QUICK), 1
    else:
        names = args.targets.split(",") if args.targets else checked_in() + [n for n in BUILT if n not in checked_in()]
        repeat = args.repeat
    result = run(names, repeat, OLD_IMPORTS, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(text_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown_report(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
