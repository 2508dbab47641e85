"""Qwen3.5 (issue 25, family 1): the sectioned gated delta net input projection (kind
gdn_in_proj_sections) against transformers' own module and against Qwen3-Next's packed layout,
its static shard map, the dims of the four text configs, and two wrong conventions that the
forward check must catch. The stand-ins' TP/PP/EP verification is tests/test_distributed.py's
(every target of specs/targets.yaml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen import runtime as rt
from mapgen.compiler.build import compile_target, read_targets
from mapgen.compiler.megatron_model import ParallelLayout
from mapgen.runtime.context import Group
from mapgen.common.sections import gdn_in_proj_sections
from mapgen.runtime.sections import sections_export, sections_import
from mapgen.runtime.shardmap import ShardLayout, shard_map
from mapgen.verify import testing
from mapgen.verify.jobs import Job, run_job, spawn

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
    layout = ShardLayout(tp=2, pp=2, ep=2)
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

    from mapgen.compiler.config import read_hf_config, translate
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
