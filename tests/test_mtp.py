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
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import single_process_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.runtime import ParallelContext
from mapgen.runtime.collectives import RankError
from mapgen.runtime.drivers import Converter
from mapgen.verify import forward, megatron_cpu, testing
from mapgen.verify.forward import pipeline_logits

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
    # a spec with mtp.hf_decoder_prefix (Qwen3-Next): MTP rules see megatron-core's own number
    assert rules_name("mtp.layers.0.enorm.weight", 48, 0) == "mtp.layers.0.enorm.weight"
    assert rules_name("mtp.layers.0.transformer_layer.mlp.router.weight", 48, 0) == "decoder.layers.48.mlp.router.weight"


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
        megatron_cpu.prepare_cpu_megatron()
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
    (reference,) = forward.hf_mtp_logits(model, folder, module, input_ids)
    assert reference.shape == (2, seq - 1, module.DIMS.vocab_size)
    assert (logits[:, seq : 2 * seq - 1] - reference).abs().max() <= 1e-5
    assert (logits[:, :seq] - forward.hf_logits(model, input_ids)).abs().max() <= 1e-5
    original = load_file(folder / "model.safetensors")
    assert sorted(n for n, _ in exported) == sorted(original)
    for name, tensor in exported:
        assert torch.equal(tensor, original[name]), name

    # the comparison can fail: eh_proj's two halves (embedding, hidden state) swapped
    logits, _, _ = _forward(module, _halves_swapped(folder, tmp_path, "model.layers.4.eh_proj.weight"))
    assert (logits[:, seq : 2 * seq - 1] - reference).abs().max() > 1e-2


