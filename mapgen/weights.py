"""One-call jobs between an HF checkpoint folder and megatron-core model chunks, named as
transformers and Megatron-Bridge users know them: load a module, build and load, load into
existing chunks, export, save.

Every function here that touches weights is a collective: call it on every rank of the job, at
the same point, with the same arguments (each rank passes its own chunks). The parallel layout
is megatron-core's `parallel_state`, and the vocabulary padding is Megatron-LM's (128 x TP by
default, as `mapgen.build_model` pads it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mapgen.common.errors import MapgenError
from mapgen.common.files import module_label
from mapgen.runtime.context import ParallelContext
from mapgen.runtime.safetensors_files import CheckpointError
from mapgen.runtime.hf_names import per_expert_names
from mapgen.runtime.checkpoint_checks import hf_namings, open_checkpoint
from mapgen.runtime.drivers import Converter
from mapgen.runtime.module_check import check_module
from mapgen.runtime.save import save_hf_checkpoint
from mapgen.runtime.package import import_path

MEGATRON_LM_PADDING = 128  # Megatron-LM's make_vocab_size_divisible_by


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """A generated module from its path: a target package's folder or a one-file module (an
    importable one is simply imported: `from my_project import llama_map`). Imports no part of a
    package: a Converter imports the parts its rank holds."""
    where = Path(path)
    package = where.is_dir()
    file = where / "__init__.py" if package else where
    if not file.is_file():
        raise MapgenError(f"{where}: neither a target package's folder (with __init__.py) nor a module file")
    module_name = name or f"mapgen_module_{''.join(c if c.isalnum() else '_' for c in module_label(where))}"
    held = sys.modules.get(module_name)
    if held is not None and Path(getattr(held, "__file__", "") or "").resolve() == file.resolve():
        return held  # loaded already: the same module object, so the runtime's plans made for it are reused
    module = import_path(where, module_name)
    try:
        check_module(module, f"load_module({where})")
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def converter(module: Any, chunks: list[Any], *, make_vocab_size_divisible_by: int = MEGATRON_LM_PADDING) -> Converter:
    """A Converter for this rank's chunks under megatron-core's current parallel layout: hold it
    for repeated exports (an RL job's weight sync)."""
    return Converter(module, chunks, ParallelContext.from_parallel_state(), make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def load_hf_weights(
    module: Any, chunks: list[Any], hf_dir: str | Path, *, make_vocab_size_divisible_by: int = MEGATRON_LM_PADDING
) -> int:
    """Fill existing chunks from the HF checkpoint in `hf_dir` (every rank; each reads only what
    it holds); returns how many parameters this rank filled."""
    return converter(module, chunks, make_vocab_size_divisible_by=make_vocab_size_divisible_by).load(hf_dir)


def from_hf_pretrained(
    module: Any,
    hf_dir: str | Path,
    *,
    spec: str = "local",
    dtype: torch.dtype | str | None = None,
    make_vocab_size_divisible_by: int = MEGATRON_LM_PADDING,
    **overrides: Any,
) -> list[Any]:
    """Build this rank's chunks (`mapgen.build_model`) and load the HF checkpoint into them
    (every rank)."""
    from mapgen.model import build_model

    chunks = build_model(
        module, spec=spec, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by, **overrides
    )
    load_hf_weights(module, chunks, hf_dir, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    return chunks


def export_hf_weights(
    module: Any, chunks: list[Any], *, make_vocab_size_divisible_by: int = MEGATRON_LM_PADDING, **export: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for the whole model, on every rank; every rank must iterate it to
    the end (the gathers run inside). `export` as `Converter.export` (bucket_bytes, dtype, fp8,
    mxfp8, nvfp4, ...)."""
    return converter(module, chunks, make_vocab_size_divisible_by=make_vocab_size_divisible_by).export(**export)


def save_hf_pretrained(
    module: Any,
    chunks: list[Any],
    out_dir: str | Path,
    hf_config: dict[str, Any] | str | Path,
    *,
    make_vocab_size_divisible_by: int = MEGATRON_LM_PADDING,
    **save: Any,
) -> None:
    """Write an HF checkpoint folder (safetensors shards, index, config.json) from the chunks,
    atomically (every rank; global rank 0 writes). `hf_config` is config.json's content, or the
    path of a config.json or of a folder holding one (the checkpoint loaded: its tensors' naming
    is kept, such as a LLaVA saved by transformers 5, and its layers' experts are written stacked
    where it stacked them, as Qwen3.5-MoE's published checkpoint). `save` as `save_hf_checkpoint` (dtype,
    fp8, mxfp8, nvfp4, overwrite, max_shard_bytes, ...)."""
    if isinstance(hf_config, (str, Path)) and Path(hf_config).is_dir():  # the checkpoint loaded: its layout kept
        naming, stacked = _layout(module, Path(hf_config))
        save.setdefault("naming", naming)
        if not any(save.get(q) for q in ("fp8", "mxfp8", "nvfp4")):  # quantized experts are written one each
            save.setdefault("stacked_experts", stacked)
    save_hf_checkpoint(
        module, chunks, out_dir, _config(hf_config), ParallelContext.from_parallel_state(),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, **save,
    )


def _layout(module: Any, folder: Path) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, int], ...]]:
    """The other naming (the module's HF_NAMINGS) the checkpoint in `folder` uses, and the layers
    whose experts it stores stacked where the module maps them one each, from its headers; ((), ())
    where it uses the module's names and layout, or holds no checkpoint."""
    if not hf_namings(module) and not per_expert_names(t.name for t in module.HF_TENSORS):
        return (), ()
    try:
        checkpoint = open_checkpoint(module, folder)
    except CheckpointError:
        return (), ()
    return checkpoint.naming, checkpoint.unstacked


def _config(hf_config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return hf_config
    path = Path(hf_config)
    if path.is_dir():
        path = path / "config.json"
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MapgenError(f"hf_config {path}: cannot read it as config.json: {exc}") from None
    if not isinstance(value, dict):
        raise MapgenError(f"hf_config {path}: config.json holds a {type(value).__name__}, not an object")
    return value
