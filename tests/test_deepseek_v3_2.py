"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): DeepSeek-V3 with a DSA indexer in every attention
layer, on megatron-core 0.19's DSA layer built without TransformerEngine (mapgen/compiler/dsa_model.py).
Its stand-in runs at TP 2, PP 2, EP 2 and TP 2 x EP 2 in tests/test_distributed.py (0.19+); here:
the names the DSA layer takes (norms unfused, indexer duplicated), that the stand-in's forward
checks the indexer's mapping (its top-k is below the positions verify runs), the HF -> Megatron ->
HF round trip in TE names, FP8 checkpoints with DeepSeek-V3.2's `scale_fmt: ue8m0`, and the
refusal on megatron-core 0.16.1, which cannot run the layer on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen.common.errors import NeedsNewerMegatronCore
from mapgen.compiler.build import compile_target
from mapgen.compiler.targets import Skipped, compile_entries, read_targets
from mapgen.compiler.dsa_model import dsa_supported
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.parallel_state import single_process_parallel_state
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.verify import forward, testing

SPEC = testing.ROOT / "specs" / "deepseek_v3_2.yaml"
CONFIG = testing.ROOT / "specs" / "configs" / "deepseek_v3_2.json"
HAS_DSA = dsa_supported() is None
needs_dsa = pytest.mark.skipif(not HAS_DSA, reason=f"megatron-core builds no CPU DSA layer here: {dsa_supported()}")
INDEXER = ("linear_wq_b.weight", "linear_wk.weight", "k_norm.weight", "k_norm.bias", "linear_weights_proj.weight")


def _published() -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(CONFIG.read_text())
    return fields


def test_the_checked_in_module_maps_deepseek_v3_plus_the_indexer() -> None:
    """generated/deepseek_v3_2 (te names) is generated/deepseek_v3's parameters with the q and kv
    latent norms unfused (self_attention.q_layernorm / kv_layernorm) and five indexer tensors per
    attention layer (61 decoder layers and the MTP layer), replicated over TP; the published
    config's DSA sizes are the module's."""
    from generated import deepseek_v3 as v3
    from generated import deepseek_v3_2 as v32

    fields = _published()
    dims = v32.DIMS
    assert (dims.dsa_indexer_n_heads, dims.dsa_indexer_head_dim, dims.dsa_indexer_topk) == (64, 128, 2048)
    assert (dims.moe_dense_layers, dims.mtp_num_layers, dims.q_lora_rank) == ((0, 1, 2), 1, 1536)
    unfused = {
        "linear_q_up_proj.layer_norm_weight": "q_layernorm.weight",
        "linear_kv_up_proj.layer_norm_weight": "kv_layernorm.weight",
    }

    def renamed(name: str) -> str:
        for fused, plain in unfused.items():
            name = name.replace(f"self_attention.{fused}", f"self_attention.{plain}")
        return name

    ours = {p.megatron_name: p for p in v32.PARAMS}
    attention_layers = [p.megatron_name.rsplit(".linear_proj.", 1)[0] for p in v3.PARAMS if p.megatron_name.endswith("self_attention.linear_proj.weight")]
    assert len(attention_layers) == fields["num_hidden_layers"] + fields["num_nextn_predict_layers"] == 62
    indexer = {f"{layer}.core_attention.indexer.{leaf}" for layer in attention_layers for leaf in INDEXER}
    assert set(ours) == {renamed(p.megatron_name) for p in v3.PARAMS} | indexer
    assert not [n for n in ours if "layer_norm_weight" in n and "self_attention" in n]
    heads, head_dim, hidden = fields["index_n_heads"], fields["index_head_dim"], fields["hidden_size"]
    shapes = {
        "linear_wq_b.weight": (heads * head_dim, fields["q_lora_rank"]), "linear_wk.weight": (head_dim, hidden),
        "k_norm.weight": (head_dim,), "k_norm.bias": (head_dim,), "linear_weights_proj.weight": (heads, hidden),
    }
    for name in indexer:
        plan = ours[name]
        assert plan.shape == shapes[name.rsplit("indexer.", 1)[1]] and plan.split_dim is None, name
        layer = name.split(".self_attention.")[0].replace("decoder.layers.", "model.layers.").replace("mtp.layers.0.transformer_layer", "model.layers.61")
        hf = name.rsplit("indexer.", 1)[1].replace("linear_", "")
        assert plan.hf_names == (f"{layer}.self_attn.indexer.{hf}",), name


