"""HF -> Megatron import into a real megatron-core GPTModel, checked against transformers'
forward pass, then export back checked against the bytes of the original safetensors file."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mapgen.verify import forward, testing
from mapgen.common.layout import weight_buffers
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.runtime.drivers import export_hf_tensors, load_hf_checkpoint

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),  # like Llama-3.2-1B
    ("qwen2", {}),
    ("qwen3", {}),
    ("mixtral", {}),
    ("qwen3_moe", {}),
    ("deepseek_v3", {}),
    ("qwen3_next", {}),  # gated delta net, gated attention, zero-centred norms, gated shared expert
]


@pytest.mark.parametrize(
    ("family", "overrides"),
    CASES,
    ids=["llama", "llama-tied", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3", "qwen3_next"],
)
def test_import_matches_transformers_and_export_is_bit_exact(
    family: str, overrides: dict[str, Any], tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None
) -> None:
    folder, hf_model = tiny_checkpoint(family, **overrides)
    module = compile_module(family, folder / "config.json")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
    model.eval()

    loaded = load_hf_checkpoint(module, [model], str(folder))
    weights = list(model.parameters()) + [b for _, b in weight_buffers(model)]
    assert loaded == len(module.PARAMS) == len(weights)

    input_ids = torch.randint(0, hf_model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = forward.megatron_logits(model, input_ids)
    theirs = forward.hf_logits(hf_model, input_ids)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5

    original = load_file(folder / "model.safetensors")
    exported = list(export_hf_tensors(module, [model]))
    names = [name for name, _ in exported]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(original)
    for name, tensor in exported:
        assert tensor.dtype == original[name].dtype, name
        assert torch.equal(tensor, original[name]), name


def test_export_follows_hf_order(tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None) -> None:
    folder, hf_model = tiny_checkpoint("qwen3")
    module = compile_module("qwen3", folder / "config.json")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
    load_hf_checkpoint(module, [model], str(folder))
    names = [name for name, _ in export_hf_tensors(module, [model])]
    assert names == list(hf_model.state_dict())


def test_te_layout_is_the_local_layout_renamed(tiny_checkpoint: Any, compile_module: Any) -> None:
    """Both layouts load the same shard from the same HF tensors; only names and module kinds
    differ, by the documented rename."""
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.checkpoint import HFCheckpoint

    folder, _ = tiny_checkpoint("qwen3")
    local = compile_module("qwen3", folder / "config.json", "local")
    te = compile_module("qwen3", folder / "config.json", "te")
    renames = {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    }

    def te_name(name: str) -> str:
        for old, new in renames.items():
            if name.endswith(old):
                return name[: -len(old)] + new
        return name

    assert sorted(te_name(p.megatron_name) for p in local.PARAMS) == sorted(p.megatron_name for p in te.PARAMS)
    checkpoint = HFCheckpoint(folder)
    ctx = ParallelContext.single()
    te_plans = {p.megatron_name: p for p in te.PARAMS}
    for plan in local.PARAMS:
        twin = te_plans[te_name(plan.megatron_name)]
        assert (plan.shape, plan.split_dim, plan.hf_names) == (twin.shape, twin.split_dim, twin.hf_names)
        ours = local.IMPORTS[plan.megatron_name](ctx, checkpoint.get)
        theirs = te.IMPORTS[twin.megatron_name](ctx, checkpoint.get)
        assert torch.equal(ours, theirs)


def test_other_kinds_through_generated_code(tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None) -> None:
    """column/row/direct/replicated/reshape rules and a zero-centred final norm. megatron-core's
    CPU norms cannot run a zero-centred gamma, so that one is checked by value (w - 1, exact for
    weights in [0.5, 2]) and undone for the forward pass."""
    folder, hf_model = tiny_checkpoint("llama")
    module = compile_module(str(testing.ROOT / "tests/specs/llama_kinds.yaml"), folder / "config.json")
    kinds = {p.megatron_name: p for p in module.PARAMS}
    assert kinds["decoder.layers.0.mlp.linear_fc2.weight"].split_dim == 1
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
    model.eval()
    load_hf_checkpoint(module, [model], str(folder))
    original = load_file(folder / "model.safetensors")
    norm = dict(model.named_parameters())["decoder.final_layernorm.weight"]
    assert torch.equal(norm, original["model.norm.weight"] - 1)
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        norm.add_(1)
        assert (forward.megatron_logits(model, input_ids) - forward.hf_logits(hf_model, input_ids)).abs().max() <= 1e-5
        norm.sub_(1)
    for name, tensor in export_hf_tensors(module, [model]):
        assert torch.equal(tensor, original[name]), name


def _deepseek_te_name(name: str) -> str:
    """megatron-core's TE layer spec names for MLA + MoE, written out independently of
    mapgen.compiler.inventory: fused q/kv up-projection norms, grouped experts, and the pre-MLP norm
    fused into linear_fc1 only in the dense layer (layer 0)."""
    import re

    name = name.replace(".self_attention.q_layernorm.", ".self_attention.linear_q_up_proj.layer_norm_")
    name = name.replace(".self_attention.kv_layernorm.", ".self_attention.linear_kv_up_proj.layer_norm_")
    name = name.replace("decoder.layers.0.pre_mlp_layernorm.", "decoder.layers.0.mlp.linear_fc1.layer_norm_")
    return re.sub(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", r".mlp.experts.\2.weight\1", name)


def test_te_layout_of_mla_and_grouped_experts(tiny_checkpoint: Any, compile_module: Any) -> None:
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.checkpoint import HFCheckpoint

    folder, _ = tiny_checkpoint("deepseek_v3")
    local = compile_module("deepseek_v3", folder / "config.json", "local")
    te = compile_module("deepseek_v3", folder / "config.json", "te")
    te_plans = {p.megatron_name: p for p in te.PARAMS}
    assert sorted(_deepseek_te_name(p.megatron_name) for p in local.PARAMS) == sorted(te_plans)
    assert te_plans["decoder.layers.2.mlp.experts.linear_fc1.weight7"].expert == 7
    assert "decoder.layers.2.pre_mlp_layernorm.weight" in te_plans
    checkpoint = HFCheckpoint(folder)
    ctx = ParallelContext.single()
    for plan in local.PARAMS:
        twin = te_plans[_deepseek_te_name(plan.megatron_name)]
        assert (plan.shape, plan.hf_names, plan.expert) == (twin.shape, twin.hf_names, twin.expert)
        # local MLA down projections are column-parallel; TE's are duplicated (TELinear)
        duplicated = "_down_proj." in plan.megatron_name
        assert (plan.split_dim, twin.split_dim) == ((0, None) if duplicated else (plan.split_dim, plan.split_dim))
        assert torch.equal(local.IMPORTS[plan.megatron_name](ctx, checkpoint.get), te.IMPORTS[twin.megatron_name](ctx, checkpoint.get))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_checkpoint_with_stacked_experts(family: str, tmp_path: Any, tiny_checkpoint: Any, cpu_megatron: None) -> None:
    """A checkpoint that stores each layer's experts stacked (`experts.gate_up_proj` [E, 2I, H],
    `experts.down_proj` [E, H, I], as transformers holds them in memory): each expert reads its
    slice on import, and export stacks the slices back, bit for bit."""
    from safetensors.torch import save_file

    from mapgen.compiler.build import compile_target

    folder, hf_model = tiny_checkpoint(family)
    stacked = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in stacked)
    save_file(stacked, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    source = compile_target("stacked", testing.ROOT / testing.FAMILY_SPECS[family], tmp_path / "config.json", "local", "test", hf_experts="stacked")
    (tmp_path / "stacked.py").write_text(source)
    module = testing.import_module_from_path(tmp_path / "stacked.py", f"stacked_{family}")
    assert "rt.halves(load(" in source and "gate_up_proj[3]" in source
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32).eval()
    load_hf_checkpoint(module, [model], str(tmp_path))
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    assert (forward.megatron_logits(model, input_ids) - forward.hf_logits(hf_model, input_ids)).abs().max() <= 1e-5
    exported = dict(export_hf_tensors(module, [model]))
    assert sorted(exported) == sorted(stacked)
    for name, tensor in exported.items():
        assert torch.equal(tensor, stacked[name]), name
