"""gpt-oss (issue 10 item 1): the spec's pieces against transformers and megatron-core, the MXFP4
reader against transformers' own dequantization, and tiny stand-ins through megatron-core at
TP2, EP2 and TP2 x EP2 (with whole experts: megatron-core builds biased experts at expert-TP 1
only), one spawn of 4 gloo processes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mapgen.common.errors import SpecError
from mapgen.compiler.build import compile_target
from mapgen.compiler.config import translate
from mapgen.compiler.hfconfig import read_hf_config
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.megatron_config import transformer_config
from mapgen.compiler.spec import parse_spec
from mapgen.runtime import mxfp4, ops
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.context import Group
from mapgen.runtime.shardmap import shard_map
from mapgen.verify import forward, testing
from mapgen.verify.jobs import layout_problems, run_job
from mapgen.verify.processes import spawn
from mapgen.verify.verdict import Job
from mapgen.verify.mxfp4_standin import write_mxfp4_twins

import gpt_oss_tasks

SPEC = testing.ROOT / "specs/gpt_oss.yaml"
PUBLISHED = testing.ROOT / "specs/configs/gpt_oss_20b.json"
WORLD = 4


def _published() -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(PUBLISHED.read_text())
    return fields


def _dims(fields: dict[str, Any]) -> Any:
    return translate(parse_spec(str(SPEC), SPEC.read_text()), read_hf_config("config.json", json.dumps(fields, indent=2)))


# --- MXFP4 --------------------------------------------------------------------------------------


def test_mxfp4_dequantization_equals_transformers() -> None:
    """Every byte (both nibbles) under scales from 2^-20 to 2^20 and the extremes e8m0 can
    write, against transformers' own `convert_moe_packed_tensors`, bit for bit, in float32 and
    (cast) bfloat16."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=generator)
    blocks[0, 0, :, :] = torch.arange(256, dtype=torch.int32).reshape(4, 64)[:, :16].to(torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256).to(torch.uint8)
    scales = torch.randint(127 - 20, 127 + 21, (3, 40, 4), dtype=torch.uint8, generator=generator)
    scales[0, 0] = torch.tensor([1, 127, 200, 254], dtype=torch.uint8)
    ours = mxfp4.dequantize(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
    assert ours.shape == theirs.shape == (3, 4 * 32, 40) == mxfp4.dequantized_shape(tuple(blocks.shape))
    assert ours.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    theirs_bf16 = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.bfloat16)
    assert torch.equal(ours.to(torch.bfloat16).view(torch.int16), theirs_bf16.view(torch.int16))


def test_mxfp4_quantize_gives_back_mxfp4_values() -> None:
    """The stand-in quantizer: values already on the MXFP4 grid come back exactly; others land
    within half a step of the block's scale."""
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(120, 130, (2, 6, 3), dtype=torch.uint8, generator=generator)
    exact = mxfp4.dequantize(blocks, scales)
    again = mxfp4.dequantize(*mxfp4.quantize(exact))
    assert torch.equal(again, exact)
    weights = torch.randn(2, 96, 10, generator=generator) * 0.05
    twin = mxfp4.dequantize(*mxfp4.quantize(weights))
    per_block = weights.transpose(-1, -2).reshape(2, 10, 3, 32).abs().amax(-1)
    step = torch.pow(2.0, torch.ceil(torch.log2(per_block / 6.0)))  # the scale: 2^e, code steps up to 2 scales
    error = (twin - weights).transpose(-1, -2).reshape(2, 10, 3, 32).abs().amax(-1)
    assert bool((error <= step).all()) and not torch.equal(twin, weights)


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"quantization_config": {"quant_method": "mxfp4"}}))
    return folder


