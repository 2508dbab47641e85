"""Moonshot's models on the DeepSeek-V3 spec: Moonlight-16B-A3B (no q down-projection, checked in)
and Kimi-K2 (model_type kimi_k2, 61 layers x 384 experts, built on demand). What they share with
DeepSeek-V3's stand-in is checked at every layout by tests/test_distributed.py and
tests/test_convert.py; here: their published configs' models at full size, the names Moonlight's
q projection takes, the model_type transformers does not know, and the one place where
megatron-core's model of Moonlight is not transformers' (the latent norms' epsilon)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mapgen
from mapgen.common.errors import SpecError
from mapgen.compiler.build import compile_package, compile_target
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import single_process_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.compiler.write import write_package
from mapgen.runtime import ParallelContext
from mapgen.runtime.drivers import Converter
from mapgen.verify import forward, megatron_cpu, testing
from mapgen.verify.forward import pipeline_logits

SPEC = testing.ROOT / "specs" / "deepseek_v3.yaml"
KIMI = testing.ROOT / "specs" / "configs" / "kimi_k2.json"
MOONLIGHT = testing.ROOT / "specs" / "configs" / "moonlight_16b_a3b.json"


def _published(path: Path) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(path.read_text())
    return fields


def _full_size_local(tmp_path: Path, name: str, config: Path) -> Any:
    files = compile_package(f"{name}_local", SPEC, config, "local", "test")
    write_package(tmp_path / f"{name}_local", files)
    return mapgen.load_module(tmp_path / f"{name}_local", f"kimi_test_{name}")


def test_kimi_k2_at_full_size_has_its_modules_names_and_shapes(tmp_path: Path, cpu_megatron: None) -> None:
    """The published config (model_type kimi_k2) builds; its megatron-core model, on the meta
    device, has exactly the module's parameters, as many as the config says there are."""
    module = _full_size_local(tmp_path, "kimi_k2", KIMI)
    dims = module.DIMS
    assert (dims.num_layers, dims.num_moe_experts, dims.moe_router_topk, dims.moe_dense_layers) == (61, 384, 8, (0,))
    assert (dims.moe_router_num_groups, dims.moe_router_group_topk, dims.mtp_num_layers) == (1, 1, 0)
    assert (dims.rope_type, dims.rope_scaling_factor, dims.rope_beta_fast, dims.rope_mscale_all_dim) == ("yarn", 32.0, 1.0, 1.0)
    assert dims.q_lora_rank == 1536 and dims.moe_router_topk_scaling_factor == 2.827
    # per MoE layer: 8 attention parameters (q and kv down, their norms, up, out; input norm),
    # pre-MLP norm, router weight and bias, 384 x 2 experts, 2 shared; the dense layer 11
    moe_layer = 8 + 3 + 2 * 384 + 2
    assert len(module.PARAMS) == 1 + 11 + 60 * moe_layer + 2 == 46874
    # HF: 9 attention and norm tensors a layer, 3 dense MLP, or gate, bias, 3 x 384, 3 shared
    assert len(module.HF_TENSORS) == 3 + (9 + 3) + 60 * (9 + 2 + 3 * 384 + 3)
    with torch.device("meta"):
        chunks = mapgen.build_model(module, dtype=torch.bfloat16)
    converter = Converter(module, chunks, make_vocab_size_divisible_by=128)
    assert converter._problems == [], converter._problems[:5]
    assert len(converter.placement.local) == len(module.PARAMS)


