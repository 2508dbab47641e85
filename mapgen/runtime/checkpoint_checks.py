"""A checkpoint against a mapping module: what load refuses (missing, unknown or misshapen
tensors, dtypes the model cannot take, HF copies that differ from their original) and how the
checkpoint stores each tensor (`LoadedFormat`), which a gathered export "as the checkpoint" writes."""

from __future__ import annotations

from pathlib import Path

import torch

from mapgen.common.layout import stacked_slice
from mapgen.runtime import memo, package
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.hf_names import per_expert_names
from mapgen.runtime.safetensors_files import DTYPES
from mapgen.runtime.formats import LoadedFormat, config_dtype
from mapgen.runtime.placement import Module, Placement


def loaded_format(module: Module, checkpoint: HFCheckpoint) -> LoadedFormat:
    """How `checkpoint` stores the module's HF tensors."""
    dtypes: dict[str, torch.dtype] = {}
    quantized: set[str] = set()
    for tensor in module.HF_TENSORS:
        if tensor.name not in checkpoint:
            continue
        stored = DTYPES.get(checkpoint.dtype(tensor.name))
        if checkpoint.dtype(tensor.name) == "MXFP4":
            # MXFP4 goes back as bfloat16, which holds every MXFP4 value exactly (e2m1 codes
            # times powers of two); mapgen writes no MXFP4
            stored = torch.bfloat16
        if stored is not None:
            dtypes[tensor.name] = stored
        if checkpoint.quantized(tensor.name) and checkpoint.dtype(tensor.name) != "MXFP4":
            quantized.add(tensor.name)
    config = checkpoint.config
    quantization = config.get("quantization_config")
    return LoadedFormat(
        dtypes,
        frozenset(quantized),
        checkpoint.block_size if quantized else None,
        dict(quantization) if isinstance(quantization, dict) and quantized else None,
        config_dtype(config),
    )


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def hf_namings(module: Module) -> tuple[tuple[str, str], ...]:
    """The module's HF_NAMINGS as (its prefix, the other naming's prefix) pairs: () for a module
    whose checkpoints name their tensors one way only."""
    return tuple(getattr(module, "HF_NAMINGS", {}).items())


def open_checkpoint(module: Module, folder: str | Path) -> HFCheckpoint:
    """The HF checkpoint in `folder` as `module` reads it: under the module's names whichever of
    its HF_NAMINGS the files use, and stacked experts served one at a time to a module of
    per-expert names (Qwen3.5-MoE's published checkpoint)."""
    unstack = per_expert_names(t.name for t in module.HF_TENSORS)
    return HFCheckpoint(folder, namings=hf_namings(module), unstack=unstack)


def hf_copies_of(module: Module) -> dict[str, tuple[str, ...]]:
    """original HF name -> the HF tensors that repeat it (the module's HF_COPIES, which a
    module without multi-token prediction does not have)."""
    found: dict[str, tuple[str, ...]] = {}
    for copy, original in getattr(module, "HF_COPIES", {}).items():
        found[original] = found.get(original, ()) + (copy,)
    return found


def copy_problems(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """Each HF copy (HF_COPIES) bit for bit equal to its original, checked by the ranks that
    import the original (megatron-core holds one tensor for both, so a copy that differs could
    not be written back): a copy that differs, or is stored in another dtype, is a problem
    naming both tensors and their files."""
    copies = hf_copies_of(module)
    if not copies:
        return []
    plans = {p.megatron_name: p for p in module.PARAMS}
    names = set(placement.local) | {module.TIED[n] for n in placement.tied}
    read = {stacked_slice(h)[0] for n in names for h in plans[n].hf_names}
    problems: list[str] = []
    for original in sorted(read & set(copies)):
        for copy in copies[original]:
            a, b = checkpoint.raw(original), checkpoint.raw(copy)
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                problems.append(
                    f"tensor '{copy}' ({checkpoint.file(copy)}) differs from '{original}' ({checkpoint.file(original)}), "
                    f"which it repeats: megatron-core holds one tensor for both, so {module.TARGET} cannot load them"
                )
    return problems


def checkpoint_problems(module: Module, checkpoint: HFCheckpoint) -> list[str]:
    """The checkpoint against the module's HF table, on any rank: every tensor present with its
    shape, none the module does not map, every file whole (see `HFCheckpoint.integrity_problems`)."""
    problems: list[str] = []
    missing = [t.name for t in module.HF_TENSORS if t.name not in checkpoint]
    problem = no_mtp_problem(module, missing)
    if problem is not None:
        problems.append(problem)
        missing = []
    problems += [f"missing tensor '{name}'" for name in missing]
    for tensor in module.HF_TENSORS:
        if tensor.name not in checkpoint:
            continue
        shape = checkpoint.shape(tensor.name)
        if shape != tensor.shape:
            problems.append(
                f"tensor '{tensor.name}' has shape {list(shape)}, {module.TARGET} expects {list(tensor.shape)}"
                f" ({checkpoint.file(tensor.name)})"
            )
    ignored = tuple(getattr(module, "IGNORED_HF", {}))
    known = {t.name for t in module.HF_TENSORS}
    if getattr(module, "partial", False):
        # a rank's view of a package: every rank checks its own tensors are there (above), and
        # together they cover the target, so a checkpoint with no more tensors than the target
        # maps has none it does not; with more, the whole target's table names them
        if sum(1 for n in checkpoint.names() if not n.startswith(ignored)) <= getattr(module, "HF_COUNT"):
            return problems + checkpoint.integrity_problems()
        known = {t.name for t in package.whole(getattr(module, "package")).HF_TENSORS}
    unknown = sorted(n for n in checkpoint.names() if n not in known and not n.startswith(ignored))
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) in the checkpoint that {module.TARGET} does not map "
            f"(a checkpoint of another model?): {', '.join(unknown[:10])}"
        )
    problems += checkpoint.integrity_problems()
    return problems