def test_mxfp4_companions_are_hidden_and_checked(tmp_path: Path) -> None:
    blocks, scales = mxfp4.quantize(torch.randn(4, 64, 6))
    good = _write(tmp_path / "good", {"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales, "b": torch.ones(3)})
    checkpoint = HFCheckpoint(good)
    assert checkpoint.names() == ["b", "e.gate_up_proj"] and "e.gate_up_proj" in checkpoint
    assert "e.gate_up_proj_blocks" not in checkpoint and checkpoint.mxfp4_names() == ["e.gate_up_proj"]
    assert checkpoint.shape("e.gate_up_proj") == (4, 64, 6) and checkpoint.dtype("e.gate_up_proj") == "MXFP4"
    assert checkpoint.quantized("e.gate_up_proj") and checkpoint.integrity_problems() == []
    whole = checkpoint.get("e.gate_up_proj")
    stacked = checkpoint.loader()("e.gate_up_proj")
    assert tuple(stacked.shape) == (4, 64, 6)
    assert all(torch.equal(stacked[e], whole[e]) for e in range(4))
    assert torch.equal(whole, mxfp4.dequantize(blocks, scales))

    broken = _write(tmp_path / "broken", {
        "x_blocks": blocks, "x_scales": scales[:, :, :1].contiguous(),  # one scale per row, not per block
        "y_blocks": blocks.to(torch.int8), "y_scales": scales.clone(),  # not U8
        "z_scales": scales.clone(),  # no blocks
    })
    problems = HFCheckpoint(broken).integrity_problems()
    assert any("'x'" in p and "x_scales has shape [4, 6, 1]" in p and "[4, 6, 2]" in p for p in problems), problems
    assert any("'y'" in p and "I8" in p for p in problems), problems
    assert any("'z_scales' has no companion 'z_blocks'" in p for p in problems), problems
    with pytest.raises(Exception, match="x_scales has shape"):
        HFCheckpoint(broken).get("x")


# --- the spec's pieces ----------------------------------------------------------------------------


def test_interleaved_applies_to_gated_mlp_only() -> None:
    text = SPEC.read_text()
    rule = "hf: model.layers.*.mlp.experts.down_proj[*]\n    kind: auto\n"
    assert rule in text
    with pytest.raises(SpecError) as raised:
        parse_spec(str(SPEC), text.replace(rule, rule + "    interleaved: true\n"))
    assert any("'interleaved' applies only to kind 'gated_mlp', not 'auto'" in m for m in raised.value.messages)
    with pytest.raises(SpecError) as raised:
        parse_spec(str(SPEC), text.replace("interleaved: true", "interleaved: 1", 1))
    assert any("'interleaved' must be true or false, got 1" in m for m in raised.value.messages)


def test_interleaved_gate_up_round_trips_over_expert_tp() -> None:
    """alternate_rows reads gpt-oss's gate (even rows) and up (odd rows); export interleaves the
    gathered [gate_r; up_r] shards back, at 1 and 2 ranks."""
    fused = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)
    gate, up = ops.alternate_rows(fused)
    assert torch.equal(gate, fused[0::2]) and torch.equal(up, fused[1::2])
    for size in (1, 2):
        parts = [ops.gated_mlp_import(Group(rank, size), gate, up) for rank in range(size)]
        assert torch.equal(ops.interleaved_gated_mlp_export(parts), fused)


def test_published_config_is_understood_and_gives_megatron_cores_fields() -> None:
    dims = _dims(_published())
    assert dims.sliding_window == 128 and dims.window_attention_layers == tuple(range(0, 24, 2))
    assert (dims.softmax_type, dims.glu_linear_offset, dims.activation_func_clamp_value) == ("learnable", 1.0, 7.0)
    assert (dims.rope_type, dims.rope_scaling_factor, dims.rope_correction_range_round_to_int) == ("yarn", 32.0, False)
    assert (dims.num_moe_experts, dims.moe_router_topk, dims.moe_layers) == (32, 4, tuple(range(24)))
    from megatron.core.activations import quick_gelu

    config = transformer_config(dims)
    assert config.softmax_type == "learnable" and config.glu_linear_offset == 1.0
    assert config.activation_func_clamp_value == 7.0 and config.activation_func is quick_gelu
    assert config.window_size == (127, 0) and config.window_attn_skip_freq == [1, 0] * 12
    assert config.add_bias_linear and not config.moe_router_pre_softmax
    assert (config.yarn_rotary_scaling_factor, config.yarn_original_max_position_embeddings) == (32.0, 4096)
    assert config.yarn_correction_range_round_to_int is False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"swiglu_alpha": 1.5}, "config field 'swiglu_alpha' is 1.5, but spec"),
        ({"attention_bias": False}, "config field 'attention_bias' is false, but spec"),
        ({"experts_per_token": 2}, "config field 'experts_per_token' is 2, but spec"),
        ({"rope_scaling": {**_published()["rope_scaling"], "attention_factor": 1.5}}, "'rope_scaling.attention_factor' is unknown"),
    ],
    ids=["swiglu_alpha", "attention_bias", "experts_per_token", "attention_factor"],
)
def test_what_megatron_core_cannot_build_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as raised:
        _dims({**_published(), **change})
    assert any(message in m for m in raised.value.messages), raised.value.messages