def _halves_swapped(folder: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the checkpoint in `folder` whose `name` (the MTP projection, [H, 2H]) has its
    two input halves (embedding, hidden state) swapped."""
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    tensors = load_file(swapped / "model.safetensors")
    weight = tensors[name]
    half = weight.shape[1] // 2
    tensors[name] = torch.cat((weight[:, half:], weight[:, :half]), dim=1).contiguous()
    save_file(tensors, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    return swapped


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


# --- Qwen3-Next: one MTP layer under mtp.* (fc, pre_fc_norm_embedding/hidden, norm, and a
# full-attention decoder layer with the experts under mtp.layers.0), which config.json does not
# declare (the spec's mtp_num_layers defaults to the published checkpoint's one) ---

QWEN3_NEXT_CONFIG = testing.ROOT / "specs" / "configs" / "qwen3_next_80b_a3b.json"
QWEN3_NEXT_SPEC = testing.ROOT / "specs" / "qwen3_next.yaml"
# (old, new) in the spec: enorm and hnorm swapped; the MTP norms converted as if megatron-core
# stored the plain scale (they are zero-centred there, as HF's (1 + w))
QWEN3_NEXT_WRONG = {
    "norms_swapped": [
        ("hf: mtp.pre_fc_norm_embedding.weight", "hf: mtp.pre_fc_norm_HIDDEN.weight"),
        ("hf: mtp.pre_fc_norm_hidden.weight", "hf: mtp.pre_fc_norm_embedding.weight"),
        ("hf: mtp.pre_fc_norm_HIDDEN.weight", "hf: mtp.pre_fc_norm_hidden.weight"),
    ],
    "final_norm_shifted": [
        ("hf: mtp.norm.weight\n    kind: auto", "hf: mtp.norm.weight\n    kind: zero_centered_rmsnorm"),
    ],
}


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("qwen3_next_mtp") / "standin"
    testing.save_standin(json.loads(QWEN3_NEXT_CONFIG.read_text()), folder)
    path = folder.parent / "qn_mtp.py"
    path.write_text(compile_target("qn_mtp", QWEN3_NEXT_SPEC, folder / "config.json", "local", "test"))
    return folder, testing.import_module_from_path(path)


def test_qwen3_next_module_maps_the_published_mtp_tensors(qwen3_next: tuple[Path, Any]) -> None:
    folder, module = qwen3_next
    on_disk = set(load_file(folder / "model.safetensors"))
    # the names the published Qwen3-Next-80B-A3B checkpoint ships under mtp.*, experts aside
    published = {
        "mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
        *(f"mtp.layers.0.{n}.weight" for n in (
            "input_layernorm", "post_attention_layernorm", "mlp.gate", "mlp.shared_expert_gate",
            "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "self_attn.q_norm", "self_attn.k_norm",
        )),
    }
    assert {n for n in on_disk if n.startswith("mtp.") and ".experts." not in n} == published
    assert {t.name for t in module.HF_TENSORS} == on_disk and module.IGNORED_HF == {}
    assert not getattr(module, "HF_COPIES", {})  # the MTP layer reads the main embedding and lm_head
    names = {p.megatron_name: p for p in module.PARAMS}
    assert names["mtp.layers.0.enorm.weight"].hf_names == ("mtp.pre_fc_norm_embedding.weight",)
    assert names["mtp.layers.0.hnorm.weight"].hf_names == ("mtp.pre_fc_norm_hidden.weight",)
    assert names["mtp.layers.0.eh_proj.weight"].hf_names == ("mtp.fc.weight",)
    assert names["mtp.layers.0.final_layernorm.weight"].hf_names == ("mtp.norm.weight",)
    qkv = names["mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"]
    assert qkv.hf_names == tuple(f"mtp.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    expert = names["mtp.layers.0.transformer_layer.mlp.experts.local_experts.7.linear_fc1.weight"]
    assert expert.hf_names == ("mtp.layers.0.mlp.experts.7.gate_proj.weight", "mtp.layers.0.mlp.experts.7.up_proj.weight")


def test_qwen3_next_mtp_logits_match_the_reference_and_wrong_mappings_fail(
    qwen3_next: tuple[Path, Any], tmp_path: Path
) -> None:
    """TP1 here (the distributed layouts: tests/test_qwen3_next.py, whose stand-in has the MTP
    layer). The reference (`hf_mtp_logits`) reads the published tensor names itself; a spec
    that swaps enorm and hnorm, or converts a (1 + w) MTP norm, fails it; so does a checkpoint
    whose fc halves (embedding, hidden state) are swapped."""
    from transformers import AutoModelForCausalLM

    folder, module = qwen3_next
    logits, exported, input_ids = _forward(module, folder)
    seq = input_ids.shape[1]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    (reference,) = forward.hf_mtp_logits(model, folder, module, input_ids)
    assert reference.shape == (2, seq - 1, module.DIMS.vocab_size)
    assert (logits[:, seq : 2 * seq - 1] - reference).abs().max() <= 1e-5
    assert (logits[:, :seq] - forward.hf_logits(model, input_ids)).abs().max() <= 1e-5
    original = load_file(folder / "model.safetensors")
    assert sorted(n for n, _ in exported) == sorted(original)
    for name, tensor in exported:
        assert torch.equal(tensor, original[name]), name

    text = QWEN3_NEXT_SPEC.read_text()
    for label, edits in QWEN3_NEXT_WRONG.items():
        wrong = text
        for old, new in edits:
            assert wrong.count(old) == 1, old
            wrong = wrong.replace(old, new)
        spec = tmp_path / f"{label}.yaml"
        spec.write_text(wrong)
        path = tmp_path / f"{label}.py"
        path.write_text(compile_target(label, spec, folder / "config.json", "local", "test"))
        bad, _, _ = _forward(testing.import_module_from_path(path), folder)
        assert (bad[:, :seq] - logits[:, :seq]).abs().max() == 0, label  # the main model is untouched
        assert (bad[:, seq : 2 * seq - 1] - reference).abs().max() > 1e-2, label

    bad, _, _ = _forward(module, _halves_swapped(folder, tmp_path, "mtp.fc.weight"))
    assert (bad[:, seq : 2 * seq - 1] - reference).abs().max() > 1e-2


def test_qwen3_next_mtp_layout_errors(qwen3_next: tuple[Path, Any], tmp_path: Path) -> None:
    """hf_decoder_prefix needs its '*'; hf_decoder_like a main layer; tensors held once (no '*')
    refuse a config with two MTP layers."""
    folder, _ = qwen3_next
    text = QWEN3_NEXT_SPEC.read_text()
    cases = {
        "prefix": (text.replace('hf_decoder_prefix: "mtp.layers.*."', 'hf_decoder_prefix: "mtp.layers.0."'), None,
                   r"mtp.hf_decoder_prefix 'mtp.layers.0.' must have exactly one '\*'"),
        "like": (text.replace("hf_decoder_like: num_hidden_layers - 1", "hf_decoder_like: num_hidden_layers"), None,
                 r"mtp.hf_decoder_like gives 4, not a decoder layer number below 4"),
        "two": (text, 2, r"2 multi-token-prediction layers, but mtp.hf_tensors mtp.fc.weight, .* exist once"),
    }
    for label, (spec_text, layers, message) in cases.items():
        spec = tmp_path / f"{label}.yaml"
        spec.write_text(spec_text)
        config = tmp_path / f"{label}.json"
        fields = json.loads((folder / "config.json").read_text())
        if layers is not None:
            fields["num_nextn_predict_layers"] = layers
        config.write_text(json.dumps(fields))
        with pytest.raises(SpecError, match=message):
            compile_target(label, spec, config, "local", "test")
