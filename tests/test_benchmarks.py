"""The benchmarks run at toy size (they are measured with `make bench`, never timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mapgen.verify import testing


def _run(script: str, *args: str, out: Path) -> dict | list:  # type: ignore[type-arg]
    result = subprocess.run(
        [sys.executable, str(testing.ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data: dict | list = json.loads(out.read_text())  # type: ignore[type-arg]
    return data


def test_conversion_benchmark_runs(tmp_path: Path) -> None:
    rows = _run("conversion.py", "--layers", "2", "--repeat", "1", out=tmp_path / "c.json")
    assert isinstance(rows, list)
    assert {r["layout"] for r in rows} == {"TP1", "TP2", "PP2"}
    for row in rows:
        assert row["import_s"] > 0 and row["export_s"] > 0
        assert row["export_collectives_rank0"].get("all_gather_object", 0) == 0


def test_bandwidth_benchmark_runs(tmp_path: Path) -> None:
    row = _run("bandwidth.py", "--layers", "1", "--hidden", "64", "--repeat", "1", out=tmp_path / "b.json")
    assert isinstance(row, dict)
    assert row["copy_s"] > 0 and row["import_s"] > 0 and row["export_s"] > 0


def test_convert_throughput_benchmark_runs(tmp_path: Path) -> None:
    report = _run("convert_throughput.py", "--models", "qwen3_moe", "--layers", "1", "--hidden", "64", "--experts", "4",
                  "--repeat", "1", out=tmp_path / "t.json")
    assert isinstance(report, dict)
    rows = report["rows"]
    assert [(r["model"], r["layout"]) for r in rows] == [("qwen3_moe", "TP1"), ("qwen3_moe", "EP2")]
    for row in rows:
        assert row["bytes"] == row["checkpoint_bytes"] > 0
        for direction in ("hf-to-megatron", "megatron-to-hf"):
            times = row[direction]
            assert times["mapgen_s"] > 0 and times["baseline_s"] > 0
            assert times["ratio"] == pytest.approx(times["mapgen_s"] / times["baseline_s"], rel=0.02, abs=0.01)

def test_export_memory_benchmark_runs(tmp_path: Path) -> None:
    data = _run("export_memory.py", "--layers", "4", "--experts", "8", "--buckets", "1", "--formats", "bf16", out=tmp_path / "e.json")
    assert isinstance(data, dict)
    (ranks,) = data["rows"]  # one format, one bucket size: one pair of processes
    assert len(ranks) == 2 and ranks[0]["params"] == 65
    for row in ranks:
        assert row["format"] == "bf16" and row["buckets"] >= 1 and row["bound_mib"] > 0
        assert row["held_live_mib"] >= 0 and row["tensors"] == row["hf_tensors"]