def test_yarn_rope_equals_transformers(cpu_megatron: None) -> None:
    """megatron-core's YaRN (GPTModel's, as the config sets it up) against transformers'
    gpt-oss rotary embedding: inverse frequencies and the cos/sin scale, truncate false."""
    import transformers
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    fields = testing.standin_config(_published())
    # transformers writes into the rope dict it is given: give it a copy
    hf = transformers.AutoConfig.for_model("gpt_oss", **{k: v for k, v in copy.deepcopy(fields).items() if k != "model_type"})
    theirs = GptOssRotaryEmbedding(hf)
    positions = torch.arange(300)[None]
    cos, sin = theirs(torch.zeros(1, dtype=torch.float32), positions)
    config = transformer_config(_dims(fields))
    ours = YarnRotaryEmbedding(
        kv_channels=config.kv_channels, rotary_base=_dims(fields).rotary_base, use_cpu_initialization=True,
        scaling_factor=config.yarn_rotary_scaling_factor, original_max_position_embeddings=config.yarn_original_max_position_embeddings,
        beta_fast=config.yarn_beta_fast, beta_slow=config.yarn_beta_slow, mscale=config.yarn_mscale,
        mscale_all_dim=config.yarn_mscale_all_dim, correction_range_round_to_int=config.yarn_correction_range_round_to_int,
    )
    emb, _ = ours(300)
    scale = _yarn_get_concentration_factor_from_config(config)
    assert scale == theirs.attention_scaling
    half = emb.shape[-1] // 2
    freqs = emb[:, 0, 0, :half]
    assert torch.equal((freqs.cos() * scale), cos[0]) and torch.equal((freqs.sin() * scale), sin[0])


# --- tiny stand-ins through megatron-core -----------------------------------------------------------

LAYOUTS = [
    ParallelLayout(dp=4),  # one process's model
    ParallelLayout(tp=2, etp=1, dp=2),
    ParallelLayout(ep=2, dp=4),
    ParallelLayout(tp=2, ep=2, etp=1, dp=2),
]


