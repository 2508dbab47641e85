from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest
import torch

from mapgen.verify import megatron_cpu, testing
from mapgen.compiler.build import compile_target

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def compile_module(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ModuleType]:
    """Compile a family spec against a config.json into an importable module (cached)."""
    cache: dict[tuple[str, str, str], ModuleType] = {}

    def compile_(family_or_spec: str, config: Path, layout: str = "local") -> ModuleType:
        key = (family_or_spec, str(config), layout)
        if key not in cache:
            spec = testing.ROOT / testing.FAMILY_SPECS.get(family_or_spec, family_or_spec)
            folder = tmp_path_factory.mktemp("generated")
            name = f"{Path(config).parent.name}_{layout}"
            source = compile_target(name, spec, config, layout, "test")
            path = folder / f"{name}.py"
            path.write_text(source)
            cache[key] = testing.import_module_from_path(path, f"gen_{len(cache)}_{name}")
        return cache[key]

    return compile_


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Any]]:
    """A saved tiny HF model per (family, variant): (folder, the transformers model)."""
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[Path, Any]] = {}

    def make(family: str, **overrides: Any) -> tuple[Path, Any]:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}_hf")
            cache[key] = (folder, testing.save_tiny_model(family, folder, **overrides))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def cpu_megatron() -> None:
    from mapgen.compiler.parallel_state import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()
    megatron_cpu.prepare_cpu_megatron()
    torch.set_num_threads(2)
