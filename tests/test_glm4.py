"""GLM-4.5 (Glm4MoeForCausalLM, specs/glm4_moe.yaml): the checked-in GLM-4.5-Air module against
the tensor count of a conversion of the published checkpoint, the stand-ins' files against their
modules, and single-process forwards against transformers that fail where the spec's partial rope
or q/k norms are wrong. The distributed layouts run in tests/test_distributed.py (glm4_5_air and
glm4_5), the `mapgen convert` round trip in tests/test_convert.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mapgen
from mapgen.common.errors import SpecError
from mapgen.compiler.build import compile_target
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import single_process_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.runtime import ParallelContext
from mapgen.runtime.drivers import Converter
from mapgen.verify import forward, megatron_cpu, testing
from mapgen.verify.forward import pipeline_logits

SPEC = testing.ROOT / "specs" / "glm4_moe.yaml"
CONFIGS = {"glm4_5_air": "glm4_5_air.json", "glm4_5": "glm4_5.json"}


def _config(name: str) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads((testing.ROOT / "specs" / "configs" / CONFIGS[name]).read_text())
    return fields


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4")
    found = {}
    for name in CONFIGS:
        testing.save_standin(_config(name), root / name)
        found[name] = root / name
    return found


def _module(folder: Path, name: str, spec_text: str | None = None) -> Any:
    spec = SPEC
    if spec_text is not None:
        spec = folder.parent / f"{name}.yaml"
        spec.write_text(spec_text)
    path = folder.parent / f"{name}.py"
    path.write_text(compile_target(name, spec, folder / "config.json", "local", "test"))
    return testing.import_module_from_path(path, f"test_glm4_{name}")


def test_the_air_module_has_every_tensor_of_the_published_checkpoint() -> None:
    """803 tensors in a GGUF conversion of GLM-4.5-Air (llama.cpp's loader log: 46 decoder
    layers and the MTP layer 46 with its enorm, hnorm, eh_proj, shared_head norm and the
    embedding and head copies; experts stacked, 3 tensors a layer): per-expert on the HF side,
    46 layers of 128 experts hold 3 x 128 tensors each instead of 3."""
    module = mapgen.load_module(testing.ROOT / "generated" / "glm4_5_air", "test_glm4_generated_air")
    names = {t.name for t in module.HF_TENSORS}
    assert len(names) == 803 + 46 * (3 * 128 - 3)
    assert module.HF_COPIES == {
        "model.layers.46.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.46.shared_head.head.weight": "lm_head.weight",
    }
    assert not any(".q_norm." in n or ".k_norm." in n for n in names)  # use_qk_norm: false
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate_proj.weight" not in names
    assert {f"model.layers.46.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm")} <= names
    # transformers keeps the router in float32 (_keep_in_fp32_modules_strict): 46 MoE layers
    float32 = {t.name for t in module.HF_TENSORS if t.float32}
    assert float32 == {f"model.layers.{i}.mlp.gate.{n}" for i in range(1, 47) for n in ("weight", "e_score_correction_bias")}
    assert (module.DIMS.rotary_percent, module.DIMS.qk_layernorm, module.DIMS.add_qkv_bias) == (0.5, False, True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_standin_module_reads_every_tensor_of_its_checkpoint(standins: dict[str, Path], name: str) -> None:
    folder = standins[name]
    module = _module(folder, f"{name}_names")
    on_disk = set(load_file(folder / "model.safetensors"))
    assert {t.name for t in module.HF_TENSORS} == on_disk
    q_norms = {n for n in on_disk if n.endswith(".self_attn.q_norm.weight")}
    # GLM-4.5 sets use_qk_norm, Air does not; the stand-in's 4 layers and its MTP layer 4
    assert q_norms == ({f"model.layers.{i}.self_attn.q_norm.weight" for i in range(5)} if name == "glm4_5" else set())
    assert {"model.layers.4.eh_proj.weight", "model.layers.4.shared_head.head.weight"} <= on_disk


def _max_logit_diff(module: Any, folder: Path) -> float:
    """The main model's logits at TP1 PP1 against transformers' (float32)."""
    from transformers import AutoModelForCausalLM

    with single_process_parallel_state():
        megatron_cpu.prepare_cpu_megatron()
        chunks = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=torch.float32)
        Converter(module, chunks, ParallelContext.single()).load(folder)
        input_ids = torch.randint(0, module.DIMS.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
        logits = pipeline_logits(chunks, input_ids, ParallelContext.single(), module.DIMS.hidden_size)
    assert logits is not None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = forward.hf_logits(model, input_ids)
    return float((logits[:, : input_ids.shape[1]] - expected).abs().max())


# (old, new) in the spec's text: rope over the whole head (transformers rotates the first half
# only); the q and k norms swapped
WRONG = {
    "whole_head_rope": [("  rotary_percent: default(", "  rotary_percent: 1.0 if default(")],
    "qk_norms_swapped": [
        ("hf: model.layers.*.self_attn.q_norm.weight", "hf: model.layers.*.self_attn.Q_NORM.weight"),
        ("hf: model.layers.*.self_attn.k_norm.weight", "hf: model.layers.*.self_attn.q_norm.weight"),
        ("hf: model.layers.*.self_attn.Q_NORM.weight", "hf: model.layers.*.self_attn.k_norm.weight"),
    ],
}


def test_logits_match_transformers_and_fail_with_a_wrong_rope_or_swapped_qk_norms(standins: dict[str, Path]) -> None:
    folder = standins["glm4_5"]
    assert _max_logit_diff(_module(folder, "glm4_5_right"), folder) <= 1e-5
    for case, edits in WRONG.items():
        text = SPEC.read_text()
        for old, new in edits:
            assert text.count(old) == 1, (case, old)
            text = text.replace(old, new)
        if case == "whole_head_rope":  # still reads the field: `1.0 if <field> else 1.0`
            line = next(line for line in text.splitlines() if line.startswith("  rotary_percent: 1.0 if"))
            text = text.replace(line, line + " else 1.0")
        assert _max_logit_diff(_module(folder, f"glm4_5_{case}", text), folder) > 1e-3, case


def test_a_config_without_renormalised_top_k_is_refused(tmp_path: Path) -> None:
    """megatron-core's sigmoid router renormalises the chosen experts' weights: norm_topk_prob
    false would build another model than transformers runs."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**_config("glm4_5_air"), "norm_topk_prob": False}, indent=2))
    with pytest.raises(SpecError, match="config field 'norm_topk_prob' is false, but spec .*glm4_moe.yaml builds only norm_topk_prob = true"):
        compile_target("refused", SPEC, config, "local", "test")
