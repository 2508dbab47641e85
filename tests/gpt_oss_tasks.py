"""Functions tests/test_gpt_oss.py runs inside its spawned gloo processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import initialize_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.runtime import ParallelContext
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.drivers import Converter
from mapgen.verify.megatron_cpu import prepare_cpu_megatron
from mapgen.verify.testing import import_module_from_path


def mxfp4_against_twin(module_path: str, mxfp4_dir: str, twin_dir: str, layout: ParallelLayout) -> dict[str, Any]:
    """Import the MXFP4 checkpoint and its dequantized twin into two models at `layout`: every
    parameter of this rank must be equal bit for bit; the MXFP4 import's export must give the
    twin's tensors bit for bit, and in bfloat16 the twin's tensors cast to bfloat16."""
    module = import_module_from_path(Path(module_path), f"gptoss_{Path(module_path).stem}")
    initialize_parallel_state(layout)
    prepare_cpu_megatron()
    ctx = ParallelContext.from_parallel_state()
    models = []
    for folder in (mxfp4_dir, twin_dir):
        torch.manual_seed(0)
        chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.float32, model=module.MODEL)
        converter = Converter(module, chunks, ctx)
        converter.load(folder)
        models.append((chunks, converter))
    (quantized, converter), (twin, _) = models
    unequal = [
        name
        for chunk_q, chunk_t in zip(quantized, twin)
        for (name, p), (_, q) in zip(chunk_q.named_parameters(), chunk_t.named_parameters())
        if not torch.equal(p, q)
    ]
    params = sum(1 for chunk in quantized for _ in chunk.parameters())
    reference = HFCheckpoint(twin_dir)
    exported = dict(converter.export())
    mismatched = [n for n, t in exported.items() if not (t.dtype == reference.get(n).dtype and torch.equal(t, reference.get(n)))]
    bf16 = dict(converter.export(dtype=torch.bfloat16))
    mismatched_bf16 = [n for n, t in bf16.items() if not torch.equal(t, reference.get(n).to(t.dtype))]
    return {
        "params": params,
        "unequal": unequal,
        "exported": sorted(exported),
        "mismatched": mismatched,
        "mismatched_bf16": mismatched_bf16,
        "bf16_dtypes": sorted({str(t.dtype) for t in bf16.values()}),
    }
