"""Build time, module size, cold and warm import time and `mypy --strict` time of every
checked-in target.

Run: .venv/bin/python benchmarks/build_figures.py [--json out.json] [--targets a,b]
Cold import: a fresh interpreter with no .pyc for the module (bytecode compiled from source);
warm: a fresh interpreter with the .pyc already written. Both are timed around the import
statement alone, after mapgen.runtime is imported, so they measure the generated module itself.
mypy: `mypy --strict` of the module alone, no cache, in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mapgen.compiler.targets import compile_entry, read_targets  # noqa: E402

IMPORT = "import time, sys; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def _timed_import(folder: Path, module: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(folder)
    code = "import mapgen.runtime, mapgen.common.dims; " + IMPORT.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--targets", help="comma-separated target names (default: all)")
    args = parser.parse_args()
    os.chdir(ROOT)
    from tables import run_metadata  # noqa: PLC0415

    meta = run_metadata()  # date, machine and load at the start: docs/benchmarks.md prints them
    rows = []
    entries = read_targets(ROOT)
    if args.targets:
        entries = [e for e in entries if e.name in args.targets.split(",")]
    compile_entry(ROOT, read_targets(ROOT)[0])  # warm up the libraries' own imports
    for entry in entries:
        started = time.perf_counter()
        source = compile_entry(ROOT, entry)
        build_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{entry.name}.py"
            path.write_text(source)
            cold = _timed_import(Path(folder), entry.name)
            warm = _timed_import(Path(folder), entry.name)
            shutil.rmtree(Path(folder) / "__pycache__", ignore_errors=True)
            started = time.perf_counter()
            checked = subprocess.run(
                [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull, str(path)],
                cwd=ROOT, capture_output=True, text=True,
            )
            mypy_s = time.perf_counter() - started
            if checked.returncode:
                raise SystemExit(f"mypy --strict fails on {entry.name}:\n{checked.stdout[-2000:]}")
        rows.append(
            {
                "target": entry.name,
                "build_s": round(build_s, 2),
                "bytes": len(source.encode()),
                "lines": source.count("\n"),
                "functions": source.count("\ndef "),
                "cold_import_s": round(cold, 3),
                "warm_import_s": round(warm, 3),
                "mypy_strict_s": round(mypy_s, 1),
            }
        )
    header = (
        f"{'target':<16} {'build s':>8} {'KiB':>7} {'lines':>8} {'functions':>9} "
        f"{'cold import s':>13} {'warm import s':>13} {'mypy s':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['target']:<16} {r['build_s']:>8.2f} {r['bytes'] / 1024:>7.0f} {r['lines']:>8} "
            f"{r['functions']:>9} {r['cold_import_s']:>13.3f} {r['warm_import_s']:>13.3f} {r['mypy_strict_s']:>7.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
