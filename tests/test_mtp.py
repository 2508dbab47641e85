"""DeepSeek-V3's multi-token-prediction layer: megatron-core's MTP block against a reference
built from transformers' own modules and the published MTP formula (single process here; the
distributed layouts run in tests/test_distributed.py, whose DeepSeek-V3 stand-in has the layer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mapgen.common.errors import SpecError
from mapgen.compiler.build import compile_target
from mapgen.compiler.expand import rules_name
from mapgen.compiler.megatron_model import ParallelLayout, build_model_chunks, single_process_parallel_state
from mapgen.runtime import ParallelContext
from mapgen.runtime.collectives import RankError
from mapgen.runtime.drivers import Converter
from mapgen.verify import testing
from mapgen.verify.jobs import pipeline_logits

CONFIG = testing.ROOT / "specs" / "configs" / "deepseek_v3.json"
SPEC = testing.ROOT / "specs" / "deepseek_v3.yaml"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("mtp") / "standin"
    testing.save_standin(json.loads(CONFIG.read_text()), folder)
    path = folder.parent / "ds_mtp.py"
    path.write_text(compile_target("ds_mtp", SPEC, folder / "config.json", "local", "test"))
    return folder, testing.import_module_from_path(path)


def test_rules_name_numbers_mtp_parameters_as_hf_layers() -> None:
    assert rules_name("mtp.layers.0.enorm.weight", 61) == "mtp.layers.61.enorm.weight"
    assert rules_name("mtp.layers.1.transformer_layer.mlp.router.weight", 61) == "decoder.layers.62.mlp.router.weight"
    assert rules_name("decoder.layers.3.mlp.router.weight", 61) == "decoder.layers.3.mlp.router.weight"
    assert rules_name("mtp.layers.0.enorm.weight", None) == "mtp.layers.0.enorm.weight"


def test_module_maps_every_mtp_tensor(standin: tuple[Path, Any]) -> None:
    folder, module = standin
    on_disk = set(load_file(folder / "model.safetensors"))
    assert module.IGNORED_HF == {}
    assert {t.name for t in module.HF_TENSORS} == on_disk  # every tensor of the file, nothing else
    assert module.HF_COPIES == {
        "model.layers.4.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.4.shared_head.head.weight": "lm_head.weight",
    }
    assert module.TIED == {"embedding.word_embeddings.weight": "embedding.word_embeddings.weight"}
    names = {p.megatron_name: p for p in module.PARAMS}
    assert names["mtp.layers.0.eh_proj.weight"].hf_names == ("model.layers.4.eh_proj.weight",)
    assert names["mtp.layers.0.final_layernorm.weight"].hf_names == ("model.layers.4.shared_head.norm.weight",)
    expert = names["mtp.layers.0.transformer_layer.mlp.experts.local_experts.7.linear_fc2.weight"]
    assert expert.hf_names == ("model.layers.4.mlp.experts.7.down_proj.weight",) and expert.expert == 7


def test_spec_without_mtp_section_refuses_a_config_with_mtp_layers(standin: tuple[Path, Any], tmp_path: Path) -> None:
    folder, _ = standin
    text = SPEC.read_text()
    start, end = text.index("\nmtp:\n"), text.index("\nrules:\n")
    spec = tmp_path / "deepseek_v3.yaml"
    spec.write_text(text[:start] + text[end:])
    with pytest.raises(SpecError, match="multi-token-prediction layer"):
        compile_target("ds_no_mtp", spec, folder / "config.json", "local", "test")


def _forward(module: Any, folder: Path) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]], Any]:
    """Megatron's logits ([main; MTP] along the sequence) and its export, at TP1 PP1."""
    with single_process_parallel_state():
        testing.prepare_cpu_megatron()
        chunks = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=torch.float32)
        converter = Converter(module, chunks, ParallelContext.single())
        converter.load(folder)
        input_ids = torch.randint(0, module.DIMS.vocab_size, (2, 8), generator=torch.Generator().manual_seed(7))
        logits = pipeline_logits(chunks, input_ids, ParallelContext.single(), module.DIMS.hidden_size)
        exported = [(n, t.clone()) for n, t in converter.export()]
    return logits, exported, input_ids


def test_mtp_logits_match_the_transformers_reference_and_export_is_bit_exact(standin: tuple[Path, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, module = standin
    logits, exported, input_ids = _forward(module, folder)
    seq = input_ids.shape[1]
    assert logits.shape[1] == 2 * seq
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    (reference,) = testing.hf_mtp_logits(model, folder, module, input_ids)
    assert reference.shape == (2, seq - 1, module.DIMS.vocab_size)
    assert (logits[:, seq : 2 * seq - 1] - reference).abs().max() <= 1e-5
    assert (logits[:, :seq] - testing.hf_logits(model, input_ids)).abs().max() <= 1e-5
    original = load_file(folder / "model.safetensors")
    assert sorted(n for n, _ in exported) == sorted(original)
    for name, tensor in exported:
        assert torch.equal(tensor, original[name]), name

    # the comparison can fail: eh_proj's two halves (embedding, hidden state) swapped
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    tensors = load_file(swapped / "model.safetensors")
    weight = tensors["model.layers.4.eh_proj.weight"]
    half = weight.shape[1] // 2
    tensors["model.layers.4.eh_proj.weight"] = torch.cat((weight[:, half:], weight[:, :half]), dim=1).contiguous()
    save_file(tensors, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    logits, _, _ = _forward(module, swapped)
    assert (logits[:, seq : 2 * seq - 1] - reference).abs().max() > 1e-2


def test_a_copy_that_differs_from_its_original_is_refused(standin: tuple[Path, Any], tmp_path: Path) -> None:
    folder, module = standin
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.4.shared_head.head.weight"] = tensors["model.layers.4.shared_head.head.weight"].clone()
    tensors["model.layers.4.shared_head.head.weight"][3, 5] += 1
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RankError, match=r"model\.layers\.4\.shared_head\.head\.weight.*differs from 'lm_head\.weight'"):
        _forward(module, changed)
