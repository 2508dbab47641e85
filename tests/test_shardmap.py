"""The static shard map (mapgen.runtime.shardmap) against what mapgen did not produce: the HF
tensors' own elements (every one covered exactly once, or once per replica), the generated
import functions run on random tensors for each rank (the rank's shard is made of exactly the
elements at its HF coordinates), megatron-core's pipeline placement and its RankGenerator.
No process group is made."""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from mapgen import runtime as rt
from mapgen.common.dims import ModelDims
from mapgen.common.layout import QKVGeometry, stacked_slice
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.build import compile_target
from mapgen.runtime.drivers import _import
from mapgen.runtime.placing import vocab_params
from mapgen.runtime.ownership import Owner, layer_owners
from mapgen.runtime.plan import HFTensorPlan, ParamPlan, RulePlan
from mapgen.runtime.shardmap import (
    HFPiece,
    ParamShards,
    RankShard,
    ShardMapError,
    global_ranks,
    rank_context,
    shard_map,
    stage_layers,
)
from mapgen.verify import testing

ROOT = testing.ROOT


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny module of a family and spec (cached): (family, spec, layout, hf_experts, overrides)."""
    cache: dict[tuple[Any, ...], ModuleType] = {}

    def make(
        family: str, spec: str, layout: str = "te", hf_experts: str = "per_expert", model: str = "gpt", **overrides: Any
    ) -> ModuleType:
        key = (family, spec, layout, hf_experts, model, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(family)
            testing.tiny_hf_config(family, **overrides).to_json_file(folder / "config.json")
            name = f"shardmap_{len(cache)}_{family}"
            source = compile_target(
                name, ROOT / spec, folder / "config.json", layout, "test", hf_experts=hf_experts, model=model
            )
            (folder / f"{name}.py").write_text(source)
            cache[key] = testing.import_module_from_path(folder / f"{name}.py", name)
        return cache[key]

    return make


CASES = {
    "llama-gqa-tp2": (("llama", "specs/llama.yaml"), {}, ParallelLayout(tp=2)),
    "llama-tied-tp2-pp2-vpp2": (
        ("llama", "specs/llama.yaml"), {"tie_word_embeddings": True, "num_hidden_layers": 4}, ParallelLayout(tp=2, pp=2, vpp=2),
    ),
    "qwen2-qkv-bias-tp2": (("qwen2", "specs/qwen2.yaml"), {}, ParallelLayout(tp=2)),
    "kinds-local-tp2-uneven-pp": (
        ("llama", "tests/specs/llama_kinds.yaml", "local"), {"num_hidden_layers": 3},
        ParallelLayout(tp=2, pp=2, first_stage_layers=1),
    ),
    "qwen3-moe-tp2-pp2-ep2-etp1": (("qwen3_moe", "specs/qwen3_moe.yaml"), {}, ParallelLayout(tp=2, pp=2, ep=2, etp=1, dp=2)),
    "qwen3-moe-stacked-tp2-ep2": (("qwen3_moe", "specs/qwen3_moe.yaml", "te", "stacked"), {}, ParallelLayout(tp=2, ep=2, dp=2)),
    "llama-hybrid-tp2-pp2": (("llama", "specs/llama.yaml", "te", "per_expert", "hybrid"), {}, ParallelLayout(tp=2, pp=2)),
    "mixtral-local-ep4-etp2": (("mixtral", "specs/mixtral.yaml", "local"), {}, ParallelLayout(tp=1, ep=4, etp=2, dp=8)),
    # gated delta net (gdn_in_proj, gdn_conv1d), gated attention, zero-centred out_norm
    "qwen3-next-tp2-pp2-ep2": (("qwen3_next", "specs/qwen3_next.yaml"), {}, ParallelLayout(tp=2, pp=2, ep=2, dp=2)),
}


def case_module(build: Any, case: str) -> tuple[ModuleType, ParallelLayout]:
    args, overrides, layout = CASES[case]
    return build(*args, **overrides), layout


# --- the checks ----------------------------------------------------------------------------------


def hf_values(module: Any) -> dict[str, torch.Tensor]:
    """A random tensor per HF name whose elements are distinct across all of them (float64:
    integers, exact), none zero."""
    generator = torch.Generator().manual_seed(0)
    total = sum(int(torch.Size(t.shape).numel()) for t in module.HF_TENSORS)
    values = (torch.randperm(total, generator=generator) + 1).to(torch.float64)
    tensors: dict[str, torch.Tensor] = {}
    start = 0
    for t in module.HF_TENSORS:
        count = int(torch.Size(t.shape).numel())
        tensors[t.name] = values[start : start + count].reshape(t.shape)
        start += count
    return tensors


def mask_of(pieces: tuple[HFPiece, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for piece in pieces:
        mask = masks.setdefault(piece.name, torch.zeros(shapes[piece.name], dtype=torch.int64))
        for box in piece.boxes():
            mask[box] += 1
    return masks


def context(layout: ParallelLayout, shards: ParamShards, rank: int) -> rt.ParallelContext:
    if shards.group == "etp":
        return rank_context(layout, etp_rank=rank)
    return rank_context(layout, tp_rank=rank)


def shard_problems(module: Any, layout: ParallelLayout, shards: ParamShards, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Whether each rank's shard, as the module's import makes it (the drivers' own call, with
    the vocabulary padding), is made of exactly the elements at its HF coordinates: it depends
    on nothing outside them (imported again with everything else zeroed, it is the same), it
    has as many elements as they do, all distinct (the values are), so every one is used once;
    a plain split shard must equal the HF slice itself."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    vocab = shards.name in vocab_params(module)
    found: list[str] = []
    for shard in shards.shards:
        ctx = context(layout, shards, shard.rank)
        what = f"{shards.name} {shards.group} rank {shard.rank}"

        def imported(source: dict[str, torch.Tensor], shard: RankShard = shard, ctx: rt.ParallelContext = ctx) -> torch.Tensor:
            out = torch.full(shard.shape, float("nan"), dtype=torch.float64)
            _import(module, shards.name, ctx, lambda name: source[name], out, vocab)
            return out

        full = imported(tensors)
        masks = mask_of(shard.pieces, shapes)
        if any(int(m.max()) > 1 for m in masks.values()):
            found.append(f"{what}: its pieces overlap")
        inside = {name: torch.where(masks[name] > 0, t, torch.zeros_like(t)) if name in masks else torch.zeros_like(t)
                  for name, t in tensors.items()}
        if not torch.equal(imported(inside), full):
            found.append(f"{what}: the shard reads HF elements outside its pieces")
        real = full.narrow(0, 0, full.shape[0] - shard.pad_rows) if shard.pad_rows else full
        if shard.pad_rows and bool(full.narrow(0, real.shape[0], shard.pad_rows).any()):
            found.append(f"{what}: pad rows are not zero")
        covered = sum(p.numel for p in shard.pieces)
        if real.numel() != covered:
            found.append(f"{what}: the shard has {real.numel()} elements, its pieces {covered}")
        if real.unique().numel() != real.numel():
            found.append(f"{what}: the shard repeats HF elements")
        plain = shards.rule.kind in ("direct", "column", "row", "replicated", "auto", "zero_centered_rmsnorm")
        if plain and shards.rule.permute_dims is None and len(shard.pieces) == 1:
            (piece,) = shard.pieces
            (box,) = list(piece.boxes())
            expected = tensors[piece.name][box]
            if piece.expert is not None:
                expected = expected[0]
            if shards.rule.kind == "zero_centered_rmsnorm":
                expected = expected - 1
            if not torch.equal(real, expected):
                found.append(f"{what}: the shard is not the HF slice {box}")
    return found


def coverage_problems(module: Any, smap: Any) -> list[str]:
    """Every element of every HF tensor is covered once by the shards of the parameter it
    feeds, or once per rank where the parameter is replicated."""
    shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    counts = {name: torch.zeros(shape, dtype=torch.int64) for name, shape in shapes.items()}
    wanted = {name: torch.zeros(shape, dtype=torch.int64) for name, shape in shapes.items()}
    for shards in smap.params.values():
        copies = shards.group_size if shards.replicated else 1
        for label in shards.plan.hf_names:
            base, expert = stacked_slice(label)
            region = wanted[base] if expert is None else wanted[base][expert]
            region += copies
        for shard in shards.shards:
            for piece in shard.pieces:
                for box in piece.boxes():
                    counts[piece.name][box] += 1
    found = []
    for name in shapes:
        if not bool((wanted[name] > 0).all()):
            found.append(f"{name}: not every element feeds a parameter")
        wrong = int((counts[name] != wanted[name]).sum())
        if wrong:
            found.append(f"{name}: {wrong} elements covered other than once per replica")
    return found


# --- module cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_hf_element_is_covered_once_per_replica(build: Any, case: str) -> None:
    module, layout = case_module(build, case)
    smap = shard_map(module, layout)
    assert set(smap.params) == {p.megatron_name for p in module.PARAMS}
    assert coverage_problems(module, smap) == []
    for shards in smap.params.values():  # replicated: every rank the whole tensors
        assert shards.replicated == (shards.plan.split_dim is None)
        if shards.replicated:
            assert all(p.whole for s in shards.shards for p in s.pieces)


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_imports_exactly_its_hf_coordinates(build: Any, case: str) -> None:
    module, layout = case_module(build, case)
    smap = shard_map(module, layout, ranks=False)
    tensors = hf_values(module)
    problems = [p for shards in smap.params.values() for p in shard_problems(module, layout, shards, tensors)]
    assert problems == []


def test_the_check_fails_on_wrong_runs(build: Any) -> None:
    """The import check is no tautology: moved, widened or swapped runs are caught."""
    module, layout = case_module(build, "qwen3-moe-stacked-tp2-ep2")
    smap = shard_map(module, layout, ranks=False)
    tensors = hf_values(module)
    qkv = smap.params["decoder.layers.0.self_attention.linear_qkv.weight"]
    fc1 = smap.params["decoder.layers.1.mlp.experts.linear_fc1.weight2"]
    assert shard_problems(module, layout, qkv, tensors) == shard_problems(module, layout, fc1, tensors) == []

    def tamper(shards: ParamShards, rank: int, index: int, runs: tuple[tuple[int, int], ...]) -> ParamShards:
        shard = shards.shards[rank]
        pieces = list(shard.pieces)
        pieces[index] = replace(pieces[index], runs=(runs, *pieces[index].runs[1:]))
        changed = list(shards.shards)
        changed[rank] = replace(shard, pieces=tuple(pieces))
        return replace(shards, shards=tuple(changed))

    (k_run,) = qkv.shards[1].pieces[1].runs[0]
    shifted = tamper(qkv, 1, 1, ((k_run[0] - 1, k_run[1] - 1),))  # k rows off by one
    assert any("outside its pieces" in p for p in shard_problems(module, layout, shifted, tensors))
    wider = tamper(qkv, 0, 2, ((0, qkv.shards[0].pieces[2].runs[0][0][1] + 1),))
    assert any("elements, its pieces" in p for p in shard_problems(module, layout, wider, tensors))
    (gate, up) = fc1.shards[0].pieces[0].runs[0]
    contiguous = tamper(fc1, 0, 0, ((gate[0], gate[1] + (up[1] - up[0])),))  # no [gate; up] interleave
    assert shard_problems(module, layout, contiguous, tensors)
    assert coverage_problems(module, replace(smap, params={**smap.params, qkv.name: shifted}))


def test_expert_and_stage_placement(build: Any) -> None:
    module, layout = case_module(build, "qwen3-moe-tp2-pp2-ep2-etp1")
    smap = shard_map(module, layout)
    expert = smap.params["decoder.layers.1.mlp.experts.linear_fc2.weight3"]
    assert (expert.owner, expert.ep_rank, expert.local_expert) == (Owner(1, 0), 1, 1)
    assert expert.local_name == "decoder.layers.0.mlp.experts.linear_fc2.weight1"
    assert (expert.group, expert.group_size, expert.split, len(expert.shards)) == ("etp", 1, "row", 1)
    # order tp-cp-ep-dp-pp, dp 2 (EP), world 8: pp rank 1 is ranks 4-7; expert-TP 1 x EP 2 x
    # expert-DP 2: EP rank 1 is 5 and 7
    assert expert.shards[0].global_ranks == (5, 7)
    assert expert.export.ep_size == 2 and expert.export.source_ep == 1 and expert.export.pp_size == 2
    qkv = smap.params["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.owner == Owner(0, 0) and [s.global_ranks for s in qkv.shards] == [(0, 2), (1, 3)]
    assert smap.params["embedding.word_embeddings.weight"].owner == Owner(0, 0)
    assert smap.params["output_layer.weight"].owner == Owner(1, 0)
    assert smap.params["decoder.final_layernorm.weight"].owner == Owner(1, 0)
    names = [p.name for p in smap.for_hf("model.layers.1.mlp.experts.2.down_proj.weight")]
    assert names == ["decoder.layers.1.mlp.experts.linear_fc2.weight2"]


def test_stacked_tensor_feeds_one_parameter_per_expert(build: Any) -> None:
    module, layout = case_module(build, "qwen3-moe-stacked-tp2-ep2")
    smap = shard_map(module, layout)
    feeds = smap.for_hf("model.layers.0.mlp.experts.gate_up_proj")
    assert [p.plan.expert for p in feeds] == [0, 1, 2, 3]
    assert [(p.ep_rank, p.local_expert) for p in feeds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    (piece,) = feeds[3].shards[1].pieces  # expert-TP rank 1: the second quarter of gate and of up
    assert (piece.name, piece.expert, piece.runs[0]) == ("model.layers.0.mlp.experts.gate_up_proj", 3, ((24, 48), (72, 96)))
    assert feeds[3].export.stacked == "model.layers.0.mlp.experts.gate_up_proj"


def test_tied_copy_on_the_last_stage(build: Any) -> None:
    module, layout = case_module(build, "llama-tied-tp2-pp2-vpp2")
    smap = shard_map(module, layout)
    embedding = smap.params["embedding.word_embeddings.weight"]
    assert embedding.tied_copies == (("output_layer.weight", Owner(1, 1)),)
    assert [p.owner for p in (smap.params[f"decoder.layers.{i}.mlp.linear_fc2.weight"] for i in range(4))] == [
        Owner(0, 0), Owner(1, 0), Owner(0, 1), Owner(1, 1),
    ]
    assert smap.params["decoder.layers.2.mlp.linear_fc2.weight"].local_name == "decoder.layers.0.mlp.linear_fc2.weight"
    single = shard_map(module, ParallelLayout(tp=2))
    assert single.params["embedding.word_embeddings.weight"].tied_copies == ()  # one tensor on one stage


def test_hybrid_layers_are_placed_as_two_per_decoder_layer(build: Any) -> None:
    """A hybrid module's layers (attention 2L, MLP 2L+1) are what megatron-core places."""
    module, layout = case_module(build, "llama-hybrid-tp2-pp2")
    smap = shard_map(module, layout)
    assert sorted(smap.layers) == [0, 1, 2, 3]
    attention = smap.params["decoder.layers.2.self_attention.linear_qkv.weight"]
    assert (attention.owner, attention.local_name) == (Owner(1, 0), "decoder.layers.0.self_attention.linear_qkv.weight")
    assert smap.params["decoder.layers.1.mlp.linear_fc2.weight"].owner == Owner(0, 0)
    with pytest.raises(ShardMapError, match="virtual pipeline"):
        shard_map(module, ParallelLayout(pp=2, vpp=2))


