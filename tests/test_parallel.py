"""The one parallel layout type (`mapgen.common.parallel`): its checks, its names, its label."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from mapgen.common.limits import MAX_WORLD_SIZE
from mapgen.common.parallel import ParallelLayout, size_problems, smallest_dp
from mapgen.verify import testing


def test_it_imports_no_torch() -> None:
    """The compiler and the runtime both take it, and the CLI checks sizes before torch loads."""
    code = "import sys, mapgen.common.parallel; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=testing.ROOT)


def test_dp_is_one_unless_given() -> None:
    """No rule hidden in the type: EP does not raise DP (the CLI's defaults are the callers')."""
    layout = ParallelLayout(tp=2, ep=2)
    assert layout.dp == 1 and layout.world_size == 2
    assert layout.grid_problems() == [
        "each pipeline stage has tp x dp = 2 ranks, which expert-TP x EP = 4 does not divide (raise dp)"
    ]
    assert ParallelLayout(tp=2, ep=2, dp=2).problems() == []


def test_the_label_names_the_sizes_that_are_set() -> None:
    layout = ParallelLayout(tp=2, pp=2, vpp=2, ep=2, etp=1, dp=2, first_stage_layers=2)
    assert str(layout) == "tp2xpp2xvpp2xlayers2/-xep2xetp1xdp2"
    assert layout.label(dp=False) == "tp2xpp2xvpp2xlayers2/-xep2xetp1"
    assert str(ParallelLayout()) == "tp1xpp1"


def test_names_are_fields_or_flags() -> None:
    """The same check, said in the Python API's terms or the command line's."""
    bad = ParallelLayout(tp=0, etp=-1, make_vocab_size_divisible_by=0)
    assert bad.size_problems() == [
        "tp must be a positive integer, got 0",
        "etp must be a positive integer, got -1",
        "make_vocab_size_divisible_by must be a positive integer, got 0",
    ]
    assert bad.size_problems(flags=True)[0] == "--tp must be a positive integer, got 0"
    assert bad.problems() == bad.size_problems()  # nothing else is asked of sizes that are not numbers
    interleaved = ParallelLayout(vpp=2)
    assert interleaved.stage_problems() == ["vpp 2 needs pp 2 or more (virtual stages interleave pipeline stages; pp 1 has one)"]
    assert interleaved.stage_problems(flags=True) == [
        "--vpp 2 needs --pp 2 or more (virtual stages interleave pipeline stages; --pp 1 has one)"
    ]
    assert ParallelLayout(pp=2, vpp=2).stage_problems() == []


def test_limits_are_checked_after_positivity() -> None:
    assert ParallelLayout(tp=MAX_WORLD_SIZE * 2, pp=0).problems() == ["pp must be a positive integer, got 0"]
    assert ParallelLayout(tp=2, pp=2, dp=MAX_WORLD_SIZE // 2).problems() == [
        f"tp 2 x pp 2 x dp {MAX_WORLD_SIZE // 2} = {2 * MAX_WORLD_SIZE:,} ranks is above mapgen's limit of "
        f"{MAX_WORLD_SIZE:,} ranks"
    ]
    # flags the CLI leaves out (None) are not asked for; the required ones are
    assert size_problems({"tp": 1, "etp": None, "make_vocab_size_divisible_by": None}) == []
    assert size_problems({"tp": None}) == ["--tp must be a positive integer, got None"]


@pytest.mark.parametrize(("tp", "ep", "etp"), list(itertools.product((1, 2, 3, 4, 8), (1, 2, 4, 6), (None, 1, 2, 4))))
def test_smallest_dp_is_the_fewest_replicas_that_hold_the_expert_grid(tp: int, ep: int, etp: int | None) -> None:
    dp = smallest_dp(tp, ep, etp)
    assert ParallelLayout(tp=tp, ep=ep, etp=etp, dp=dp).grid_problems() == []
    assert all(ParallelLayout(tp=tp, ep=ep, etp=etp, dp=fewer).grid_problems() for fewer in range(1, dp))
