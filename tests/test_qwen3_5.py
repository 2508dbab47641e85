"""Qwen3.5 (issue 25, family 1): the sectioned gated delta net input projection (kind
gdn_in_proj_sections) against transformers' own module and against Qwen3-Next's packed layout,
its static shard map, the dims of the four text configs, and two wrong conventions that the
forward check must catch. The stand-ins' TP/PP/EP verification is tests/test_distributed.py's
(every target of specs/targets.yaml)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen import runtime as rt
from mapgen.compiler.build import compile_target
from mapgen.compiler.targets import read_targets
from mapgen.common.parallel import ParallelLayout
from mapgen.runtime.context import Group
from mapgen.common.sections import gdn_in_proj_sections
from mapgen.runtime.sections import sections_export, sections_import
from mapgen.runtime.shardmap import shard_map
from mapgen.verify import testing
from mapgen.verify.jobs import run_job
from mapgen.verify.processes import spawn
from mapgen.verify.verdict import Job

from test_shardmap import coverage_problems, hf_values, shard_problems

TARGETS = {entry.name: entry for entry in read_targets(testing.ROOT)}
KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, HIDDEN = 4, 8, 6, 10, 12
R = VALUE_HEADS // KEY_HEADS


def _gated_delta_net(module_name: str) -> Any:
    """transformers' gated delta net of Qwen3.5 or Qwen3-Next, one layer of these sizes."""
    import transformers

    sizes = dict(
        hidden_size=HIDDEN, linear_num_key_heads=KEY_HEADS, linear_num_value_heads=VALUE_HEADS,
        linear_key_head_dim=KEY_DIM, linear_value_head_dim=VALUE_DIM, num_hidden_layers=1,
        layer_types=["linear_attention"],
    )
    if module_name == "qwen3_5":
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

        return Qwen3_5GatedDeltaNet(transformers.Qwen3_5TextConfig(**sizes), 0)
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    return Qwen3NextGatedDeltaNet(transformers.Qwen3NextConfig(**sizes), 0)


