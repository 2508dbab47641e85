"""Build time, module size, cold and warm import time of every checked-in target.

Run: .venv/bin/python benchmarks/build_figures.py [--json out.json]
Cold import: a fresh interpreter with no .pyc for the module (bytecode compiled from source);
warm: a fresh interpreter with the .pyc already written. Both subtract the time to import
mapgen.runtime alone, so they measure the generated module itself.
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

from mapgen.build import compile_entry, read_targets  # noqa: E402

IMPORT = "import time, sys; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def _timed_import(folder: Path, module: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    code = "import mapgen.runtime, mapgen.dims; " + IMPORT.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.chdir(ROOT)
    rows = []
    compile_entry(ROOT, read_targets(ROOT)[0])  # warm up the libraries' own imports
    for entry in read_targets(ROOT):
        started = time.perf_counter()
        source = compile_entry(ROOT, entry)
        build_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{entry.name}.py"
            path.write_text(source)
            cold = _timed_import(Path(folder), entry.name)
            warm = _timed_import(Path(folder), entry.name)
            shutil.rmtree(Path(folder) / "__pycache__", ignore_errors=True)
        rows.append(
            {
                "target": entry.name,
                "build_s": round(build_s, 2),
                "bytes": len(source.encode()),
                "lines": source.count("\n"),
                "functions": source.count("\ndef "),
                "cold_import_s": round(cold, 3),
                "warm_import_s": round(warm, 3),
            }
        )
    header = f"{'target':<14} {'build s':>8} {'KiB':>7} {'lines':>7} {'functions':>9} {'cold import s':>13} {'warm import s':>13}"
    print(header)
    for r in rows:
        print(
            f"{r['target']:<14} {r['build_s']:>8.2f} {r['bytes'] / 1024:>7.0f} {r['lines']:>7} "
            f"{r['functions']:>9} {r['cold_import_s']:>13.3f} {r['warm_import_s']:>13.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