def test_padded_vocabulary(build: Any) -> None:
    """Megatron-LM's padding: 128 rows padded to 192 at 48 x TP2; rank 1 holds 32 real rows."""
    module = build("llama", "specs/llama.yaml")
    layout = ParallelLayout(tp=2, make_vocab_size_divisible_by=48)
    smap = shard_map(module, layout, ranks=False)
    embedding = smap.params["embedding.word_embeddings.weight"]
    assert [(s.block, s.pad_rows, s.shape) for s in embedding.shards] == [((0, 96), 0, (96, 64)), ((96, 192), 64, (96, 64))]
    assert embedding.shards[1].pieces[0].runs[0] == ((96, 128),)
    assert shard_problems(module, layout, embedding, hf_values(module)) == []
    assert embedding.export.vocab_rows == 128


# --- kinds no shipped spec uses, on hand-made plans --------------------------------------------


def _fake_module() -> Any:
    """Plans of the kinds and options no shipped spec exercises: a qkv with an attention output
    gate, kv, concat_qkv, auto with permute_dims (column and row), reshapes whose split
    interleaves HF rows or elements, a 1-D row bias."""
    g = QKVGeometry(heads=4, groups=2, head_dim=3, gate=True)
    plain = QKVGeometry(heads=4, groups=2, head_dim=3)

    def export(parts: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    specs: list[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[int, ...], int | None, Any, dict[str, Any]]] = [
        ("gated.linear_qkv.weight", "qkv", ("q", "k", "v"), ("q", "k", "v"), (36, 5), 0,
         lambda ctx, load, out=None: rt.qkv_import(ctx.tp, load("q"), load("k"), load("v"), heads=4, groups=2, head_dim=3, gate=True, out=out),
         {"qkv": g}),
        ("kv.weight", "kv", ("k", "v"), ("k2", "v2"), (12, 5), 0,
         lambda ctx, load, out=None: rt.kv_import(ctx.tp, load("k2"), load("v2"), groups=2, head_dim=3, out=out),
         {"qkv": plain}),
        ("concat.weight", "concat_qkv", ("hf",), ("qkv",), (24, 5), 0,
         lambda ctx, load, out=None: rt.concat_qkv_import(ctx.tp, load("qkv"), heads=4, groups=2, head_dim=3, out=out),
         {"qkv": plain}),
        ("permuted_column.weight", "auto", ("hf",), ("pc",), (8, 5), 0,
         lambda ctx, load, out=None: rt.column_import(ctx.tp, load("pc").permute((1, 0)), out=out),
         {"permute_dims": (1, 0)}),
        ("permuted_row.weight", "auto", ("hf",), ("pr",), (5, 8), 1,
         lambda ctx, load, out=None: rt.row_import(ctx.tp, load("pr").permute((1, 0)), out=out),
         {"permute_dims": (1, 0)}),
        ("reshaped_rows.weight", "reshape", ("hf",), ("r",), (2, 4, 3), 1,
         lambda ctx, load, out=None: rt.reshape_import(ctx.tp, load("r"), (2, 4, 3), 1, out=out), {}),
        ("reshaped_flat.weight", "reshape", ("hf",), ("f",), (3, 4), 1,
         lambda ctx, load, out=None: rt.reshape_import(ctx.tp, load("f"), (3, 4), 1, out=out), {}),
        ("row_bias.bias", "row", ("hf",), ("b",), (5,), None,
         lambda ctx, load, out=None: rt.row_import(ctx.tp, load("b"), out=out), {}),
    ]
    hf_shapes = {"q": (24, 5), "k": (6, 5), "v": (6, 5), "k2": (6, 5), "v2": (6, 5), "qkv": (24, 5),
                 "pc": (5, 8), "pr": (8, 5), "r": (8, 3), "f": (12,), "b": (5,)}
    rules, params = [], []
    for index, (name, kind, roles, hf, shape, split, importer, extra) in enumerate(specs):
        rules.append(RulePlan(name, kind, name, hf, roles, **extra))
        params.append(ParamPlan(name, shape, "float64", split, False, None, None, index, hf, importer, export))
    dims = ModelDims(num_layers=1, hidden_size=5, ffn_hidden_size=8, num_attention_heads=4, num_query_groups=2,
                     kv_channels=3, vocab_size=16, max_position_embeddings=16)
    return SimpleNamespace(
        TARGET="fake", MODEL="gpt", DIMS=dims, RULES=tuple(rules), PARAMS=tuple(params), TIED={},
        HF_TENSORS=tuple(HFTensorPlan(n, s) for n, s in hf_shapes.items()),
        IMPORTS={p.megatron_name: p.importer for p in params},
    )