def _random(shape: torch.Size, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


SECTIONS = gdn_in_proj_sections(KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_in_proj_sections_are_transformers_split_in_megatron_core_order(tp: int) -> None:
    """transformers' Qwen3.5 forward splits in_proj_qkv's output as [key_dim, key_dim, value_dim]
    (q, k, v) and reads z, b, a from their own projections; megatron-core's rank t holds
    [q_t; k_t; v_t; z_t; b_t; a_t], each section's t-th block. Export joins them back bit for
    bit; one rank's shard alone gives that rank's rows of every HF tensor (export_local)."""
    module = _gated_delta_net("qwen3_5")
    tensors = [_random(p.weight.shape, i) for i, p in enumerate((module.in_proj_qkv, module.in_proj_z, module.in_proj_b, module.in_proj_a))]
    q, k, v = torch.split(tensors[0], [module.key_dim, module.key_dim, module.value_dim], dim=0)
    sections = [q, k, v, *tensors[1:]]
    assert [s.shape[0] for s in sections] == [KEY_HEADS * KEY_DIM] * 2 + [VALUE_HEADS * VALUE_DIM] + [VALUE_HEADS * VALUE_DIM, VALUE_HEADS, VALUE_HEADS]
    parts = []
    for rank in range(tp):
        shard = sections_import(Group(rank, tp), *tensors, sections=SECTIONS)
        assert torch.equal(shard, torch.cat([s.chunk(tp, dim=0)[rank] for s in sections], dim=0))
        parts.append(shard)
    back = sections_export(parts, sections=SECTIONS)
    assert all(torch.equal(b, t) for b, t in zip(back, tensors))
    alone = sections_export(parts[-1:], sections=SECTIONS)
    assert torch.equal(alone[0], torch.cat([s.chunk(tp, dim=0)[-1] for s in (q, k, v)], dim=0))
    assert all(torch.equal(a, t.chunk(tp, dim=0)[-1]) for a, t in zip(alone[1:], tensors[1:]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qwen3_5_sections_and_qwen3_next_packing_give_the_same_megatron_shard(tp: int) -> None:
    """The same projection in both HF layouts (Qwen3-Next's per-key-head packing, unpacked by
    transformers' own fix_query_key_value_ordering, re-joined as Qwen3.5 holds it) imports to
    the same megatron-core shard by either kind."""
    module = _gated_delta_net("qwen3_next")
    qkvz, ba = _random(module.in_proj_qkvz.weight.shape, 7), _random(module.in_proj_ba.weight.shape, 8)
    q, k, v, z, b, a = (t[0].reshape(HIDDEN, -1).T for t in module.fix_query_key_value_ordering(qkvz.T[None], ba.T[None]))
    qwen3_5 = (torch.cat([q, k, v], dim=0), z, b, a)
    args = dict(key_dim=KEY_DIM, value_dim=VALUE_DIM, v_per_k=R)
    for rank in range(tp):
        packed = rt.gdn_in_proj_import(Group(rank, tp), qkvz, ba, **args)
        assert torch.equal(rt.sections_import(Group(rank, tp), *qwen3_5, sections=SECTIONS), packed)


def test_sections_that_do_not_fit_are_refused() -> None:
    module = _gated_delta_net("qwen3_5")
    tensors = [p.weight for p in (module.in_proj_qkv, module.in_proj_z, module.in_proj_b, module.in_proj_a)]
    with pytest.raises(ValueError, match="a section of 24 rows does not split over 5 TP ranks"):
        sections_import(Group(0, 5), *tensors, sections=SECTIONS)
    with pytest.raises(ValueError, match=r"HF tensor 2 \[7, 12\] is not the sections \[8\]"):
        sections_import(Group(0, 1), tensors[0], tensors[1], tensors[2][:7], tensors[3], sections=SECTIONS)
    with pytest.raises(ValueError, match="a shard of 7 rows is no TP block"):
        sections_export([torch.zeros(7, HIDDEN)], sections=SECTIONS)


def _standin(folder: Path, target: str) -> Path:
    testing.save_standin(json.loads((testing.ROOT / TARGETS[target].config).read_text()), folder)
    return folder


def _module(folder: Path, name: str, spec: Path, layout: str = "local") -> Path:
    path = folder / f"{name}.py"
    path.write_text(compile_target(name, spec, folder / "config.json", layout, "test"))
    return path


def test_shard_map_reads_what_the_importers_read(tmp_path: Path) -> None:
    """Each rank's HF coordinates of every parameter of the MoE stand-in (in_proj's three runs of
    in_proj_qkv and a block of z, b and a among them) are what its importer reads, and every HF
    element is covered once per replica, at TP2 x PP2 x EP2."""
    folder = _standin(tmp_path, "qwen3_5_35b_a3b")
    path = _module(folder, "qwen3_5_shardmap", testing.ROOT / TARGETS["qwen3_5_35b_a3b"].spec, layout="te")
    module = testing.import_module_from_path(path, "qwen3_5_shardmap")
    layout = ParallelLayout(tp=2, pp=2, ep=2, dp=2)
    smap = shard_map(module, layout, ranks=False)
    in_proj = smap.params["decoder.layers.0.self_attention.in_proj.weight"]
    assert [len(piece.runs[0]) for piece in in_proj.shards[1].pieces] == [3, 1, 1, 1]
    assert coverage_problems(module, smap) == []
    tensors = hf_values(module)
    assert [p for shards in smap.params.values() for p in shard_problems(module, layout, shards, tensors)] == []


@pytest.mark.parametrize(
    ("target", "layers", "linear", "heads", "experts"),
    [
        ("qwen3_5_0_8b", 24, 18, (16, 16, 128, 128), None),
        ("qwen3_5_27b", 64, 48, (16, 48, 128, 128), None),
        ("qwen3_5_35b_a3b", 40, 30, (16, 32, 128, 128), (256, 8, 512)),
        ("qwen3_5_397b_a17b", 60, 45, (16, 64, 128, 128), (512, 10, 1024)),
    ],
)
def test_text_config_dims(target: str, layers: int, linear: int, heads: tuple[int, ...], experts: tuple[int, ...] | None) -> None:
    """What the specs read from the four text configs: the layer kinds transformers derives
    (its own config class), the gated delta net sizes, the experts, the partial rope, one MTP
    layer, and that each text config is the published config's text_config."""
    import transformers

    from mapgen.compiler.config import translate
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.compiler.spec import parse_spec

    entry = TARGETS[target]
    spec = parse_spec(entry.spec, (testing.ROOT / entry.spec).read_text())
    text = json.loads((testing.ROOT / entry.config).read_text())
    dims = translate(spec, read_hf_config("config.json", json.dumps(text)))
    fields = {k: v for k, v in text.items() if k != "model_type"}
    layer_types = transformers.AutoConfig.for_model(text["model_type"], **fields).layer_types
    assert dims.linear_attention_layers == tuple(i for i, t in enumerate(layer_types) if t == "linear_attention")
    assert (dims.num_layers, len(dims.linear_attention_layers)) == (layers, linear)
    assert (dims.linear_num_key_heads, dims.linear_num_value_heads, dims.linear_key_head_dim, dims.linear_value_head_dim) == heads
    assert (dims.rotary_percent, dims.kv_channels, dims.mtp_num_layers) == (0.25, 256, 1)
    assert dims.attention_output_gate and dims.layernorm_zero_centered_gamma
    if experts is None:
        assert dims.num_moe_experts is None
    else:
        assert (dims.num_moe_experts, dims.moe_router_topk, dims.moe_shared_expert_intermediate_size) == experts
        assert dims.moe_shared_expert_gate and dims.moe_layers == tuple(range(layers))
    published = json.loads((testing.ROOT / entry.config.replace("_text.json", ".json")).read_text())
    added = {"architectures", "bos_token_id", "pad_token_id", "transformers_version", "output_router_logits", "tie_word_embeddings"}
    inner = {k: v for k, v in published["text_config"].items() if k != "tie_word_embeddings"}
    assert {k: v for k, v in text.items() if k not in added} == inner
    assert text["tie_word_embeddings"] == published["tie_word_embeddings"]


# two wrong conventions the forward check must catch: beta and alpha swapped (same shapes), and
# the convolution's channels split as one block (kind auto) instead of per section
WRONG = {
    "beta_alpha_swapped": ("in_proj_{qkv,z,b,a}.weight", "in_proj_{qkv,z,a,b}.weight"),
    "conv_one_block": ("conv1d.weight\n    kind: gdn_conv1d", "conv1d.weight\n    kind: auto"),
}


@pytest.fixture(scope="module")
def wrong(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = _standin(tmp_path_factory.mktemp("qwen3_5"), "qwen3_5_0_8b")
    tasks: list[tuple[Any, tuple[Any, ...]]] = []
    text = (testing.ROOT / TARGETS["qwen3_5_0_8b"].spec).read_text()
    for name, (old, new) in WRONG.items():
        assert text.count(old) == 1, old
        spec = folder / f"{name}.yaml"
        spec.write_text(text.replace(old, new))
        tasks.append((run_job, (Job(str(_module(folder, name, spec)), str(folder), ParallelLayout(tp=2)),)))
    results = spawn(tasks, 2, timeout_s=900)
    return {name: results[0][i] for i, name in enumerate(WRONG)}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_convention_fails_the_forward_check(wrong: dict[str, Any], name: str) -> None:
    rank0 = wrong[name]
    assert rank0.error is None, rank0.error
    assert rank0.max_logit_diff > 1e-3 and not rank0.ok


# --- the published checkpoints: the vision-language model's config and names -------------------


@pytest.mark.parametrize("target", ["qwen3_5_0_8b", "qwen3_5_27b", "qwen3_5_35b_a3b", "qwen3_5_397b_a17b"])
def test_the_published_config_gives_the_text_configs_dims(target: str) -> None:
    """The spec reads the published config.json (nested under text_config, the vision side
    beside it) as the text config transformers saves the text class with."""
    from mapgen.compiler.config import translate
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.compiler.spec import parse_spec

    entry = TARGETS[target]
    spec = parse_spec(entry.spec, (testing.ROOT / entry.spec).read_text())
    text = translate(spec, read_hf_config(entry.config, (testing.ROOT / entry.config).read_text()))
    published_path = entry.config.replace("_text.json", ".json")
    published = translate(spec, read_hf_config(published_path, (testing.ROOT / published_path).read_text()))
    assert published == text


def test_a_nested_config_keeps_its_places_and_its_vision_fields_are_declared() -> None:
    """A field of text_config that the spec refuses is blamed where it stands in the file; a
    top-level field the spec does not declare is refused as any field is; a config of another
    vision-language class is not read as the text model's."""
    from mapgen.common.errors import SpecError
    from mapgen.compiler.config import translate
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.compiler.spec import parse_spec

    entry = TARGETS["qwen3_5_0_8b"]
    spec = parse_spec(entry.spec, (testing.ROOT / entry.spec).read_text())
    published = json.loads((testing.ROOT / "specs/configs/qwen3_5_0_8b.json").read_text())
    published["text_config"]["attn_output_gate"] = False
    published["audio_token_id"] = 5
    text = json.dumps(published, indent=2)
    with pytest.raises(SpecError) as caught:
        translate(spec, read_hf_config("config.json", text))
    gate_line = next(i for i, line in enumerate(text.splitlines(), 1) if '"attn_output_gate"' in line)
    messages = "\n".join(caught.value.messages)
    assert f"config.json:{gate_line}:" in messages and "attn_output_gate" in messages
    assert "'audio_token_id' is unknown to spec" in messages
    published = json.loads((testing.ROOT / "specs/configs/qwen3_5_0_8b.json").read_text())
    published["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
    with pytest.raises(SpecError, match="config is for Qwen3_5MoeForConditionalGeneration, but spec"):
        translate(spec, read_hf_config("config.json", json.dumps(published)))


def test_the_published_config_builds_the_text_configs_module(tmp_path: Path) -> None:
    """`mapgen build` of the published config.json writes the module of the text config, but
    for the config it names."""
    entry = TARGETS["qwen3_5_0_8b"]
    built = {}
    for config in (entry.config, entry.config.replace("_text.json", ".json")):
        text = compile_target("qwen3_5_0_8b", testing.ROOT / entry.spec, testing.ROOT / config, "local", "r", shown_paths=(entry.spec, "c.json"))
        built[config] = text
    first, second = (re.sub(r"sha256:[0-9a-f]{64}", "sha256:-", text) for text in built.values())
    assert first == second


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-ins of the two published configs in the published layout (`mapgen standin`: the
    MoE's decoder experts stacked, its MTP layer's one tensor each), the MoE as transformers
    saves the vision-language class (every expert one tensor), and the text model's stand-in
    as transformers saves the text class."""
    from mapgen.verify.published import save_published_standin, text_model_fields

    root = tmp_path_factory.mktemp("qwen3_5_published")
    folders = {}
    for name in ("qwen3_5_0_8b", "qwen3_5_35b_a3b"):
        folders[name] = root / name
        testing.save_standin(json.loads((testing.ROOT / f"specs/configs/{name}.json").read_text()), folders[name])
    folders["moe_saved"], folders["moe_text"] = root / "moe_saved", root / "moe_text"
    moe = json.loads((testing.ROOT / "specs/configs/qwen3_5_35b_a3b.json").read_text())
    testing.save_standin(text_model_fields(moe), folders["moe_text"])  # the text model's stand-in it is made from
    save_published_standin(moe, folders["moe_text"], folders["moe_saved"], stacked=False)
    folders["text"] = _standin(root / "text", "qwen3_5_0_8b")
    return folders


def test_the_published_standin_is_what_transformers_saves(published: dict[str, Path]) -> None:
    """The stand-in's names and config.json are transformers' save of the vision-language class
    (model.language_model.*, model.visual.*, the experts one tensor each), plus the MTP layer
    under its published names (mtp.*, the MTP experts one tensor each); transformers loads it
    whole, and its text class from it gives the vision-language model's logits."""
    import transformers

    from mapgen.runtime.checkpoint import HFCheckpoint

    for name, architecture in (("qwen3_5_0_8b", "Qwen3_5ForConditionalGeneration"), ("moe_saved", "Qwen3_5MoeForConditionalGeneration")):
        config = json.loads((published[name] / "config.json").read_text())
        assert config["architectures"] == [architecture] and "num_hidden_layers" in config["text_config"]
        names = HFCheckpoint(published[name]).names()
        assert {n.split(".layers.")[0].split(".blocks.")[0] for n in names if n.startswith("model.")} >= {
            "model.language_model", "model.visual"
        }
        assert not any(n.startswith("model.layers.") for n in names)
        assert "mtp.fc.weight" in names and "mtp.layers.0.input_layernorm.weight" in names
        if "moe" in architecture.lower():
            assert "model.language_model.layers.0.mlp.experts.7.down_proj.weight" in names
            assert "mtp.layers.0.mlp.experts.7.gate_proj.weight" in names
        model, info = getattr(transformers, architecture).from_pretrained(published[name], output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]  # mtp.*: dropped by transformers on load
        text_model = transformers.AutoModelForCausalLM.from_pretrained(published[name])
        ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, text_model(ids).logits)


def test_the_published_moe_standin_stacks_the_decoder_experts(published: dict[str, Path]) -> None:
    """The MoE stand-in of the published config stacks each decoder layer's experts (transformers'
    in-memory layout) and keeps the MTP layer's one tensor each, as the published checkpoint;
    its tensors are those of transformers' save, restacked; transformers reads it whole."""
    import transformers
    from safetensors.torch import load_file

    from mapgen.verify.published import stack_decoder_experts

    mixed = load_file(str(published["qwen3_5_35b_a3b"] / "model.safetensors"))
    saved = load_file(str(published["moe_saved"] / "model.safetensors"))
    assert mixed["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert mixed["model.language_model.layers.0.mlp.experts.down_proj"].shape == (8, 64, 32)
    assert "mtp.layers.0.mlp.experts.7.up_proj.weight" in mixed
    assert not any(".layers.0.mlp.experts.0." in n and not n.startswith("mtp.") for n in mixed)
    expected = stack_decoder_experts(saved)
    assert set(mixed) == set(expected) and all(torch.equal(mixed[n], expected[n]) for n in mixed)
    gate, up = mixed["model.language_model.layers.0.mlp.experts.gate_up_proj"][3].chunk(2)
    assert torch.equal(gate, saved["model.language_model.layers.0.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(up, saved["model.language_model.layers.0.mlp.experts.3.up_proj.weight"])
    _, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(published["qwen3_5_35b_a3b"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_the_naming_a_config_goes_with() -> None:
    """`mapgen convert megatron-to-hf` has no files to take the naming from: the config it
    writes says it (the published vision-language config: the published names)."""
    from mapgen.runtime.hf_names import config_naming

    namings = (("model.layers.", "model.language_model.layers."),)
    published = json.loads((testing.ROOT / "specs/configs/qwen3_5_0_8b.json").read_text())
    text = json.loads((testing.ROOT / "specs/configs/qwen3_5_0_8b_text.json").read_text())
    assert config_naming(namings, "Qwen3_5ForCausalLM", published) == namings
    assert config_naming(namings, "Qwen3_5ForCausalLM", text) == ()
    llava = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {}}
    assert config_naming(namings, "LlavaForConditionalGeneration", llava) == ()


def test_one_module_reads_both_namings(published: dict[str, Path], tmp_path: Path) -> None:
    """The module's HF_NAMINGS take for the published files (their names read as the rules'),
    not for transformers' save of the text class; the vision tower is declared ignored."""
    from mapgen.runtime.checkpoint import HFCheckpoint
    from mapgen.runtime.checkpoint_checks import checkpoint_problems, hf_namings

    path = _module(published["qwen3_5_0_8b"], "qwen3_5_published", testing.ROOT / TARGETS["qwen3_5_0_8b"].spec)
    module = testing.import_module_from_path(path, "qwen3_5_published")
    on_published = HFCheckpoint(published["qwen3_5_0_8b"], namings=hf_namings(module))
    assert on_published.naming == hf_namings(module) and "model.layers.0.linear_attn.A_log" in on_published
    assert on_published.file_name("model.norm.weight") == "model.language_model.norm.weight"
    assert checkpoint_problems(module, on_published) == []
    on_text = HFCheckpoint(published["text"], namings=hf_namings(module))
    assert on_text.naming == ()
    assert checkpoint_problems(module, on_text) == []


def test_the_published_standins_verify(published: dict[str, Path]) -> None:
    """One spawn of 2 ranks: the dense published stand-in at TP2 and the MoE one at EP2 (its
    decoder experts stacked, its MTP layer's not) and as transformers saves it (every expert one
    tensor), each with its MTP layer (logits against transformers' on text input), every tensor
    exported bit for bit under its published name (an expert of a stacked tensor: against its
    slice); and the module built from the published config loading the transformers-saved text
    stand-in at TP2."""
    tasks: list[tuple[Any, tuple[Any, ...]]] = []
    dense = _module(published["qwen3_5_0_8b"], "published_dense", testing.ROOT / TARGETS["qwen3_5_0_8b"].spec)
    moe = _module(published["qwen3_5_35b_a3b"], "published_moe", testing.ROOT / TARGETS["qwen3_5_35b_a3b"].spec)
    text_config = json.loads((published["text"] / "config.json").read_text())
    assert text_config["architectures"] == ["Qwen3_5ForCausalLM"]
    tasks.append((run_job, (Job(str(dense), str(published["qwen3_5_0_8b"]), ParallelLayout(tp=2)),)))
    tasks.append((run_job, (Job(str(moe), str(published["qwen3_5_35b_a3b"]), ParallelLayout(ep=2, dp=2)),)))
    tasks.append((run_job, (Job(str(moe), str(published["moe_saved"]), ParallelLayout(ep=2, dp=2)),)))
    tasks.append((run_job, (Job(str(dense), str(published["text"]), ParallelLayout(tp=2)),)))
    results = spawn(tasks, 2, timeout_s=900)
    for rank0 in results[0]:
        assert rank0.error is None, rank0.error
        assert rank0.ok and rank0.mismatched == [] and rank0.bit_exact == rank0.tensors > 60, rank0


def test_a_published_moe_checkpoint_is_saved_back_in_its_own_layout(published: dict[str, Path], tmp_path: Path) -> None:
    """The published MoE layout (decoder experts stacked, the MTP layer's one tensor each, the
    vision-language names) loaded and saved back through the module (which maps experts one
    tensor each): every tensor of the original files, under its own name, bit for bit; export
    yields the stacked tensors too. A quantized save cannot stack and says so."""
    import mapgen
    from safetensors import safe_open

    from mapgen.common.parallel import ParallelLayout
    from mapgen.compiler.parallel_state import single_process_parallel_state
    from mapgen.compiler.model_classes import build_model_chunks
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.drivers import Converter
    from mapgen.runtime.save import save_hf_checkpoint

    folder = published["qwen3_5_35b_a3b"]
    path = tmp_path / "qwen3_5_moe_published.py"
    path.write_text(compile_target(path.stem, testing.ROOT / "specs" / "qwen3_5_moe.yaml", folder / "config.json", "local", "test"))
    module = testing.import_module_from_path(path, "test_qwen3_5_published_save")
    with single_process_parallel_state():
        chunks = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=torch.float32, model=module.MODEL)
        converter = Converter(module, chunks, ParallelContext.single())
        converter.load(folder)
        stacked = dict(converter.stacked)
        assert stacked and all(n.startswith("model.layers.") for n in stacked), stacked  # the decoder layers only
        exported = dict(converter.export())
        # export_bound counts the stacked pair export assembles: the largest layer's two tensors

        def nbytes(suffix: str) -> int:
            return sum(t.numel() * t.element_size() for n, t in exported.items() if n.endswith(suffix))

        layers = {name.rsplit(".", 1)[0].removeprefix("model.") for name in stacked}
        largest = max(nbytes(f"{layer}.gate_up_proj") + nbytes(f"{layer}.down_proj") for layer in layers)
        assert converter.export_bound().stacking == largest > 0
        mapgen.save_hf_pretrained(module, chunks, tmp_path / "saved", folder, make_vocab_size_divisible_by=1)
        with pytest.raises(ValueError, match="stacked_experts with fp8"):
            save_hf_checkpoint(module, chunks, tmp_path / "fp8", json.loads((folder / "config.json").read_text()),
                               fp8=True, stacked_experts=converter.stacked)
    original = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            original.update({name: handle.get_tensor(name) for name in handle.keys()})
    saved = {}
    for file in (tmp_path / "saved").glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            saved.update({name: handle.get_tensor(name) for name in handle.keys()})
    ignored = [n for n in original if n.startswith("model.visual.")]  # the vision tower: not this module's
    assert ignored and sorted(saved) == sorted(n for n in original if n not in ignored)
    assert any(".experts.gate_up_proj" in n for n in saved) and any("mtp.layers.0.mlp.experts.0." in n for n in saved)
    for name, tensor in saved.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor.view(torch.uint8), original[name].view(torch.uint8)), name
    for name in stacked:  # export's stacked tensors are the files' (in the published names)
        published_name = next(n for n in original if n.endswith(name.removeprefix("model.")))
        assert torch.equal(exported[published_name], original[published_name]), name