def _module(folder: Path, name: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(compile_target(name, SPEC, folder / "config.json", "local", "test"))
    return path


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The float32 stand-in of the published config and its local-layout module."""
    root = tmp_path_factory.mktemp("gpt_oss")
    float_dir = root / "float"
    testing.save_standin(_published(), float_dir)
    return float_dir, _module(float_dir, "gpt_oss_local")


@pytest.mark.parametrize(
    "layout", [ParallelLayout(tp=2, ep=2, dp=2), ParallelLayout(tp=2, ep=2, etp=1, dp=2), ParallelLayout(tp=2, pp=2, ep=2, etp=1, dp=2)], ids=str
)
def test_shard_map_covers_the_interleaved_experts(standin: tuple[Path, Path], layout: ParallelLayout) -> None:
    """The static shard map (export_local, explain) against the import functions: every HF
    element covered once per replica, each rank's shard made of exactly its pieces; at
    expert-TP 2 (which megatron-core does not build with expert biases, but the map is
    static) rank r's fc1 slice is HF rows [2 start, 2 stop) of the transposed gate_up_proj."""
    from test_shardmap import coverage_problems, hf_values, shard_problems

    module = testing.import_module_from_path(standin[1], f"gpt_oss_map_{layout}".replace(" ", ""))
    smap = shard_map(module, layout)
    assert coverage_problems(module, smap) == []
    tensors = hf_values(module)
    assert [p for shards in smap.params.values() for p in shard_problems(module, layout, shards, tensors)] == []
    fc1 = smap.params["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
    runs = {tuple(piece.runs) for shard in fc1.shards for piece in shard.pieces}
    if layout.expert_tp == 2:  # gate_up_proj[1] is [64, 192]: rank r holds its columns 96 r to 96 (r + 1)
        assert runs == {(((0, 64),), ((0, 96),)), (((0, 64),), ((96, 192),))}


@pytest.fixture(scope="module")
def outcome(standin: tuple[Path, Path]) -> dict[str, Any]:
    float_dir, module = standin
    root = float_dir.parent
    # a limit the tiny model's activations pass, so that the clamp changes the logits
    clamped_dir = root / "clamped"
    testing.save_standin({**_published(), "swiglu_limit": 0.02}, clamped_dir)
    clamped_module = _module(clamped_dir, "gpt_oss_clamped")
    mxfp4_dir, twin_dir = root / "mxfp4", root / "twin"
    quantized = write_mxfp4_twins(float_dir, mxfp4_dir, twin_dir, _published()["quantization_config"])
    tasks: list[tuple[Any, tuple[Any, ...]]] = []
    labels: list[str] = []
    for layout in LAYOUTS:
        tasks.append((run_job, (Job(str(module), str(float_dir), layout),)))
        labels.append(f"float {layout}")
    for layout in (ParallelLayout(ep=2, dp=4), ParallelLayout(tp=2, ep=2, etp=1, dp=2)):
        tasks.append((run_job, (Job(str(module), str(twin_dir), layout),)))
        labels.append(f"twin {layout}")
        tasks.append((gpt_oss_tasks.mxfp4_against_twin, (str(module), str(mxfp4_dir), str(twin_dir), layout)))
        labels.append(f"mxfp4 {layout}")
    tasks.append((run_job, (Job(str(clamped_module), str(clamped_dir), ParallelLayout(tp=2, ep=2, etp=1, dp=2)),)))
    labels.append("clamped")
    results = spawn(tasks, WORLD, timeout_s=1500)
    by_label = {label: [results[r][k] for r in range(WORLD)] for k, label in enumerate(labels)}
    return {"root": root, "by_label": by_label, "quantized": quantized, "module": module}


def _ok(result: Any) -> None:
    assert result.error is None, result.error
    assert result.tensors > 0 and result.bit_exact == result.tensors and not result.mismatched, result.mismatched
    assert result.max_logit_diff <= 1e-5, result.max_logit_diff


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_standin_matches_transformers_and_exports_bit_exact(outcome: dict[str, Any], layout: ParallelLayout) -> None:
    result = outcome["by_label"][f"float {layout}"][0]
    _ok(result)
    assert result.tensors == 4 * 17 + 3  # 17 tensors per layer (8 stacked ones), embeddings, norm, lm_head


@pytest.mark.parametrize("layout", [ParallelLayout(ep=2, dp=4), ParallelLayout(tp=2, ep=2, etp=1, dp=2)], ids=str)
def test_mxfp4_standin_imports_as_its_dequantized_twin(outcome: dict[str, Any], layout: ParallelLayout) -> None:
    """The twin verifies against transformers; the MXFP4 checkpoint imports into exactly the
    twin's parameters on every rank, and exports the twin's tensors (float32 and bfloat16)."""
    _ok(outcome["by_label"][f"twin {layout}"][0])
    assert len(outcome["quantized"]) == 8  # gate_up_proj and down_proj of 4 layers
    for rank, found in enumerate(outcome["by_label"][f"mxfp4 {layout}"]):
        assert found["params"] > 0 and found["unequal"] == [], (rank, found["unequal"])
        assert found["mismatched"] == [] and found["mismatched_bf16"] == [], rank
        assert set(outcome["quantized"]) <= set(found["exported"])  # exported under the HF names
        assert found["bf16_dtypes"] == ["torch.bfloat16"]


def test_the_clamp_is_matched_where_it_bites(outcome: dict[str, Any], tmp_path: Path) -> None:
    _ok(outcome["by_label"]["clamped"][0])
    import transformers

    clamped = transformers.AutoModelForCausalLM.from_pretrained(outcome["root"] / "clamped").eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    loose = forward.hf_logits(clamped, ids)
    for layer in clamped.model.layers:
        layer.mlp.experts.limit = 7.0
    assert (forward.hf_logits(clamped, ids) - loose).abs().max() > 1e-3  # the limit changed the logits


def test_expert_tp_above_one_is_refused_before_any_process(outcome: dict[str, Any]) -> None:
    module = testing.import_module_from_path(outcome["module"], "gpt_oss_refusal")
    problems = layout_problems(module, ParallelLayout(tp=2, ep=2, dp=2))
    assert any("megatron-core builds experts with biases" in p and "--etp 1" in p for p in problems), problems
    assert layout_problems(module, ParallelLayout(tp=2, ep=2, etp=1, dp=2)) == []