def test_moonlight_maps_q_proj_as_one_column_split_projection() -> None:
    """No q down-projection: HF q_proj [heads x (nope + rope), hidden] is megatron-core's
    linear_q_proj, split by rows over TP; no q_a_proj, q_a_layernorm or q_b_proj anywhere."""
    from generated import moonlight_16b_a3b as module  # the checked-in package

    fields = _published(MOONLIGHT)
    assert fields["q_lora_rank"] is None and module.DIMS.q_lora_rank is None
    rows = fields["num_attention_heads"] * (fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"])
    q = [p for p in module.PARAMS if p.megatron_name.endswith("self_attention.linear_q_proj.weight")]
    assert len(q) == fields["num_hidden_layers"]
    for plan in q:
        layer = plan.megatron_name.split(".")[2]
        assert plan.hf_names == (f"model.layers.{layer}.self_attn.q_proj.weight",)
        assert plan.shape == (rows, fields["hidden_size"]) == (3072, 2048) and plan.split_dim == 0
    assert not [p for p in module.PARAMS if "linear_q_down_proj" in p.megatron_name or "linear_q_up_proj" in p.megatron_name]
    assert not [t for t in module.HF_TENSORS if ".q_a_" in t.name or ".q_b_" in t.name]
    dims = module.DIMS
    assert (dims.num_moe_experts, dims.moe_router_topk, dims.moe_shared_expert_intermediate_size) == (64, 6, 2 * 1408)
    assert (dims.rope_type, dims.rotary_base, dims.layernorm_epsilon) == ("default", 50000.0, 1e-5)


def test_kimi_k2s_model_type_is_deepseek_v3s_only_with_its_own_config_class(tmp_path: Path) -> None:
    """transformers knows no kimi_k2: the build reads the config with DeepseekV3Config because
    its auto_map names Moonshot's copy of that class; without that, or naming another class, the
    model_type contradicts the architecture. The stand-in is transformers' deepseek_v3."""
    fields = _published(KIMI)
    assert fields["model_type"] == "kimi_k2" and fields["architectures"] == ["DeepseekV3ForCausalLM"]
    assert testing.standin_model_type(fields) == "deepseek_v3"
    assert testing.standin_config(fields)["model_type"] == "deepseek_v3"
    with pytest.raises(ValueError, match="transformers knows no model_type 'kimi_k2'"):
        testing.standin_model_type({**fields, "architectures": ["KimiForCausalLM"]})
    no_own_class = {k: v for k, v in fields.items() if k != "auto_map"}
    another_class = {**fields, "auto_map": {"AutoConfig": "configuration_kimi.KimiConfig"}}
    for label, changed in (("no_auto_map", no_own_class), ("another_class", another_class)):
        config = tmp_path / label / "config.json"
        config.parent.mkdir()
        config.write_text(json.dumps(changed, indent=2))
        with pytest.raises(SpecError, match="'model_type' is 'kimi_k2', which contradicts its architectures"):
            compile_target(label, SPEC, config, "local", "test")


def test_standins_keep_kimi_and_moonlights_single_expert_group() -> None:
    """n_group 1 (no group-limited routing) stays 1; DeepSeek-V3's 8 groups become 4. The
    stand-ins' latent norms and block norms agree on eps 1e-6 (see the test below)."""
    deepseek = testing.standin_config(_published(testing.ROOT / "specs" / "configs" / "deepseek_v3.json"))
    assert (deepseek["n_group"], deepseek["topk_group"]) == (4, 2)
    for path in (KIMI, MOONLIGHT):
        tiny = testing.standin_config(_published(path))
        assert (tiny["n_group"], tiny["topk_group"], tiny["rms_norm_eps"]) == (1, 1, 1e-6)
    assert testing.standin_config(_published(MOONLIGHT))["q_lora_rank"] is None


def _megatron_logits(module: Any, folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    with single_process_parallel_state():
        megatron_cpu.prepare_cpu_megatron()
        chunks = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=torch.float32)
        Converter(module, chunks, ParallelContext.single()).load(folder)
        logits = pipeline_logits(chunks, input_ids, ParallelContext.single(), module.DIMS.hidden_size)
    assert logits is not None
    return logits


def test_moonlights_latent_norm_epsilon_is_megatron_cores_only_difference(tmp_path: Path) -> None:
    """transformers' DeepSeek-V3 normalises the kv latent with eps 1e-6 whatever rms_norm_eps
    says; megatron-core's MLA with layernorm_epsilon, Moonlight's 1e-5. A stand-in with
    Moonlight's 1e-5: megatron-core's logits miss transformers' by more than the 1e-5 tolerance,
    and meet it once transformers' kv latent norms take 1e-5 too (nothing else differs)."""
    import transformers

    tiny = testing.standin_config(_published(MOONLIGHT))
    tiny["rms_norm_eps"] = 1e-5
    folder = tmp_path / "moonlight"
    testing.save_random_model(transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny), folder)
    path = tmp_path / "moonlight_eps.py"
    path.write_text(compile_target("moonlight_eps", SPEC, folder / "config.json", "local", "test"))
    module = testing.import_module_from_path(path)
    assert module.DIMS.layernorm_epsilon == 1e-5
    input_ids = torch.randint(0, module.DIMS.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    ours = _megatron_logits(module, folder, input_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    latent_norms = [layer.self_attn.kv_a_layernorm for layer in model.model.layers]
    assert {norm.variance_epsilon for norm in latent_norms} == {1e-6}
    assert (ours - forward.hf_logits(model, input_ids)).abs().max() > 1e-5
    for norm in latent_norms:
        norm.variance_epsilon = 1e-5
    assert (ours - forward.hf_logits(model, input_ids)).abs().max() <= 1e-5
