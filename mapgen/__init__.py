"""mapgen: static weight-mapping modules between HuggingFace checkpoints and Megatron-Core.

The public API, imported on first use (so `mapgen --help` needs neither torch nor megatron-core):

    mapgen.load_module(path)                      a generated module or target package
    mapgen.build_model(module, spec=..., ...)     this rank's megatron-core model chunks
    mapgen.model_config(module, ...)              their TransformerConfig
    mapgen.from_hf_pretrained(module, hf_dir)     build and load
    mapgen.load_hf_weights(module, chunks, hf_dir)
    mapgen.export_hf_weights(module, chunks)      (HF name, tensor) on every rank
    mapgen.save_hf_pretrained(module, chunks, out_dir, hf_config)
    mapgen.converter(module, chunks)              a held Converter, for repeated exports
    mapgen.engine_weights(converter, feed=...)    what an inference engine's load_weights takes
    mapgen.PieceReceiver                          export_local pieces -> full or TP-sharded tensors
    mapgen.quiet()                                silence megatron-core's and transformers' notices
    mapgen.prepare_cpu(), mapgen.cpu_logits(...)  for checking on CPU
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "build_model": "mapgen.model",
    "model_config": "mapgen.model",
    "padded_vocab_size": "mapgen.model",
    "prepare_cpu": "mapgen.model",
    "cpu_logits": "mapgen.model",
    "init_single_process": "mapgen.model",
    "load_module": "mapgen.weights",
    "converter": "mapgen.weights",
    "from_hf_pretrained": "mapgen.weights",
    "load_hf_weights": "mapgen.weights",
    "export_hf_weights": "mapgen.weights",
    "save_hf_pretrained": "mapgen.weights",
    "engine_weights": "mapgen.engine",
    "PieceReceiver": "mapgen.engine",
    "Converter": "mapgen.runtime.drivers",
}


def quiet() -> None:
    """Silence what megatron-core, transformers and torch print on their own (deprecation
    notices, optional-package and "No CUDA runtime" warnings, progress bars), as the CLI does;
    errors still show. Call it yourself, before importing megatron-core (which warns as it is
    imported): importing mapgen changes no logging."""
    from mapgen.common.console import quiet_libraries

    quiet_libraries()


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mapgen' has no attribute {name!r}")


__all__ = [*_WHERE, "quiet", "__version__"]