def test_kinds_without_a_shipped_spec() -> None:
    module = _fake_module()
    layout = ParallelLayout(tp=2)
    smap = shard_map(module, layout, ranks=False)
    assert coverage_problems(module, smap) == []
    tensors = hf_values(module)
    assert [p for s in smap.params.values() for p in shard_problems(module, layout, s, tensors)] == []
    gated = smap.params["gated.linear_qkv.weight"].shards[1]
    assert [p.runs[0] for p in gated.pieces] == [((12, 24),), ((3, 6),), ((3, 6),)]  # q holds [q_h; gate_h]
    concat = smap.params["concat.weight"].shards[1].pieces[0]
    assert concat.runs[0] == ((6, 12), (15, 18), (21, 24))  # q of group 1, then its k, its v
    assert smap.params["permuted_column.weight"].shards[1].pieces[0].runs == (((0, 5),), ((4, 8),))
    assert smap.params["permuted_row.weight"].shards[0].pieces[0].runs == (((0, 4),), ((0, 5),))
    assert smap.params["reshaped_rows.weight"].shards[1].pieces[0].runs[0] == ((2, 4), (6, 8))
    assert smap.params["reshaped_flat.weight"].shards[0].pieces[0].runs[0] == ((0, 2), (4, 6), (8, 10))
    assert smap.params["row_bias.bias"].replicated


