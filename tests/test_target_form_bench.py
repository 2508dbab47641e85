"""benchmarks/target_form.py: its rank-share layout and part selection, its aggregation, and one
real cold and warm measurement of the smallest target (a few seconds; the figures are taken with
`make bench`, never asserted here)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import target_form as tf  # noqa: E402

from mapgen.runtime.package import rank_view  # noqa: E402


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the checked-in packages the tests read (generated/ may be rebuilt meanwhile)."""
    folder = tmp_path_factory.mktemp("packages")
    for name in ("qwen3_30b_a3b", "deepseek_v3", "llama3_2_1b", "llama3_2_1b_hybrid", "llava_1_5_7b"):
        shutil.copytree(ROOT / "generated" / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_rank_share_of_qwen3_30b_a3b(packages: Path) -> None:
    """PP4 x EP8, rank (0, 0) of a 48-layer, 128-expert model: layers 0-11, expert ranges meeting [0, 16)."""
    package = tf.load_package(packages, "qwen3_30b_a3b")
    layout = tf.rank_layout(package)
    assert layout is not None
    assert (layout["layers"], layout["experts"], layout["num_layers"]) == ([0, 12], [0, 16], 48)
    view = rank_view(package, range(*layout["layers"]), tuple(layout["experts"]))
    chosen = {p.module for p in view.parts}
    layer_parts = [p for p in view.parts if p.layer is not None]
    assert {p.layer for p in layer_parts} == set(range(12))
    assert {p.experts for p in layer_parts} == {None, (0, 32)}  # 4 ranges of 32 experts: only the first meets
    assert len(layer_parts) == 12 * 2
    assert {"embedding", "output"} <= chosen
    # nothing left out that the rank needs
    for part in package.PARTS:
        needed = (part.layer is None or part.layer < 12) and (part.experts is None or part.experts[0] < 16)
        assert (part.module in chosen) == needed, part
    assert len(view.PARAMS) == sum(p.params for p in view.parts) < sum(p.params for p in package.PARTS) / 8


def test_rank_layout_rounds_up_and_skips_other_models(packages: Path) -> None:
    deepseek = tf.load_package(packages, "deepseek_v3")  # 61 layers, 256 experts
    assert tf.rank_layout(deepseek) == {
        "layout": "PP4 x EP8, pp_rank 0, ep_rank 0", "layers": [0, 16], "experts": [0, 32],
        "num_layers": 61, "num_experts": 256,
    }
    dense = tf.rank_layout(tf.load_package(packages, "llama3_2_1b"))
    assert dense is not None and dense["layers"] == [0, 4] and dense["experts"] == [0, 0]
    assert tf.rank_layout(tf.load_package(packages, "llama3_2_1b_hybrid")) is None
    assert tf.rank_layout(tf.load_package(packages, "llava_1_5_7b")) is None


def test_aggregate_best_time_smallest_rss() -> None:
    runs = [
        {"seconds": 2.0, "maxrss_kib": 300 * 1024, "rss_growth_kib": 2048, "params": 5, "parts": 2, "modules": 3, "with_bytecode": 0, "others": []},
        {"seconds": 1.5, "maxrss_kib": 310 * 1024, "rss_growth_kib": 4096, "params": 5, "parts": 2, "modules": 3, "with_bytecode": 0, "others": []},
    ]
    figure = tf.aggregate(runs, baseline_kib=200 * 1024)
    assert figure["seconds"] == 1.5 and figure["rss_mib"] == 300.0 and figure["rss_delta_mib"] == 100.0
    assert figure["runs"] == 2 and figure["all_seconds"] == [2.0, 1.5] and figure["rss_growth_mib"] == 2.0
    assert tf.ratio(1.0, 8.0) == 0.125 and tf.ratio(None, 1.0) is None
    assert tf.ratio(1.0, 0.0) is None and tf.ratio(0.0, -0.1) is None  # a whole under the resolution: no ratio


def test_one_real_measurement(packages: Path) -> None:
    """llama3_2_1b in two child processes: the whole view cold (no bytecode for any of the package's
    modules) and the rank share warm (bytecode for every module it imports); measure() raises if
    either child saw otherwise."""
    package = tf.load_package(packages, "llama3_2_1b")
    layout = tf.rank_layout(package)
    assert layout is not None
    job = {"folder": str(packages), "module": "llama3_2_1b"}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        script = scratch / "child.py"
        script.write_text(tf.CHILD)
        whole = tf.measure(script, dict(job, view="whole"), 1, 0, scratch, None)
        prefix = scratch / "warm"
        assert tf.compile_bytecode(packages / "llama3_2_1b", prefix) > 0
        rank = tf.measure(
            script, dict(job, view="rank", layers=layout["layers"], experts=layout["experts"]), 1, 0, scratch, prefix
        )
    assert whole["params"] == sum(p.params for p in package.PARTS) == 98
    assert whole["modules"] == len(package.PARTS) + 1 and whole["with_bytecode"] == 0 and whole["others"] == []
    assert rank["with_bytecode"] == rank["modules"] == rank["parts"] + 1 < whole["modules"]
    assert rank["params"] < whole["params"] and rank["others"] == []
    assert whole["seconds"] > 0 and whole["rss_delta_mib"] == whole["rss_mib"] > 50  # torch is in every child
