"""The benchmarks run at toy size (they are measured with `make bench`, never timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

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
        assert row["export_bf16_s"] > 0 and row["export_local_s"] > 0
        assert row["export_collectives_rank0"].get("all_gather_object", 0) == 0
        assert row["export_local_collectives"] == [{}, {}]  # gather-free: no collective on either rank
    tp2 = next(r for r in rows if r["layout"] == "TP2")
    assert tp2["export_collectives_rank0"]["all_gather"] >= 1  # the counter does see the gathered export's


def test_bench_report_ratios_and_targets() -> None:
    """run.py's ratios (Bridge's time / mapgen's) and its verdicts against issue 13's targets."""
    sys.path.insert(0, str(testing.ROOT / "benchmarks"))
    import run  # noqa: PLC0415

    mine = {"import_s": 0.01, "import_first_s": 0.02, "export_s": 0.002, "export_cold_s": 0.01, "export_bf16_s": 0.004, "export_local_s": 0.0005,
            "collectives": {"all_gather": 1}, "export_local_collectives": {}, "tensors": 10, "params": 5,
            "load_at_start": [1.0, 1.0, 1.0]}
    bridge = {"import_s": 1.5, "import_first_s": 1.6, "export_s": 0.3, "export_held_s": 0.1, "export_bf16_s": None, "mismatched": 0,
              "load_at_start": [2.0, 1.0, 1.0], "python": "3.12.1", "torch": "2.9.1", "megatron_core": "0.19.2",
              "transformers": "5.12.1"}
    row = run.row_for("llama", 64, None, "TP2", mine, {"0.6.2": bridge})
    assert row["speedup"]["0.6.2"] == {"import": 150.0, "import_first": 80.0, "export_held": 150.0, "export_cold": 30.0,
                                       "export_held_vs_bridge_held_tasks": 50.0, "export_bf16": None}
    assert row["gather_free_speedup"] == 4.0
    lines = run.target_lines([row])
    assert "  import llama64 TP2: 150.0x (target >= 100x) met" in lines
    assert "  gather-free vs gathered llama64 TP2: 4.0x (target >= 5x) NOT met" in lines
    assert any(line.startswith("llama64") for line in run.report([row], ["0.6.2"], None))
    # a time is the slowest rank's in one repeat, best over repeats (not each rank's best)
    per_rank = [{"times": {"import_s": [1.0, 5.0]}}, {"times": {"import_s": [4.0, 2.0]}}]
    assert run.best(per_rank, "import_s") == 4.0 and run.first(per_rank, "import_s") == 4.0


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


def test_realwidth_tables_match_their_json() -> None:
    """Every real-width block in docs/benchmarks.md and README.md is what benchmarks/tables.py makes
    of its JSON now (the README's short table included)."""
    sys.path.insert(0, str(testing.ROOT / "benchmarks"))
    import tables  # noqa: PLC0415

    found = []
    for document in tables.DOCUMENTS:
        for match in tables.BLOCK.finditer(document.read_text()):
            if match.group(2).startswith("realwidth"):
                found.append(match.group(2))
                assert match.group(3) == tables.render(match.group(2)), f"{document.name}: {match.group(2)} is stale"
    assert any(name.startswith("realwidth-headline") for name in found)  # README's short table
    assert any(name.startswith("realwidth-profile") for name in found)


def test_realwidth_ratios_and_merging() -> None:
    """realwidth.py's ratios (Bridge's time / mapgen's; the bound's time / mapgen's) and its
    medians over rounds, on made-up times (nothing is timed here)."""
    sys.path.insert(0, str(testing.ROOT / "benchmarks"))
    import realwidth  # noqa: PLC0415
    import tables  # noqa: PLC0415

    def mine(times: dict[str, list[float]]) -> dict[str, Any]:
        return {"times_s": times, "median_s": {}, "peak_rss_mib": [{"import_s": 10, "export_s": 20}],
                "load_at_start": [1.0, 1.0, 1.0], "checked": {"mismatched": 0}, "profile": None}

    first = mine({"copy_s": [1.0, 1.0, 1.0], "read_s": [3.0, 3.0, 3.0], "import_s": [2.0, 9.0, 2.0], "export_s": [0.5, 0.5, 0.5],
                  "export_cold_s": [1.0, 1.0, 1.0], "collective_s": [0.0, 0.0, 0.0]})
    second = mine({"copy_s": [1.0, 1.0, 1.0], "read_s": [1.5, 1.5, 1.5], "import_s": [1.0, 1.0, 1.0], "export_s": [0.5, 0.5, 0.5],
                   "export_cold_s": [1.0, 1.0, 1.0], "collective_s": [0.0, 0.0, 0.0]})
    second["peak_rss_mib"] = [{"import_s": 30, "export_s": 5}]
    merged = realwidth.merged_mapgen([first, second])
    assert merged["median_s"]["import_s"] == 1.5  # the median of all six repeats, not of each round's
    assert merged["peak_rss_mib"] == [{"import_s": 30, "export_s": 20}] and merged["rounds"] == 2
    bridge = {"times_s": {"import": [3.0, 4.0, 5.0], "export": [1.0, 2.0, 3.0], "export_held": [1.0, 1.0, 1.0]},
              "import_median_s": 4.0, "export_median_s": 2.0, "export_held_median_s": 1.0, "mismatched": 0,
              "peak_rss_mib": [{"import": 1024, "export": 2048, "export_held": 1024}], "load_at_start": [1, 1, 1]}
    row = realwidth.row_for("llama", 2, "TP1", 3 * 10**9, merged, realwidth.merged_bridge([bridge]))
    assert row["speedup"]["import"] == round(4.0 / 1.5, 2) and row["speedup"]["export_held"] == 4.0
    assert row["import_vs_copy"] == round(1.0 / 1.5, 3) and row["gb_s"]["copy"] == 3.0
    assert row["export_vs_collective"] is None  # no collective at TP1
    data = {"meta": {}, "repeat": 3, "rounds": 2, "rows": [row],
            "skipped": [{"title": "DeepSeek-V3 widths", "layers": 2, "layout": "EP2", "checkpoint_gb": 45.0,
                         "reason": "does not fit"}]}
    text = "\n".join(tables.realwidth_table(data))
    assert row["import_vs_read"] == round(2.25 / 1.5, 3)  # the read's median over the import's
    assert "| 3 | 3 | 2.25 | 1.5 (2, 67%, 150%) | 4 (2.67) |" in text  # GB, copy GB/s, read s, import (GB/s, of copy, of read), Bridge (×)
    assert "Not measured: DeepSeek-V3 widths (2 layers) EP2: does not fit." in text
    profiled = "\n".join(tables.realwidth_profile_table(data))  # 67% of copy, but no profile recorded
    assert profiled.startswith("Every case reaches 90%") is False and "no profile" in profiled
    # a recorded collective keeps shapes only; replay buffers are made from them
    spec = realwidth._shapes(([torch.zeros(2, 3)], torch.zeros(4, dtype=torch.bfloat16), 7))
    assert spec == ([realwidth.Spec((2, 3), torch.float32)], realwidth.Spec((4,), torch.bfloat16), 7)
    assert realwidth._bytes(spec) == 2 * 3 * 4 + 4 * 2


def test_growth_profile_runs() -> None:
    """run.py --growth-profile: the held export and the torch-only baseline at two depths, and
    the profiled functions with their call ratios (a 2- and a 4-layer model; nothing timed here)."""
    result = subprocess.run(
        [sys.executable, str(testing.ROOT / "benchmarks" / "run.py"), "--growth-profile", "--layers", "2", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("growth profile, TP1, 2 -> 4 layers")
    assert any("mapgen held export" in line for line in lines)
    assert any("clone every parameter" in line for line in lines)
    assert any("qkv_split" in line and "calls   2.00x" in line for line in lines)  # 2 -> 4 layers: twice the calls
