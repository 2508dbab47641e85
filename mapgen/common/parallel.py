"""The parallel layout of a megatron-core job (TP, PP, VPP, EP, expert-TP, DP sizes) and what is
wrong with it on its own. Torch-free.

One type serves the compiler (building a model, initialising megatron-core's parallel state),
the runtime's shard map, `mapgen explain`, `verify` and `convert`. Its checks, here and nowhere
else, are the ones that need no module: every size a positive integer within mapgen's limits
(`mapgen.common.limits`), virtual stages only with two pipeline stages or more, and each
pipeline stage's tp x dp ranks holding the expert grid (expert-TP x EP). What a module adds
(heads, experts, layers to place) its users check. Names are said as `tp` or, with `flags`, as
the command line's `--tp`.

`dp` is a plain number, 1 unless given: a caller with a rule of its own for it (the CLI's
verify and explain: EP, at least 1; convert: `smallest_dp`) says so when it makes the layout.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from mapgen.common.limits import MAX_VIRTUAL_STAGES, MAX_VOCAB_DIVISIBLE_BY, MAX_WORLD_SIZE

SIZES = ("tp", "pp", "vpp", "ep", "dp")  # always given; the others may be None


def _shown(name: str, flags: bool) -> str:
    return f"--{name.replace('_', '-')}" if flags else name


def limit_problems(sizes: Mapping[str, object], flags: bool = True) -> list[str]:
    """Each size of a parallel layout beyond mapgen's limits, by name (`--tp` with `flags`, else
    `tp`): `sizes` maps tp, pp, vpp, ep, etp, dp and make_vocab_size_divisible_by (any may be
    missing or None) to values; values that are not positive integers are left to
    `size_problems`."""

    def given(name: str) -> int | None:
        value = sizes.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    found = []
    for name, limit, what in (
        *((name, MAX_WORLD_SIZE, "ranks") for name in ("tp", "pp", "ep", "etp", "dp")),
        ("vpp", MAX_VIRTUAL_STAGES, "virtual pipeline stages"),
        ("make_vocab_size_divisible_by", MAX_VOCAB_DIVISIBLE_BY, "(Megatron-LM's default: 128)"),
    ):
        value = given(name)
        if value is not None and value > limit:
            found.append(f"{_shown(name, flags)} {value} is above mapgen's limit of {limit:,}" + (f" {what}" if what else ""))
    tp, pp, dp = given("tp"), given("pp"), given("dp")
    if not found and tp and pp and dp and tp * pp * dp > MAX_WORLD_SIZE:
        found.append(
            f"{_shown('tp', flags)} {tp} x {_shown('pp', flags)} {pp} x {_shown('dp', flags)} {dp} = {tp * pp * dp:,} "
            f"ranks is above mapgen's limit of {MAX_WORLD_SIZE:,} ranks"
        )
    return found


def size_problems(sizes: Mapping[str, object], flags: bool = True, required: Collection[str] = SIZES) -> list[str]:
    """Each size that is not a positive integer, or else each beyond mapgen's limits
    (`limit_problems`), by name: `sizes` maps tp, pp, vpp, ep, dp and etp, first_stage_layers,
    last_stage_layers, make_vocab_size_divisible_by to values; a name outside `required` may be
    None (not given). The CLI checks its flags with it before torch is imported."""
    found = []
    for name, value in sizes.items():
        if value is None and name not in required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            found.append(f"{_shown(name, flags)} must be a positive integer, got {value!r}")
    return found or limit_problems(sizes, flags)


def smallest_dp(tp: int, ep: int, etp: int | None) -> int:
    """The fewest data-parallel replicas megatron-core accepts for the layout: each pipeline
    stage's tp x dp ranks must hold the expert grid (expert-TP x EP)."""
    sizes = (tp, ep, etp or tp)
    if any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes):
        return 1  # size_problems says what is wrong with the sizes
    grid = ep * (etp or tp)
    return grid // math.gcd(tp, grid)


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes of a megatron-core job. `etp` None: expert-TP = TP. `first_stage_layers`,
    `last_stage_layers`: an uneven pipeline's first and last stages. `make_vocab_size_divisible_by`:
    Megatron-LM's vocabulary padding (to a multiple of it x TP; 1: of TP)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    dp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    make_vocab_size_divisible_by: int = 1

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def sizes(self) -> dict[str, int | None]:
        """The sizes by field name."""
        return {
            "tp": self.tp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep, "dp": self.dp, "etp": self.etp,
            "first_stage_layers": self.first_stage_layers, "last_stage_layers": self.last_stage_layers,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
        }

    def label(self, dp: bool = True) -> str:
        """`tp2xpp2xvpp2xlayers1/-xep2xetp1xdp2`: the sizes that are set; `dp`: with DP."""
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            first = "-" if self.first_stage_layers is None else self.first_stage_layers
            last = "-" if self.last_stage_layers is None else self.last_stage_layers
            parts.append(f"layers{first}/{last}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp is not None:
            parts.append(f"etp{self.etp}")
        if dp and self.dp > 1:
            parts.append(f"dp{self.dp}")
        return "x".join(parts)

    def __str__(self) -> str:
        return self.label()

    def size_problems(self, flags: bool = False) -> list[str]:
        """Each size that is not a positive integer, or else each beyond mapgen's limits."""
        return size_problems(self.sizes(), flags, (*SIZES, "make_vocab_size_divisible_by"))

    def stage_problems(self, flags: bool = False) -> list[str]:
        """Virtual pipeline stages without two pipeline stages to interleave."""
        if self.vpp > 1 and self.pp < 2:
            vpp, pp = _shown("vpp", flags), _shown("pp", flags)
            return [f"{vpp} {self.vpp} needs {pp} 2 or more (virtual stages interleave pipeline stages; {pp} {self.pp} has one)"]
        return []

    def grid_problems(self) -> list[str]:
        """Each pipeline stage's tp x dp ranks must hold the expert grid (expert-TP x EP)."""
        grid, per_stage = self.ep * self.expert_tp, self.tp * self.dp
        if per_stage % grid:
            return [f"each pipeline stage has tp x dp = {per_stage} ranks, which expert-TP x EP = {grid} does not divide (raise dp)"]
        return []

    def problems(self) -> list[str]:
        """What megatron-core would refuse about this layout whatever the model, said up front:
        the sizes first (nothing else is asked of sizes that are not numbers)."""
        return self.size_problems() or self.stage_problems() + self.grid_problems()
