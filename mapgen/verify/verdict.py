"""How a verification decides: its job and result, the model's dtype, the logit tolerance, bit-for-bit equality.

Shared by the language models' check (`jobs.run_job`) and LLaVA's (`llava.run_llava_job`): each
rank compares what it holds, every rank reaches `agree_on_logits`, and rank 0's `Result` is the
verdict `mapgen verify` prints.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mapgen.common.errors import MapgenError
from mapgen.common.files import module_label
from mapgen.common.parallel import ParallelLayout
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.safetensors_files import DTYPES

FLOAT32_TOLERANCE = 1e-5  # max abs logit difference in float32 (measured: 1.5e-7 to 2.4e-7)
HALF_EPSILONS = 16  # in bfloat16 or float16: this many epsilons of the largest logit (logit_tolerance)
_FLOATS = ("F32", "BF16", "F16")  # safetensors spellings a model's dtype can be taken from


@dataclass(frozen=True)
class Job:
    """One verification: a module file (local layout), an HF folder, a layout."""

    module_path: str
    hf_dir: str
    layout: ParallelLayout
    make_vocab_size_divisible_by: int = 1  # Megatron-LM's vocabulary padding, x TP
    progress: str | None = None  # a file rank 0 appends each phase's name to (a line each), or None
    scratch: str | None = None  # a folder the ranks may write in (the CLI's temporary one), or None


def report_phase(job: Job, phase: str) -> None:
    """Rank 0 says which phase `job` has reached: a line appended to `job.progress`, which the
    process that started the ranks follows (`mapgen.common.console.Phases.follow`)."""
    if job.progress is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    try:
        with open(job.progress, "a", encoding="utf-8") as file:
            file.write(phase.replace("\n", " ") + "\n")
    except OSError:  # progress is a courtesy: the verification goes on without it
        pass


@dataclass
class Result:
    job: Job
    rank: int
    error: str | None = None
    tensors: int = 0
    bit_exact: int = 0
    mismatched: list[str] = field(default_factory=list)
    max_logit_diff: float = float("nan")
    dtype: str = "float32"
    tolerance: float = FLOAT32_TOLERANCE
    vocab: tuple[int, int] = (0, 0)  # HF vocabulary, the model's padded one
    max_pad_logit: float = 0.0  # largest |logit| of a pad row: zero rows give exactly 0
    nonfinite: list[str] = field(default_factory=list)  # checkpoint tensors holding NaN or inf
    parts: dict[str, float] = field(default_factory=dict)  # LLaVA: max diff of each output compared

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.tensors > 0
            and self.bit_exact == self.tensors
            and math.isfinite(self.max_logit_diff)
            and self.max_logit_diff <= self.tolerance
            and self.max_pad_logit == 0.0
        )

    def summary(self) -> str:
        name = module_label(self.job.module_path)
        if self.error is not None:
            return f"verify {name} {self.job.layout}: FAILED\n{self.error}"
        verdict = "OK" if self.ok else "FAILED"
        vocab, padded = self.vocab
        padding = f", vocab {vocab} padded to {padded} (pad logits max {self.max_pad_logit:.3g})" if padded > vocab else ""
        line = (
            f"verify {name} {self.job.layout}: {self.tensors} tensors checked, "
            f"{self.bit_exact} bit-exact, {self.dtype}{padding}, max logit diff "
            f"{self.max_logit_diff:.3g} (tolerance {self.tolerance:.3g}): {verdict}"
        )
        if self.parts:
            line = line.replace(" max logit diff ", " max diff ", 1)
            line += "\n  " + ", ".join(f"{name} {diff:.3g}" for name, diff in self.parts.items())
        if self.mismatched:
            line += "\n  differ: " + ", ".join(self.mismatched)
        if math.isnan(self.max_logit_diff):
            line += "\n  the logits are NaN, so they prove nothing about the mapping: " + (
                "the checkpoint holds NaN or inf in " + ", ".join(self.nonfinite)
                if self.nonfinite
                else "no tensor of the checkpoint holds NaN or inf"
            )
        return line


def agree_on_logits(found: torch.Tensor, result: Result, original: HFCheckpoint) -> None:
    """Every rank reaches this collective: `found` (max logit diff, max |pad logit|, tolerance,
    0) becomes the largest of each over all ranks, in `result`. NaN is not ordered (a MAX
    reduction may drop it): it travels as a flag in found[3], and names the checkpoint's
    non-finite tensors."""
    found[3] = float(bool(found[:2].isnan().any()))
    found[:2] = found[:2].nan_to_num(nan=float("inf"))
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    result.max_logit_diff, result.max_pad_logit, result.tolerance = map(float, found[:3])
    if found[3]:
        result.max_logit_diff = float("nan")
        result.nonfinite = nonfinite_tensors(original)


def cannot_equal(ours: torch.Tensor, theirs: torch.Tensor, stored: str, model: str) -> str:
    """Why an exported tensor cannot equal the stored one whatever the mapping does, or ''."""
    if ours.dtype != theirs.dtype:
        return (
            f" (stored as {stored}, but the model runs in {model}, the checkpoint's most common float dtype, "
            f"so export gives {str(ours.dtype).removeprefix('torch.')}: one tensor of another dtype)"
        )
    if ours.shape != theirs.shape:
        return f" (exported {list(ours.shape)}, stored {list(theirs.shape)})"
    return ""


def same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Bit for bit: dtype, shape and every byte (NaN equals the same NaN, 0.0 is not -0.0)."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return False
    return torch.equal(ours.contiguous().reshape(-1).view(torch.uint8), theirs.contiguous().reshape(-1).view(torch.uint8))


def nonfinite_tensors(checkpoint: HFCheckpoint) -> list[str]:
    """Each float tensor of the checkpoint that holds NaN or inf, with how many such values."""
    found = []
    for name in checkpoint.names():
        tensor = checkpoint.get(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            counts = ", ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
            found.append(f"{name} ({counts}, {checkpoint.file(name).name})")
    return found


def checkpoint_dtype(checkpoint: HFCheckpoint) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: the most common among its float tensors
    that are not FP8-quantized (a float32 router bias in a bf16 checkpoint does not count)."""
    stored = Counter(
        checkpoint.dtype(n) for n in checkpoint.names() if not checkpoint.quantized(n) and checkpoint.dtype(n) in _FLOATS
    )
    if not stored:
        raise MapgenError(f"{checkpoint.folder}: no float32, bfloat16 or float16 tensor to take the model's dtype from")
    return DTYPES[stored.most_common(1)[0][0]]


def logit_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """How far megatron-core's logits may be from transformers' `reference` logits, both computed
    in `dtype` on the same weights: FLOAT32_TOLERANCE in float32; in a 16-bit dtype,
    HALF_EPSILONS of its epsilons (bfloat16: 2**-7) times the largest reference logit.

    Each forward rounds every matmul, norm and residual sum to the dtype, in its own order, so
    each ends a few epsilons of the logit scale from the exact result. Measured on the bf16
    stand-ins against transformers in float32 on the same weights: megatron-core 0.7 to 1.4 and
    transformers 0.6 to 1.3 epsilons (Llama, Qwen3-MoE); up to 6.3 between the two for Mixtral,
    whose top-2 routing can break a near tie differently. A misplaced shard moves them by far
    more (a wrong column order of one o_proj: about 140); subtler mistakes that bf16 noise hides
    are what the float32 check is for."""
    if dtype == torch.float32:
        return FLOAT32_TOLERANCE
    return float(HALF_EPSILONS * torch.finfo(dtype).eps * reference.abs().max())
