"""`mapgen convert`: HF checkpoints to and from megatron-core distributed checkpoints.

The offline path of Megatron-LM users: `--ckpt-format torch_dist --load CKPT_DIR`. A checkpoint
here is Megatron-LM's layout, read as files by `mapgen.megatron_checkpoint`.

`common.pt` holds what Megatron-LM's `load_checkpoint` reads besides the tensors:
`checkpoint_version` 3.0, `iteration`, and the model's sharded state under `model` (or
`model0`, `model1`, ... one per virtual pipeline chunk), written by
`megatron.core.dist_checkpointing.save` from the model's own `sharded_state_dict()`. No `args`:
Megatron-LM's loader does without them (it says "could not find arguments in the checkpoint"
and takes TP and PP as 1 for its RNG decisions, which a release checkpoint skips anyway), while
a partial argument namespace would make its `check_checkpoint_args` fail on fields mapgen cannot
know (the tokenizer). A release checkpoint loads with iteration 0 and without optimizer or RNG
state, as a converted checkpoint should.

hf-to-megatron: every rank builds the megatron-core model for the layout (local layer spec, on
CPU), imports the HF checkpoint through the module (`Converter.load`), and megatron-core writes
the distributed checkpoint into a hidden folder beside CKPT_DIR that is renamed into place at
the end (the staging of `save_hf_checkpoint`): a failure leaves nothing. megatron-to-hf: the
model is built for the (any) layout, megatron-core loads and reshards the checkpoint into it,
and `save_hf_checkpoint` exports and writes the HF checkpoint.

The checkpoint's tensor names are megatron-core's: for a `te` module those of its
TransformerEngine layer spec (what Megatron-LM runs on GPUs), for a `local` module those of the
local spec. The two differ where the local spec does not map a norm to the TE name (the
pre-MLP norm of MoE layers, MLA's q/kv norms, MLA's pre-MLP norm of dense layers); the model
here is always local, so its keys are renamed to the TE ones for a `te` module
(`mapgen.compiler.inventory.to_te_layout`, the rename the compiler uses). Reading accepts either.

Everything that can be known before processes start is checked before (`preflight`): the
module, the layout against its DIMS, the HF checkpoint, the Megatron checkpoint's tracker,
folder, metadata and record, the output folder. The model against the checkpoint (every tensor
present with its global shape, every model tensor of the checkpoint used by some rank) is
checked on every rank and agreed on before megatron-core reads a byte.

Here: the checks before any process starts (`preflight`) and the start of the ranks
(`convert`). The job and its result: `mapgen.convert_job`; each rank's work:
`mapgen.convert_rank`; the model's sharded state under the checkpoint's keys:
`mapgen.sharded_state`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch.distributed as dist

from mapgen.common.console import native_stdout_silenced
from mapgen.common.errors import MapgenError
from mapgen.common.limits import MAX_SPAWNED
from mapgen.common.parallel import ParallelLayout, size_problems
from mapgen.compiler.megatron_config import DTYPES
from mapgen.compiler.model_classes import model_class
from mapgen.convert_job import DIRECTIONS, ConvertJob, ConvertResult, dims_record
from mapgen.convert_rank import run_convert
from mapgen.megatron_checkpoint import MegatronCheckpoint, read_megatron_checkpoint
from mapgen.verify.arguments import output_problems
from mapgen.verify.inputs import hf_problems, load_mapping_module
from mapgen.verify.jobs import layout_problems
from mapgen.verify.processes import spawn


# --- before any process starts ---


def preflight(job: ConvertJob, world_size: int | None = None) -> list[str]:
    """What is wrong with `job` that is known before any process starts (the module is loaded
    once: a DeepSeek-V3 module is 37 MB of Python)."""
    if job.direction not in DIRECTIONS:
        return [f"direction must be one of {', '.join(DIRECTIONS)}, not {job.direction!r}"]
    module = load_mapping_module(job.module_path)
    if not model_class(getattr(module, "MODEL", "gpt")).converts:
        return [
            f"{module.TARGET} maps megatron-core's {module.MODEL} model; mapgen convert writes and reads GPTModel "
            "checkpoints (and Nemotron-H's Mamba model)"
        ]
    if job.dtype is not None and job.dtype not in DTYPES:
        return [f"--dtype must be one of {', '.join(DTYPES)}, not {job.dtype!r}"]
    found = output_problems(Path(job.out), job.overwrite, Path(job.source))  # also the CLI's, before torch
    found += [f"layout {job.layout}: {problem}" for problem in layout_problems(module, job.layout)]
    dims = module.DIMS
    if job.layout.pp > 1 and dims.share_embeddings_and_output_weights and dims.mtp_num_layers:
        found.append(
            f"layout {job.layout}: {module.TARGET} ties its embeddings to its output layer and has an MTP layer; "
            "megatron-core's GPTModel cannot checkpoint such a model at PP > 1 (its last stage holds an output "
            "weight that its sharded_state_dict asserts is absent, in 0.16 and 0.19 alike): convert at --pp 1"
        )
    if world_size is not None and world_size != job.layout.world_size:
        found.append(f"layout {job.layout} needs tp x pp x dp = {job.layout.world_size} processes, torchrun started {world_size}")
    elif world_size is None and job.layout.world_size > MAX_SPAWNED:
        found.append(f"layout {job.layout} needs {job.layout.world_size} processes; mapgen convert starts at most {MAX_SPAWNED} (use torchrun)")
    if job.direction == "hf-to-megatron":
        found += size_problems({"make_vocab_size_divisible_by": job.make_vocab_size_divisible_by})
        if job.iteration is not None and job.iteration < 0:
            found.append(f"--iteration must be 0 or more, not {job.iteration}")
        return found + hf_problems(module, Path(job.source))
    try:
        checkpoint = read_megatron_checkpoint(job.source)
    except MapgenError as exc:
        return found + [str(exc)]
    return found + checkpoint_problems(module, checkpoint, job.layout)


def checkpoint_problems(module: ModuleType, checkpoint: MegatronCheckpoint, layout: ParallelLayout) -> list[str]:
    """The Megatron checkpoint against the module, from its files: mapgen's record of the model
    it was written for, its vocabulary rows against the HF vocabulary and TP."""
    found: list[str] = []
    where = checkpoint.root
    if checkpoint.record is not None:
        theirs, ours = checkpoint.record.get("dims"), dims_record(module)
        if isinstance(theirs, dict) and theirs != ours:
            differ = [f"{k} {theirs.get(k)!r} (module: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
            found.append(
                f"{where}: a checkpoint of another model: written for {checkpoint.record.get('target')}, whose dims "
                f"differ from {module.TARGET}'s: " + "; ".join(differ[:8])
            )
    if not checkpoint.model_tensors():
        found.append(f"{checkpoint.folder}: holds no model tensors (embedding.*, decoder.*, output_layer.*)")
    rows = checkpoint.vocab_rows
    vocab = module.DIMS.vocab_size
    if rows is not None and rows < vocab:
        found.append(
            f"{where}: a checkpoint of another model: its vocabulary has {rows} rows, fewer than the {vocab} of {module.TARGET}"
        )
    elif rows is not None and rows % layout.tp:
        found.append(f"layout {layout}: --tp {layout.tp} does not divide the checkpoint's {rows} vocabulary rows")
    hidden = checkpoint.tensors.get("embedding.word_embeddings.weight", ((0, module.DIMS.hidden_size), None))[0]
    if len(hidden) == 2 and hidden[1] != module.DIMS.hidden_size:
        found.append(
            f"{where}: a checkpoint of another model: hidden size {hidden[1]} "
            f"(embedding.word_embeddings.weight), {module.TARGET} has {module.DIMS.hidden_size}"
        )
    return found



def convert(job: ConvertJob) -> ConvertResult:
    """Run `job` on the layout's processes: started here (gloo on CPU), or the ones torchrun
    started. Raises MapgenError for what `preflight` finds, before any process starts; returns
    rank 0's result (this rank's under torchrun). Missing folders above the output folder are
    created (by rank 0), and removed again when the conversion fails."""
    from mapgen.compiler.write import make_folders

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if problems := preflight(job, int(os.environ["WORLD_SIZE"]) if torchrun else None):
        raise MapgenError(f"cannot convert {job.source} with {job.module_path}:\n  " + "\n  ".join(problems))
    created = make_folders(Path(job.out).parent) if os.environ.get("RANK", "0") == "0" else []
    result: ConvertResult | None = None
    try:
        if torchrun:
            if not dist.is_initialized():
                with native_stdout_silenced():
                    dist.init_process_group("gloo")
            result = run_convert(job)
        else:
            result = spawn([(run_convert, (job,))], job.layout.world_size, what="conversion")[0][0]
        result.created = [str(folder) for folder in created]
    finally:
        if result is None or result.error is not None:
            for folder in reversed(created):  # innermost first; a folder someone filled since stays
                try:
                    folder.rmdir()
                except OSError:
                    break
    return result