# --- pipeline stages and global ranks against megatron-core ---------------------------------------


def _reference_stages(layers: int, pp: int, vpp: int, first: int | None, last: int | None) -> dict[int, tuple[Owner, int]]:
    """megatron-core's documented placement, written out: each stage's layers (first/last
    given, the rest evenly) cut into vpp chunks; chunks in order virtual stage, then pp rank."""
    middle = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    counts = [rest // middle if middle else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    owners: dict[int, tuple[Owner, int]] = {}
    layer = 0
    for vp_stage in range(vpp):
        for pp_rank in range(pp):
            for local in range(counts[pp_rank] // vpp):
                owners[layer] = (Owner(pp_rank, vp_stage), local)
                layer += 1
    return owners


def _layouts() -> list[tuple[int, ParallelLayout]]:
    found = []
    for layers, pp, vpp in itertools.product((4, 6, 8, 12, 16), (1, 2, 3, 4), (1, 2, 3)):
        for first, last in itertools.product((None, 1, 2, 4), (None, 1, 2, 3)):
            if (first is not None or last is not None) and pp < 2 or vpp > 1 and pp < 2:
                continue
            middle = pp - (first is not None) - (last is not None)
            rest = layers - (first or 0) - (last or 0)
            if rest < 0 or (rest > 0) != (middle > 0) or (middle and (rest % middle or rest // middle % vpp)):
                continue
            if any(n is not None and n % vpp for n in (first, last)):
                continue
            found.append((layers, ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)))
    return found


def test_stages_are_megatron_cores_over_many_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard map's placement (megatron-core's functions, on a config of pipeline sizes only)
    equals the placement written out by hand and the one megatron-core gives a model's full
    TransformerConfig; no parallel state is asked."""
    from megatron.core import parallel_state

    from mapgen.compiler.megatron_config import transformer_config

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parallel state asked")

    for getter in ("get_pipeline_model_parallel_rank", "get_pipeline_model_parallel_world_size",
                   "get_virtual_pipeline_model_parallel_rank", "get_virtual_pipeline_model_parallel_world_size"):
        monkeypatch.setattr(parallel_state, getter, refuse)
    layouts = _layouts()
    assert len(layouts) > 100
    dims = ModelDims(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     kv_channels=16, vocab_size=128, max_position_embeddings=256)
    compared = refused = 0
    for layers, layout in layouts:
        full = transformer_config(replace(dims, num_layers=layers), torch.float32, layout)
        try:
            theirs = layer_owners(full, rank_context(layout))
        except ZeroDivisionError:  # vpp with first and last stage layers and no middle stage
            assert layout.pp == 2 and layout.vpp > 1 and None not in (layout.first_stage_layers, layout.last_stage_layers)
            with pytest.raises(ShardMapError, match="ZeroDivisionError"):
                stage_layers(layers, layout)
            refused += 1
            continue
        ours = stage_layers(layers, layout)
        assert ours == theirs, (layers, layout)
        assert ours == _reference_stages(layers, layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers), (layers, layout)
        compared += 1
    assert compared > 100 and refused > 0


@pytest.mark.parametrize(
    ("layers", "layout"),
    [(6, ParallelLayout(pp=4)), (8, ParallelLayout(pp=2, first_stage_layers=5, last_stage_layers=5)),
     (8, ParallelLayout(pp=2, vpp=3)), (9, ParallelLayout(pp=3, first_stage_layers=2))],
)
def test_layouts_megatron_core_cannot_place(layers: int, layout: ParallelLayout) -> None:
    with pytest.raises(ShardMapError, match="layers"):
        stage_layers(layers, layout)


@pytest.mark.parametrize(
    "layout",
    [ParallelLayout(tp=2, pp=2), ParallelLayout(tp=2, pp=2, ep=2, dp=2), ParallelLayout(tp=4, pp=3, ep=2, etp=1, dp=2),
     ParallelLayout(tp=2, pp=2, ep=4, etp=1, dp=4), ParallelLayout(tp=1, ep=4, etp=2, dp=8)],
)
def test_global_ranks_follow_megatron_cores_order(layout: ParallelLayout) -> None:
    """RankGenerator's numbering, order tp-cp-ep-dp-pp: the innermost size varies fastest."""
    ranks = global_ranks(layout)
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    etp, ep = layout.expert_tp, layout.ep
    edp = layout.world_size // (etp * ep * pp)
    assert sorted(ranks.dense) == list(range(layout.world_size))
    for g, (t, p, d) in ranks.dense.items():
        assert g == t + tp * (d + dp * p)
    for g, (e, r, p) in ranks.expert.items():
        assert g % etp == e and g // etp % ep == r and g // (etp * ep * edp) == p


def test_layout_problems_are_errors(build: Any) -> None:
    module = build("qwen3_moe", "specs/qwen3_moe.yaml")
    with pytest.raises(ShardMapError, match="ep 3 does not divide the 4 experts"):
        shard_map(module, ParallelLayout(ep=3, dp=3))
    with pytest.raises(ShardMapError, match="TP 4 does not divide the 2 query groups"):
        shard_map(module, ParallelLayout(tp=4, dp=1))
    with pytest.raises(ShardMapError, match="raise dp"):
        shard_map(module, ParallelLayout(tp=1, ep=2, etp=2, dp=1))
    dense = build("llama", "specs/llama.yaml")
    with pytest.raises(ShardMapError, match="no experts"):
        shard_map(dense, ParallelLayout(ep=2, dp=2))


def test_the_runtime_imports_neither_the_compiler_nor_verification() -> None:
    """The shard map is runtime: a training job has it without the compiler."""
    import ast

    for path in sorted((ROOT / "mapgen" / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            assert not [n for n in names if n.startswith(("mapgen.compiler", "mapgen.verify"))], path