@needs_dsa
def test_megatron_cores_own_dsa_spec_keeps_the_latent_norms_out_of_the_up_projections() -> None:
    """The independent truth for the names above: megatron-core's DSA layer spec
    (`get_dsa_module_spec_for_backend`, whatever the backend) gives q_layernorm and kv_layernorm
    modules of their own and plain column-parallel up-projections, and builds the indexer's
    projections with the backend's plain (duplicated) linear."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_dsa_module_spec_for_backend
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    class Backend:  # each method names what it was asked for
        def linear(self) -> str:
            return "linear"

        def column_parallel_linear(self) -> str:
            return "column"

        def row_parallel_linear(self) -> str:
            return "row"

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> str:
            return f"norm rms={rms_norm}"

    config = MLATransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
        qk_pos_emb_head_dim=8, v_head_dim=16, normalization="RMSNorm", qk_layernorm=True, add_bias_linear=False,
        experimental_attention_variant="dsa", dsa_indexer_n_heads=4, dsa_indexer_head_dim=16, dsa_indexer_topk=4,
    )
    spec = get_dsa_module_spec_for_backend(config, Backend())  # type: ignore[arg-type]
    sub = spec.submodules
    assert (sub.q_layernorm, sub.kv_layernorm) == ("norm rms=True", "norm rms=True")
    assert (sub.linear_q_up_proj, sub.linear_kv_up_proj) == ("column", "column")
    indexer = sub.core_attention.submodules.indexer.submodules
    assert (indexer.linear_wq_b, indexer.linear_wk, indexer.linear_weights_proj) == ("linear",) * 3
    assert indexer.k_norm == "norm rms=False"  # a LayerNorm: weight and bias


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("deepseek_v3_2")
    testing.save_standin(_published(), folder)
    return folder


def test_the_standins_indexer_keeps_fewer_keys_than_verify_runs_positions(standin: Path) -> None:
    """Sparse top-k equals dense attention below index_topk keys: the stand-in keeps 4, so over
    verify's 7 positions transformers' logits at positions 4 to 6 depend on the indexer (a wrong
    indexer mapping changes them), and at 0 to 3 do not."""
    import transformers

    config = json.loads((standin / "config.json").read_text())
    assert config["index_topk"] == 4 and config["layer_types"] == ["indexed_attention"] * 4
    model = transformers.AutoModelForCausalLM.from_pretrained(standin, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    sparse = forward.hf_logits(model, input_ids)
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = 2048
    dense = forward.hf_logits(model, input_ids)
    difference = (sparse - dense).abs().amax(dim=(0, 2))
    assert difference[:4].max() < 1e-6 and difference[4:].min() > 1e-2, difference


@needs_dsa
def test_megatron_cores_dsa_layer_is_transformers_and_a_misplaced_indexer_shows(standin: Path, cpu_megatron: None) -> None:
    """One process: the stand-in through mapgen's local module gives transformers' logits; the
    same model with two layers' indexer q projections swapped (a wrong mapping) does not."""
    import transformers

    from mapgen.runtime import ParallelContext
    from mapgen.runtime.drivers import Converter
    from mapgen.verify.forward import pipeline_logits

    path = standin.parent / "deepseek_v3_2_local.py"
    path.write_text(compile_target("deepseek_v3_2_local", SPEC, standin / "config.json", "local", "test"))
    module = testing.import_module_from_path(path)
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = forward.hf_logits(transformers.AutoModelForCausalLM.from_pretrained(standin, dtype=torch.float32).eval(), input_ids)
    with single_process_parallel_state():
        chunks = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=torch.float32)
        Converter(module, chunks, ParallelContext.single()).load(standin)
        ours = pipeline_logits(chunks, input_ids, ParallelContext.single(), module.DIMS.hidden_size)
        assert ours is not None and ours.shape[1] == 2 * 7  # the main model's logits, then the MTP layer's
        ours = ours[:, :7]
        assert (ours - expected).abs().max() <= 1e-5
        layers = chunks[0].decoder.layers
        first, second = (layers[i].self_attention.core_attention.indexer.linear_wq_b.weight for i in (1, 2))
        with torch.no_grad():
            saved = first.clone()
            first.copy_(second)
            second.copy_(saved)
        swapped = pipeline_logits(chunks, input_ids, ParallelContext.single(), module.DIMS.hidden_size)
    assert swapped is not None and (swapped[:, :7] - expected).abs().max() > 1e-3


