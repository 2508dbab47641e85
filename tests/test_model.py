"""`mapgen.build_model`: the megatron-core model of every checked-in target has exactly its
module's parameter names and shapes; the caller's TransformerConfig fields pass through, and
those the module decides are refused, named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mapgen
from mapgen.common.errors import MapgenError, NeedsNewerMegatronCore
from mapgen.compiler.build import compile_package
from mapgen.compiler.targets import read_targets
from mapgen.compiler.hybrid_model import hybrid_model_has_gdn
from mapgen.compiler.write import write_package
from mapgen.runtime.drivers import Converter
from mapgen.verify import testing

TARGETS = {entry.name: entry for entry in read_targets(testing.ROOT) if entry.checked_in}


def _local_twin(tmp_path: Path, name: str) -> Any:
    """The target's module for the local layer spec (the one a CPU builds), from its spec and
    its published config: the checked-in module's plan in local names."""
    entry = TARGETS[name]
    files = compile_package(
        f"{name}_local", testing.ROOT / entry.spec, testing.ROOT / entry.config, "local", "test", model=entry.model
    )
    write_package(tmp_path / f"{name}_local", files)
    return mapgen.load_module(tmp_path / f"{name}_local", f"model_test_{name}")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_model_of_every_checked_in_target_has_its_modules_names_and_shapes(
    tmp_path: Path, name: str, cpu_megatron: None
) -> None:
    """At full size, on the meta device: every parameter of the chunk is one of the module's,
    with its shape (the vocabulary padded as Megatron-LM pads it), and none is missing."""
    if TARGETS[name].model == "hybrid" and not hybrid_model_has_gdn() and "qwen3_next" in name:
        pytest.skip("megatron-core 0.16.1 builds no gated delta net HybridModel")
    try:
        module = _local_twin(tmp_path, name)
    except NeedsNewerMegatronCore as exc:  # DeepSeek-V3.2's DSA layers: megatron-core 0.19+
        pytest.skip(str(exc))
    with torch.device("meta"):
        chunks = mapgen.build_model(module, dtype=torch.bfloat16)
    converter = Converter(module, chunks, make_vocab_size_divisible_by=128)
    assert converter._problems == [], converter._problems[:5]
    # one process holds the whole model: every parameter of the module is one of the chunk's
    assert len(converter.placement.local) == sum(p.params for p in module.PARTS)
    vocab = mapgen.padded_vocab_size(module)
    assert vocab % 128 == 0 and vocab - 128 < module.DIMS.vocab_size <= vocab


def test_config_fields_pass_through_and_the_modules_own_are_refused(tmp_path: Path, cpu_megatron: None) -> None:
    module = _local_twin(tmp_path, "qwen3_30b_a3b")
    config = mapgen.model_config(
        module, dtype="bfloat16", recompute_granularity="selective", hidden_dropout=0.1, moe_aux_loss_coeff=0.01
    )
    assert (config.recompute_granularity, config.hidden_dropout, config.moe_aux_loss_coeff) == ("selective", 0.1, 0.01)
    assert config.params_dtype == torch.bfloat16 and config.bf16
    assert config.num_moe_experts == module.DIMS.num_moe_experts
    assert mapgen.model_config(module, num_layers=module.DIMS.num_layers).num_layers == module.DIMS.num_layers  # its own value
    refused = {
        "num_layers": ({"num_layers": 3}, "num_layers=3 would change the model"),
        "moe_ffn_hidden_size": ({"moe_ffn_hidden_size": 64}, "moe_ffn_hidden_size=64 would change the model"),
        "params_dtype": ({"params_dtype": torch.float16}, "params_dtype is set from dtype="),
        "tp": ({"tensor_model_parallel_size": 2}, "set from megatron-core's parallel_state"),
        "unknown": ({"hiden_size": 8}, "hiden_size is not a field of megatron-core's TransformerConfig"),
    }
    for case, (overrides, message) in refused.items():
        with pytest.raises(MapgenError, match=message):
            mapgen.model_config(module, **overrides)
    with pytest.raises(MapgenError, match="spec must be one of local, te"):
        mapgen.build_model(module, spec="gpu")


def test_a_module_builds_only_the_model_of_its_own_layout(cpu_megatron: None) -> None:
    from generated import llama3_2_1b  # the te layout: TransformerEngine's names

    with pytest.raises(MapgenError, match=r"maps the te layout's parameter names; build its model with spec='te'"):
        mapgen.build_model(llama3_2_1b)
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(MapgenError, match="transformer_engine does not import here"):
            mapgen.build_model(llama3_2_1b, spec="te")


def test_from_hf_pretrained_then_export_round_trips(tmp_path: Path, cpu_megatron: None) -> None:
    """The one-call jobs in one process: build and load a stand-in, a forward pass, export equal
    to the checkpoint's bytes, and a save that transformers' files match."""
    from safetensors.torch import load_file

    entry = TARGETS["llama3_2_1b"]
    hf = tmp_path / "hf"
    testing.save_standin(json.loads((testing.ROOT / entry.config).read_text()), hf)
    files = compile_package("tiny_local", testing.ROOT / entry.spec, hf / "config.json", "local", "test")
    write_package(tmp_path / "tiny_local", files)
    module = mapgen.load_module(tmp_path / "tiny_local", "model_test_tiny")
    chunks = mapgen.from_hf_pretrained(module, hf)
    logits = mapgen.cpu_logits(chunks[0], torch.tensor([[1, 2, 3]]))
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
    original = load_file(hf / "model.safetensors")
    exported = dict(mapgen.export_hf_weights(module, chunks))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n].view(torch.uint8), original[n].view(torch.uint8)) for n in original)
    mapgen.save_hf_pretrained(module, chunks, tmp_path / "saved", hf)
    saved = {}
    for file in (tmp_path / "saved").glob("*.safetensors"):
        saved.update(load_file(file))
    assert sorted(saved) == sorted(original) and all(torch.equal(saved[n], original[n]) for n in original)
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
