"""A conversion and its result: what `mapgen convert` runs on every rank, and what each rank gives back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from mapgen.common.files import module_label
from mapgen.common.parallel import ParallelLayout
from mapgen.megatron_checkpoint import iteration_folder

DIRECTIONS = ("hf-to-megatron", "megatron-to-hf")


@dataclass(frozen=True)
class ConvertJob:
    """One conversion. `module_path`: a local-layout module (a `te` module's local twin);
    `key_style`: the layer spec whose tensor names the Megatron checkpoint has ("te", "local")."""

    direction: str
    module_path: str
    source: str  # the HF folder, or the Megatron checkpoint folder (CKPT_DIR)
    out: str
    layout: ParallelLayout
    hf_config: dict[str, Any] = field(default_factory=dict)  # config.json: recorded, or written
    dtype: str | None = None  # the output's dtype; None: the source's
    make_vocab_size_divisible_by: int = 1  # hf-to-megatron: Megatron-LM's padding, x TP
    iteration: int | None = None  # hf-to-megatron: None writes a release checkpoint
    overwrite: bool = False
    key_style: str = "local"
    progress: bool = True  # rank 0 draws progress bars on stderr (where it is a terminal)


@dataclass
class ConvertResult:
    job: ConvertJob
    rank: int
    error: str | None = None
    bad_input: bool = False  # error is a clear, agreed report (exit 2), not a crash
    params: int = 0  # parameters this rank converted
    tensors: int = 0  # HF tensors (megatron-to-hf) or checkpoint tensors (hf-to-megatron)
    dtype: str = ""
    vocab_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: list[float] = field(default_factory=list)  # every rank's peak resident set
    start_mib: list[float] = field(default_factory=list)  # every rank's resident set at the start
    phase_peak_mib: dict[str, float] = field(default_factory=dict)  # this rank's peak after each phase
    created: list[str] = field(default_factory=list)  # folders made above the output folder (`convert`)

    def summary(self) -> str:
        job = self.job
        name = module_label(job.module_path)
        if self.error is not None:
            return f"convert {job.direction} {name} {job.layout}: FAILED\n{self.error}"
        total = sum(self.seconds.values())
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.seconds.items())
        what = (
            f"{job.out} ({iteration_folder(job.iteration)}, torch_dist, {self.tensors} tensors, {job.key_style} names)"
            if job.direction == "hf-to-megatron"
            else f"{job.out} ({self.tensors} HF tensors)"
        )
        peaks = ", ".join(f"{p:.0f}" for p in self.peak_mib)
        above = ", ".join(f"+{p - s:.0f}" for p, s in zip(self.peak_mib, self.start_mib))
        return (
            f"convert {job.direction} {name} {job.layout}: wrote {what}, {self.dtype}, vocabulary rows "
            f"{self.vocab_rows}, in {total:.1f} s ({steps}); peak resident set per rank {peaks} MiB "
            f"({above} MiB during the conversion)"
        )


def dims_record(module: ModuleType) -> dict[str, Any]:
    """The module's DIMS as JSON gives them back."""
    value: dict[str, Any] = json.loads(json.dumps(asdict(module.DIMS)))
    return value