@needs_dsa
def test_hf_to_megatron_in_te_names_and_back_is_bit_exact(standin: Path, tmp_path: Path) -> None:
    """One spawn of 4 processes: the stand-in written at TP 2 with TransformerEngine's names (the
    DSA layer's unfused norms, the indexer), read back at PP 2 x EP 2, equals the original bits."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from mapgen.convert_job import ConvertJob
    from mapgen.convert_rank import run_convert
    from mapgen.verify.processes import TaskFailed, spawn
    from mapgen.verify.verdict import same_bits

    module = tmp_path / "deepseek_v3_2_local.py"  # the CPU's layer spec; the checkpoint in te names
    module.write_text(compile_target("deepseek_v3_2_local", SPEC, standin / "config.json", "local", "test"))
    config = json.loads((standin / "config.json").read_text())
    out, back = tmp_path / "megatron", tmp_path / "back"
    jobs = [
        ConvertJob("hf-to-megatron", str(module), str(standin), str(out), ParallelLayout(tp=2, dp=2), config, progress=False, key_style="te"),
        ConvertJob("megatron-to-hf", str(module), str(out), str(back), ParallelLayout(pp=2, ep=2, dp=2), config, progress=False, key_style="te"),
    ]
    results = spawn([(run_convert, (job,)) for job in jobs], 4, timeout_s=900, what="conversion")
    for rank_results in results.values():
        for result in rank_results:
            assert not isinstance(result, TaskFailed), result.traceback
            assert result.error is None, result.error
    keys = set(FileSystemReader(str(out / "release")).read_metadata().state_dict_metadata)
    for layer in ("decoder.layers.0", "decoder.layers.3", "mtp.layers.0.transformer_layer"):
        assert f"{layer}.self_attention.q_layernorm.weight" in keys and f"{layer}.self_attention.kv_layernorm.weight" in keys
        assert {f"{layer}.self_attention.core_attention.indexer.{leaf}" for leaf in INDEXER} <= keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys  # the dense MLP's norm stays fused
    assert not [k for k in keys if "linear_q_up_proj.layer_norm" in k or "linear_kv_up_proj.layer_norm" in k]
    original, converted = load_file(standin / "model.safetensors"), {}
    for file in back.glob("*.safetensors"):
        converted.update(load_file(file))
    assert set(converted) == set(original) and len(original) == 198
    assert [n for n in original if not same_bits(converted[n], original[n])] == []


def test_fp8_blocks_with_ue8m0_scales_read_as_their_float32_products(tmp_path: Path) -> None:
    """DeepSeek-V3.2's quantization_config says scale_fmt "ue8m0": its block scales are powers of
    two, stored as F32 `*_scale_inv` like DeepSeek-V3's; the reader dequantizes them alike."""
    from safetensors.torch import save_file

    from mapgen.runtime.checkpoint import HFCheckpoint

    quantization = _published()["quantization_config"]
    assert quantization["scale_fmt"] == "ue8m0" and quantization["weight_block_size"] == [128, 128]
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantization}))
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 200, generator=generator) * 4).to(torch.float8_e4m3fn)
    scales = torch.exp2(torch.randint(-12, 3, (2, 2), generator=generator).float())  # ue8m0: 2^e
    save_file({"w": weight, "w_scale_inv": scales}, str(tmp_path / "model.safetensors"))
    read = HFCheckpoint(tmp_path).get("w")
    expected = weight.float() * scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[:256, :200]
    assert read.dtype == torch.float32 and torch.equal(read, expected)
    # the same scales as raw E8M0 exponent bytes (2^(byte - 127)): refused, not misread as numbers
    save_file({"w": weight, "w_scale_inv": (torch.log2(scales) + 127).to(torch.uint8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(Exception, match="w_scale_inv' has dtype U8, not a float"):
        HFCheckpoint(tmp_path).get("w")


@pytest.mark.skipif(HAS_DSA, reason="this megatron-core builds the DSA layer")
def test_megatron_core_0_16_refuses_the_target_naming_what_it_lacks(tmp_path: Path) -> None:
    """megatron-core 0.16.1's indexer always applies the Hadamard rotation (bf16, CUDA): the build
    refuses DeepSeek-V3.2 with NeedsNewerMegatronCore, which `mapgen build` and `mapgen check`
    turn into a skipped target."""
    with pytest.raises(NeedsNewerMegatronCore, match=r"megatron-core 0\.19 or later.*dsa_indexer_rotate_activation"):
        compile_target("deepseek_v3_2", SPEC, CONFIG, "te", "test")
    (entry,) = [e for e in read_targets(testing.ROOT) if e.name == "deepseek_v3_2"]
    ((_, outcome, _, _),) = list(compile_entries(testing.ROOT, [entry]))
    assert isinstance(outcome, Skipped) and "DSA" in outcome.reason