def no_mtp_problem(module: Module, missing: list[str]) -> str | None:
    """One problem for a checkpoint that lacks every multi-token-prediction tensor of a module
    with MTP layers (transformers drops them when it loads, so a model it saved has none), and
    nothing else: the config field that builds the module without them. None otherwise."""
    layers = getattr(getattr(module, "DIMS", None), "mtp_num_layers", 0) or 0
    if not layers or not missing:
        return None
    main = {stacked_slice(h)[0] for p in module.PARAMS if not p.megatron_name.startswith("mtp.") for h in p.hf_names}
    mtp = [t.name for t in module.HF_TENSORS if t.name not in main]
    if not mtp or sorted(missing) != sorted(mtp):
        return None
    return (
        f"the checkpoint has none of the {len(mtp)} tensors of {module.TARGET}'s {layers} multi-token-prediction "
        f"(MTP) layer(s), such as '{mtp[0]}': a model saved by transformers drops them. Rebuild the module from a "
        f"config.json with \"num_nextn_predict_layers\": 0 (the module was built with {layers}) to map this checkpoint "
        "without MTP, or load the published checkpoint, which has them"
    )


def load_problems(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """`_checkpoint_problems`, found once per process for the same checkpoint headers, file sizes,
    folder, layout and model dtypes (all it depends on): a copy of the list."""
    if placement.key is None:
        return _checkpoint_problems(module, checkpoint, placement)
    dtypes = tuple(t.dtype for t in placement.local.values())
    key = ("checked", checkpoint.serial, checkpoint.sizes, str(checkpoint.folder), placement.key, dtypes)
    return list(memo.once(module, key, lambda: tuple(_checkpoint_problems(module, checkpoint, placement))))


def _checkpoint_problems(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """`checkpoint_problems`, and the dtype of each tensor this rank loads against the tensor it
    loads into: the same dtype, or one that converts to it exactly (bfloat16 or float16 into a
    float32 model: a checkpoint published in bfloat16, trained in float32). An FP8
    block-quantized weight is dequantized, so any model dtype; a tensor the HF model keeps in
    float32 (`HFTensorPlan.float32`, transformers' `_keep_in_fp32_modules_strict`) may be
    float32 whatever the model's dtype, as transformers and mapgen's own export write it."""
    problems = checkpoint_problems(module, checkpoint)
    plans = {p.megatron_name: p for p in module.PARAMS}
    into = {stacked_slice(n)[0]: t.dtype for name, t in placement.local.items() for n in plans[name].hf_names}
    for tensor in module.HF_TENSORS:
        expected = into.get(tensor.name)
        if expected is None or tensor.name not in checkpoint or checkpoint.quantized(tensor.name):
            continue
        stored = checkpoint.dtype(tensor.name)
        if stored == "F32" and tensor.float32:
            continue
        if expected == torch.float32 and stored in ("BF16", "F16"):
            continue
        if stored != _SAFETENSORS_DTYPES.get(expected, stored):
            model_dtype = str(expected).removeprefix("torch.")
            problems.append(f"tensor '{tensor.name}' is {stored}, the model is {model_dtype} ({checkpoint.file(tensor.name)})")
    return problems
