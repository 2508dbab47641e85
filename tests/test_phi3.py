"""Phi-3-mini-4k (issue 10, item 2): one concatenated [Q; K; V] tensor per layer (concat_qkv) and
one fused [gate; up] tensor (gated_mlp's one-tensor form), both directions, and a sliding window in
every layer. Truths: transformers' Phi3ForCausalLM forward on the same weights (fp32, 1e-5) and
the bytes of the saved safetensors file; in one process, and at TP2 and TP2 x PP2 in one spawn of
4 gloo processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mapgen.common.errors import SpecError
from mapgen.common.layout import weight_buffers
from mapgen.compiler.build import compile_target
from mapgen.compiler.config import translate
from mapgen.compiler.hfconfig import read_hf_config
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.compiler.megatron_config import transformer_config
from mapgen.compiler.spec import parse_spec
from mapgen.runtime.context import Group
from mapgen.runtime.drivers import export_hf_tensors, load_hf_checkpoint
from mapgen.runtime.shardmap import shard_map
from mapgen.runtime.local import scatter, take
from mapgen.verify import forward, testing
from mapgen.verify.jobs import run_job
from mapgen.verify.processes import spawn
from mapgen.verify.verdict import Job

import dist_tasks

SPEC = "specs/phi3.yaml"
PUBLISHED: dict[str, Any] = json.loads((testing.ROOT / "specs/configs/phi3_mini_4k.json").read_text())

# stand-in variants: (fields set on the stand-in of the published config)
VARIANTS: dict[str, dict[str, Any]] = {
    "published": {},  # sliding_window 2047 (longer than any sequence here), multi-head attention
    "window3": {"sliding_window": 3},  # the window cuts the 11- and 7-token sequences checked
    "gqa": {"num_key_value_heads": 2},  # Phi-3-small/medium have fewer KV heads: concat_qkv's K, V rows
    "partial_rotary": {"partial_rotary_factor": 0.5},  # Phi-4-mini's rope covers part of each head
    "tied": {"tie_word_embeddings": True},
}


def _spec_dims(fields: dict[str, Any]) -> Any:
    spec = parse_spec(SPEC, (testing.ROOT / SPEC).read_text())
    return translate(spec, read_hf_config("config.json", json.dumps(fields, indent=2)))


def _save_standin(folder: Path, changes: dict[str, Any]) -> Any:
    import transformers

    tiny = testing.standin_config(PUBLISHED)
    tiny.update(changes)
    config = transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    return testing.save_random_model(config, folder)


def _compile(folder: Path, name: str, layout: str = "local") -> Path:
    path = folder / f"{name}.py"
    path.write_text(compile_target(name, testing.ROOT / SPEC, folder / "config.json", layout, "test"))
    return path


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any, Path]]:
    """Each variant: its folder, the transformers model, its local-layout module."""
    root = tmp_path_factory.mktemp("phi3")
    found = {}
    for name, changes in VARIANTS.items():
        folder = root / name
        model = _save_standin(folder, changes)
        found[name] = (folder, model, _compile(folder, f"phi3_{name}"))
    return found


# --- the published config ---------------------------------------------------------------------


def test_published_config_gives_a_window_in_every_layer() -> None:
    dims = _spec_dims(PUBLISHED)
    assert (dims.num_attention_heads, dims.num_query_groups, dims.kv_channels) == (32, 32, 96)
    assert (dims.ffn_hidden_size, dims.rotary_percent, dims.rotary_base) == (8192, 1.0, 10000.0)
    assert dims.sliding_window == 2047 and dims.window_attention_layers == tuple(range(32))
    megatron = transformer_config(dims)
    assert megatron.window_size == (2046, 0)  # W positions, the query's own included
    assert megatron.window_attn_skip_freq == [1] * 32


def test_transformers_applies_the_window_to_every_layer(standins: dict[str, tuple[Path, Any, Path]]) -> None:
    """Phi3Model masks with config.sliding_window in every layer: with the window off, the same
    weights give other logits (so the window3 checks below check the window, not only weights)."""
    _, model, _ = standins["window3"]
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    windowed = forward.hf_logits(model, ids)
    model.config.sliding_window = None
    try:
        full = forward.hf_logits(model, ids)
    finally:
        model.config.sliding_window = 3
    assert (windowed - full).abs().max() > 1e-3
    assert torch.equal(windowed[:, :3], full[:, :3])  # the first 3 positions see no further back


def test_longrope_is_refused_where_the_config_says_it() -> None:
    """Phi-3's 128k models scale rope with longrope, which megatron-core does not have."""
    fields = dict(PUBLISHED, rope_scaling={"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48})
    with pytest.raises(SpecError) as raised:
        _spec_dims(fields)
    line = json.dumps(fields, indent=2).splitlines().index('  "rope_scaling": {') + 1
    (message,) = raised.value.messages
    assert message.startswith(f"config.json:{line}:3: config field 'rope_scaling' is ")
    assert "but spec specs/phi3.yaml builds only rope_scaling = null" in message
    assert "megatron-core has no longrope" in message


def test_longrope_as_transformers_saves_it_is_refused() -> None:
    saved = dict(PUBLISHED, rope_scaling=None)
    del saved["rope_scaling"]
    saved["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}
    with pytest.raises(SpecError) as raised:
        _spec_dims(saved)
    messages = [m.split(": ", 1)[1] for m in raised.value.messages]
    assert any(m.startswith("config field 'rope_parameters.rope_type' is \"longrope\", but spec specs/phi3.yaml builds only") for m in messages), messages
    assert any("'rope_parameters.long_factor' is unknown to spec specs/phi3.yaml" in m for m in messages), messages


def test_standin_configs_as_transformers_saves_them_are_understood(standins: dict[str, tuple[Path, Any, Path]]) -> None:
    for name, (folder, model, module_path) in standins.items():
        dims = _spec_dims(json.loads((folder / "config.json").read_text()))
        assert dims.rotary_percent == (0.5 if name == "partial_rotary" else 1.0)
        assert dims.sliding_window == model.config.sliding_window
        assert dims.num_query_groups == model.config.num_key_value_heads


# --- the two fused tensors in the module ----------------------------------------------------------


def test_module_reads_the_fused_tensors_whole_and_splits_them_per_rank(standins: dict[str, tuple[Path, Any, Path]]) -> None:
    """TP rank r's shard of linear_fc1 is gate rows r*I/2:(r+1)*I/2 and the same rows of up, both
    from gate_up_proj; its linear_qkv shard is its query groups' rows of Q, K and V, all three
    from qkv_proj (GQA: 4 heads, 2 groups, head_dim 16)."""
    folder, _, module_path = standins["gqa"]
    module = testing.import_module_from_path(module_path, "phi3_gqa_shardmap")
    source = "".join(module_path.read_text().split()).replace(",)", ")")  # black's line breaks aside
    assert 'rt.gated_mlp_import(ctx.tp,*rt.halves(load("model.layers.0.mlp.gate_up_proj.weight")),out=out)' in source
    assert '{"model.layers.0.mlp.gate_up_proj.weight":rt.fused_gated_mlp_export(parts)}' in source
    assert 'rt.concat_qkv_import(ctx.tp,load("model.layers.0.self_attn.qkv_proj.weight"),heads=4,groups=2,head_dim=16,out=out)' in source
    smap = shard_map(module, ParallelLayout(tp=2))
    intermediate = 96  # the stand-in's
    for rank in range(2):
        (fc1,) = smap.params["decoder.layers.0.mlp.linear_fc1.weight"].shards[rank].pieces
        half = intermediate // 2
        assert (fc1.name, fc1.role, fc1.runs[0]) == (
            "model.layers.0.mlp.gate_up_proj.weight", "gate_up",
            ((rank * half, (rank + 1) * half), (intermediate + rank * half, intermediate + (rank + 1) * half)),
        )
        (qkv,) = smap.params["decoder.layers.0.self_attention.linear_qkv.weight"].shards[rank].pieces
        q_rows, kv_rows = 4 * 16, 2 * 16  # heads x d, groups x d; rank r holds group r
        assert qkv.runs[0] == (
            (rank * 32, (rank + 1) * 32),
            (q_rows + rank * 16, q_rows + (rank + 1) * 16),
            (q_rows + kv_rows + rank * 16, q_rows + kv_rows + (rank + 1) * 16),
        )


def test_fused_gate_up_import_computes_phi3s_mlp_per_rank(standins: dict[str, tuple[Path, Any, Path]]) -> None:
    """Each TP rank's [gate_r; up_r] shard, applied as megatron-core's SwiGLU does (first half
    gate, second half up), gives its block of transformers' Phi3MLP intermediate activations."""
    from mapgen import runtime as rt

    _, model, _ = standins["published"]
    mlp = model.model.layers[1].mlp
    weight = mlp.gate_up_proj.weight.detach()
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        theirs = up * mlp.activation_fn(gate)
    shards = []
    for rank in range(2):
        shard = rt.gated_mlp_import(Group(rank, 2), *rt.halves(weight))
        g, u = (x @ shard.T).chunk(2, dim=-1)
        block = slice(rank * 48, (rank + 1) * 48)
        assert torch.allclose(torch.nn.functional.silu(g) * u, theirs[:, block], atol=1e-6)
        shards.append(shard)
    assert torch.equal(rt.fused_gated_mlp_export(shards), weight)


# --- one process: a megatron-core GPTModel against transformers ----------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_and_export_is_bit_exact(
    standins: dict[str, tuple[Path, Any, Path]], variant: str, cpu_megatron: None
) -> None:
    folder, hf_model, module_path = standins[variant]
    module = testing.import_module_from_path(module_path, f"phi3_single_{variant}")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
    model.eval()
    assert load_hf_checkpoint(module, [model], str(folder)) == len(module.PARAMS) == len(list(model.parameters())) + len(weight_buffers(model))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    diff = (forward.megatron_logits(model, ids) - forward.hf_logits(hf_model, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    original = load_file(folder / "model.safetensors")
    exported = dict(export_hf_tensors(module, [model]))
    assert sorted(exported) == sorted(original)
    for name, tensor in exported.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name


# --- TP2 and TP2 x PP2 in one spawn of 4 gloo processes -----------------------------------------

DIST_CASES = [
    ("published", ParallelLayout(tp=2, dp=2)),
    ("published", ParallelLayout(tp=2, pp=2)),
    ("window3", ParallelLayout(tp=2, pp=2)),
    ("gqa", ParallelLayout(tp=2, dp=2)),
    ("partial_rotary", ParallelLayout(tp=2, pp=2)),
]


@pytest.fixture(scope="module")
def spawned(standins: dict[str, tuple[Path, Any, Path]]) -> dict[str, Any]:
    tasks: list[tuple[Any, tuple[Any, ...]]] = [
        (run_job, (Job(str(standins[v][2]), str(standins[v][0]), layout),)) for v, layout in DIST_CASES
    ]
    folder, _, module_path = standins["gqa"]
    tasks.append((dist_tasks.export_local_pieces, (str(module_path), str(folder), ParallelLayout(tp=2, pp=2))))
    return spawn(tasks, 4, timeout_s=1200)


@pytest.mark.parametrize("index", range(len(DIST_CASES)), ids=[f"{v}-{layout}" for v, layout in DIST_CASES])
def test_tp2_and_tp2_pp2_match_transformers_and_export_bit_exact(
    spawned: dict[str, Any], standins: dict[str, tuple[Path, Any, Path]], index: int
) -> None:
    variant, _ = DIST_CASES[index]
    results = [spawned[rank][index] for rank in range(4)]
    for result in results:
        assert result.error is None, result.error
    rank0 = results[0]
    assert rank0.tensors == len(load_file(standins[variant][0] / "model.safetensors"))
    assert rank0.bit_exact == rank0.tensors, rank0.mismatched
    assert rank0.max_logit_diff <= 1e-5
    assert rank0.ok


def test_export_local_takes_the_fused_tensors_apart_on_each_rank(
    spawned: dict[str, Any], standins: dict[str, tuple[Path, Any, Path]]
) -> None:
    """Gather-free export at TP2 x PP2: no collective; the primary pieces of the four ranks cover
    every element of every tensor once and rebuild the checkpoint bit for bit; each TP rank's
    piece of gate_up_proj is its gate rows and its up rows."""
    original = load_file(standins["gqa"][0] / "model.safetensors")
    index = len(DIST_CASES)
    rebuilt = {n: torch.full_like(t, float("nan")) for n, t in original.items()}
    covered = {n: torch.zeros(t.shape, dtype=torch.int32) for n, t in original.items()}
    for rank in range(4):
        result = spawned[rank][index]
        assert result["counts"] == {}, (rank, result["counts"])
        for p in result["pieces"]:
            if p["primary"]:
                scatter(rebuilt[p["name"]], p["piece"], p["data"])
                scatter(covered[p["name"]], p["piece"], take(covered[p["name"]], p["piece"]) + 1)
            if p["name"] == "model.layers.0.mlp.gate_up_proj.weight":
                tp_rank = rank % 2
                assert p["runs"][0] == ((tp_rank * 48, (tp_rank + 1) * 48), (96 + tp_rank * 48, 96 + (tp_rank + 1) * 48))
    for name, tensor in original.items():
        assert bool((covered[name] == 1).all()), name
        assert torch.equal(rebuilt[name], tensor), name
