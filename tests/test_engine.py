"""Weights into an inference engine (mapgen.engine): `engine_weights` fed to a stand-in engine
that honours vLLM's `load_weights` contract, and `PieceReceiver` assembling export_local pieces
into full HF tensors or an engine rank's TP shard.

Single process on a tiny Qwen3-MoE (per-expert tensors, and a variant that stacks its experts),
then one spawn of 4 gloo processes at TP2 x PP2 x EP2 (whole experts, ETP 1) on the Qwen3-MoE
stand-in: rank 0 feeds the engine while the others drain, and every rank's pieces fill two
engine-TP2 receivers in the parent."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import dist_tasks
from mapgen.compiler.build import compile_target
from mapgen.compiler.targets import read_targets
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.engine import EngineWeightsError, PieceReceiver, PieceReceiverError, engine_weights, vllm_shard_dim
from mapgen.runtime.drivers import Converter, load_hf_checkpoint
from mapgen.runtime.shardmap import HFPiece
from mapgen.verify import testing
from mapgen.verify.processes import TaskFailed, spawn


class StandInEngine:
    """An inference engine's model as vLLM's (and SGLang's) `load_weights` treats it: its own
    parameters, one per HF name, each this engine rank's TP shard (split along the name's dim,
    `vllm_shard_dim` by default); `load_weights` copies each (name, full tensor) it is given into
    its parameter, narrowed to the shard, raises on a name it does not know (as vLLM's loaders
    do), and returns the names it loaded."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype = torch.float32,
        tp_rank: int = 0,
        tp_size: int = 1,
        shard_dim: Callable[[str], int | None] = vllm_shard_dim,
    ) -> None:
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.dims = {name: shard_dim(name) if tp_size > 1 else None for name in shapes}
        self.params: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            dims = list(shape)
            if self.dims[name] is not None:
                dims[self.dims[name]] //= tp_size
            self.params[name] = torch.full(dims, float("nan"), dtype=dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        for name, weight in weights:
            param = self.params[name]
            dim = self.dims[name]
            if dim is not None:
                size = param.shape[dim]
                weight = weight.narrow(dim, self.tp_rank * size, size)
            if weight.shape != param.shape:
                raise ValueError(f"{name}: {tuple(weight.shape)} into {tuple(param.shape)}")
            param.copy_(weight)
            loaded.add(name)
        return loaded


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _shard(tensor: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    if dim is None:
        return tensor
    step = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * step, step)


@pytest.fixture(scope="module")
def qwen3_moe(tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None) -> tuple[Path, Any, dict[str, torch.Tensor]]:
    folder, _ = tiny_checkpoint("qwen3_moe")
    return folder, compile_module("qwen3_moe", folder / "config.json"), load_file(folder / "model.safetensors")


def _converter(module: Any, folder: Path) -> Converter:
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32).eval()
    load_hf_checkpoint(module, [model], folder)
    return Converter(module, [model])


# --- engine_weights, single process -----------------------------------------------------------


def test_the_engine_gets_the_checkpoints_bytes(qwen3_moe: Any) -> None:
    """Fed through engine_weights, a TP1 stand-in engine holds every tensor of the checkpoint
    file bit for bit, and two TP2 engine ranks hold its halves along each shard dim. The tensors
    it is given may view the model's parameters, so an engine must copy: it does, and the
    model's next step does not reach it."""
    folder, module, original = qwen3_moe
    converter = _converter(module, folder)
    shapes = {n: tuple(t.shape) for n, t in original.items()}
    engine = StandInEngine(shapes)
    weights = engine_weights(converter, feed=True)
    assert engine.load_weights(weights) == set(original)
    assert weights.finished and weights.handed == len(original) and weights.drained == 0
    assert all(_same_bytes(engine.params[n], original[n]) for n in original)
    for rank in range(2):
        sharded = StandInEngine(shapes, tp_rank=rank, tp_size=2)
        with engine_weights(converter, feed=True, dtype=torch.bfloat16, bucket_bytes=2048) as weights:
            assert sharded.load_weights(weights) == set(original)
        for name, tensor in original.items():
            expected = _shard(tensor, vllm_shard_dim(name), rank, 2).to(torch.bfloat16).float()
            assert _same_bytes(sharded.params[name], expected), (rank, name)
    assert {vllm_shard_dim(n) for n in original} == {0, 1, None}
    # views of the parameters at TP1 in the model's dtype; the engine's copies stay as they were
    storages = {p.untyped_storage().data_ptr() for p in converter.chunks[0].parameters()}
    assert sum(t.untyped_storage().data_ptr() in storages for _, t in converter.export()) > len(original) // 2
    with torch.no_grad():
        for param in converter.chunks[0].parameters():
            param.mul_(2)
    assert all(_same_bytes(engine.params[n], original[n]) for n in original)


def test_an_export_must_be_consumed_to_the_end(qwen3_moe: Any) -> None:
    """A non-feeding rank's export yields nothing but runs to its end; an export a feeding
    rank's engine stops part way is drained by `with` (the engine's error goes on, with a note)
    or refused by close(), naming the ranks left waiting."""
    folder, module, original = qwen3_moe
    converter = _converter(module, folder)
    shapes = {n: tuple(t.shape) for n, t in original.items()}
    total = len(original)
    idle = engine_weights(converter, feed=False)
    assert list(idle) == [] and idle.finished and idle.drained == total and idle.handed == 0
    assert list(idle) == [] and idle.drain() == 0
    with engine_weights(converter, feed=False) as idle:
        pass  # not consumed in the block: leaving it drains
    assert idle.finished and idle.drained == total

    # the engine raises on a name it does not know: the rest is drained, the error goes on
    unknown = "model.layers.1.self_attn.o_proj.weight"
    engine = StandInEngine({n: s for n, s in shapes.items() if n != unknown})
    with pytest.raises(KeyError) as raised:
        with engine_weights(converter, feed=True, bucket_bytes=2048) as weights:
            engine.load_weights(weights)
    assert weights.finished and weights.handed + weights.drained == total and 0 < weights.drained < total
    assert any("drained so that the other ranks finished the export" in n for n in raised.value.__notes__)
    # a consumer that stops early without an error
    with pytest.raises(EngineWeightsError, match=r"stopped after taking 3 tensor\(s\).*the engine does not have them"):
        with engine_weights(converter, feed=True) as weights:
            for _, _ in zip(range(3), weights):
                pass
    assert weights.finished and weights.drained == total - 3
    # close() on an export stopped part way: refused, naming the problem, and left open to drain
    weights = engine_weights(converter, feed=True, bucket_bytes=2048)
    next(weights)
    with pytest.raises(EngineWeightsError, match=r"close\(\) on an export stopped after 1 tensor\(s\) \(the last 'model.embed_tokens.weight'\).*other ranks.*waiting in one of its collectives.*call \.drain\(\)"):
        weights.close()
    assert weights.drain() == total - 1 and weights.finished
    weights.close()
    unstarted = engine_weights(converter, feed=True)
    unstarted.close()  # never started here: nothing ran, nothing to finish
    with pytest.raises(EngineWeightsError, match="was closed"):
        next(unstarted)
    finished = engine_weights(converter, feed=True)
    assert sum(1 for _ in finished) == total
    finished.close()
    with pytest.raises(TypeError, match="feed must be True"):
        engine_weights(converter, feed=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a mapgen Converter"):
        engine_weights(object(), feed=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine_weights(converter, feed=True, nope=1)


# --- PieceReceiver, single process ------------------------------------------------------------


def test_receiver_rebuilds_every_tensor_and_the_tp2_shards(qwen3_moe: Any) -> None:
    """export_local's pieces into a receiver of full tensors give every HF tensor bit for bit;
    into the two ranks of an engine TP2 (vLLM's shard dims), each rank's halves, equal to what
    a TP2 engine fed through engine_weights holds."""
    folder, module, original = qwen3_moe
    converter = _converter(module, folder)
    pieces = list(converter.export_local())
    receiver = PieceReceiver(module)
    assert receiver.missing() == {n: t.numel() for n, t in original.items()} and receiver.complete() == []
    for piece in pieces:
        receiver.add(piece)
    assert receiver.done and receiver.missing() == {} and sorted(receiver.complete()) == sorted(original)
    rebuilt = receiver.tensors()
    assert sorted(rebuilt) == sorted(original)
    assert all(_same_bytes(rebuilt[n], original[n]) for n in original)
    shapes = {n: tuple(t.shape) for n, t in original.items()}
    for rank in range(2):
        shard = PieceReceiver(module, tp_rank=rank, tp_size=2, shard_dims=vllm_shard_dim, dtype=torch.float32)
        written = sum(shard.add(piece) for piece in pieces)
        assert written == sum(math.prod(shape) for shape in shard.shapes.values())  # each element once
        engine = StandInEngine(shapes, tp_rank=rank, tp_size=2)
        engine.load_weights(engine_weights(converter, feed=True))
        for name, tensor in shard.tensors().items():
            expected = _shard(original[name], vllm_shard_dim(name), rank, 2)
            assert _same_bytes(tensor, expected) and _same_bytes(tensor, engine.params[name]), (rank, name)
    # the buffers in another dtype and an explicit (uneven) range: a padded vocabulary's ranks
    embed = "model.embed_tokens.weight"
    ranges: dict[str, Any] = {embed: (0, 0, 100)}
    first = PieceReceiver({embed: shapes[embed]}, shard_dims=ranges, dtype=torch.bfloat16, skip_unknown=True)
    last = PieceReceiver({embed: shapes[embed]}, shard_dims={embed: (0, 100, 128)}, skip_unknown=True)
    for piece in pieces:
        first.add(piece)
        last.add(piece)
    assert _same_bytes(first.tensors()[embed], original[embed][:100].to(torch.bfloat16))
    assert _same_bytes(last.tensors()[embed], original[embed][100:])


def test_an_incomplete_receiver_says_what_is_missing(qwen3_moe: Any) -> None:
    """Exact counting: a tensor no piece reached is named by tensors(); half a tensor written
    twice is still half; non-primary pieces, unknown names and pieces that do not fit."""
    folder, module, original = qwen3_moe
    pieces = list(_converter(module, folder).export_local())
    left_out = "model.layers.0.self_attn.q_proj.weight"
    receiver = PieceReceiver(module)
    for piece in pieces:
        if piece.name != left_out:
            receiver.add(piece)
    assert receiver.missing() == {left_out: original[left_out].numel()}
    assert left_out not in receiver.complete() and len(receiver.complete()) == len(original) - 1
    with pytest.raises(PieceReceiverError, match=rf"1 of {len(original)} tensors are incomplete.*\n  {re.escape(left_out)}: 8192 of 8192 elements not written \(none written\)"):
        receiver.tensors()
    partial = receiver.tensors(partial=True)
    assert left_out not in partial and len(partial) == len(original) - 1
    rows, cols = original[left_out].shape
    top = HFPiece(left_out, None, "q", (rows, cols), (((0, rows // 2),), ((0, cols),)))
    for _ in range(3):  # written again and again: still half
        assert receiver.add(top, original[left_out][: rows // 2]) == rows // 2 * cols
        assert receiver.missing() == {left_out: rows // 2 * cols}
    with pytest.raises(PieceReceiverError, match=r"4096 of 8192 elements not written$"):
        receiver.tensors()
    assert _same_bytes(receiver.tensors(partial=True)[left_out][: rows // 2], original[left_out][: rows // 2])
    (whole,) = [p for p in pieces if p.name == left_out]
    assert receiver.add(whole) == rows * cols  # the rest (and the top half again)
    assert receiver.done and _same_bytes(receiver.tensors()[left_out], original[left_out])
    receiver.reset()
    assert receiver.missing() == {n: t.numel() for n, t in original.items()}
    # a piece another TP rank also holds (not primary) is ignored unless replicas are asked for
    norm = next(p for p in pieces if p.name.endswith("input_layernorm.weight"))
    copy = dataclasses.replace(norm, primary=False)
    assert receiver.add(copy) == 0 and norm.name in receiver.missing()
    assert PieceReceiver(module, replicas=True).add(copy) == norm.data.numel()
    # a piece of a tensor it does not fill; pieces that do not fit
    small = PieceReceiver({left_out: (rows, cols)})
    with pytest.raises(PieceReceiverError, match=r"'model.embed_tokens.weight', which is not among"):
        small.add(pieces[0])
    assert PieceReceiver({left_out: (rows, cols)}, skip_unknown=True).add(pieces[0]) == 0
    with pytest.raises(PieceReceiverError, match="data of shape"):
        small.add(top, original[left_out])
    with pytest.raises(PieceReceiverError, match="has shape"):
        PieceReceiver({left_out: (rows, cols + 1)}).add(whole)
    with pytest.raises(PieceReceiverError, match="needs shard_dims"):
        PieceReceiver(module, tp_size=2)
    with pytest.raises(PieceReceiverError, match=r"(?s)shard_dims has no entry.*tp_size 3 does not divide"):
        PieceReceiver({left_out: (rows, cols), "x": (5,)}, tp_size=3, shard_dims={"x": 0})


def test_pieces_of_several_runs_write_their_overlap_with_a_shard() -> None:
    """Pieces of several runs per dim (what a training TP rank holds of an interleaved tensor,
    such as its rows of both halves of a stacked [gate; up] slice), for one expert of a stacked
    tensor and for a plain one, each partly inside each shard of every engine split: every
    shard gets exactly the overlap, as `sync.scatter` into the full tensor and a slice give it."""
    from mapgen.runtime.local import scatter, take

    torch.manual_seed(0)
    full = torch.randn(4, 6, 5)
    plain = torch.randn(6, 5)
    pieces = [
        HFPiece("x", 2, "gate_up", (6, 5), (((0, 2), (3, 5)), ((1, 4),))),
        HFPiece("x", 1, "gate_up", (6, 5), (((2, 3), (5, 6)), ((0, 1), (4, 5)))),
        HFPiece("y", None, "gate_up", (6, 5), (((0, 2), (3, 5)), ((1, 4),))),
        HFPiece("y", None, "gate_up", (6, 5), (((2, 3), (5, 6)), ((0, 5),))),
    ]
    values = {"x": full, "y": plain}
    for dims, size in (({"x": 1, "y": 0}, 2), ({"x": 2, "y": 1}, 5), ({"x": 0, "y": None}, 2), ({"x": 1, "y": 0}, 3)):
        for rank in range(size):
            receiver = PieceReceiver({"x": (4, 6, 5), "y": (6, 5)}, tp_rank=rank, tp_size=size, shard_dims=dims)
            expected = {n: torch.zeros_like(t) for n, t in values.items()}
            for piece in pieces:
                data = take(values[piece.name], piece)
                scatter(expected[piece.name], piece, data)
                receiver.add(piece, data)
                receiver.add(piece, data)  # twice: counted once
            got = receiver.tensors(partial=True)
            for name in values:
                want = _shard(expected[name], dims[name], rank, size)
                assert name in got and torch.equal(got[name], want), (dims, size, rank, name)
                mask = torch.zeros(values[name].shape, dtype=torch.bool)
                for piece in pieces:
                    if piece.name == name:
                        scatter(mask, piece, torch.ones(take(mask, piece).shape, dtype=torch.bool))
                shard = _shard(mask, dims[name], rank, size)
                assert receiver.missing().get(name, 0) == shard.numel() - int(shard.sum()), (dims, size, rank, name)


def test_stacked_experts_into_full_tensors_and_shards(tmp_path: Path, cpu_megatron: None) -> None:
    """A checkpoint that stacks its experts ([E, 2I, H] gate_up_proj, [E, H, I] down_proj): each
    piece is one expert's slice; full tensors come back bit for bit, and engine-TP2 shards split
    inside each expert (gate_up_proj's dim 1) or between experts (down_proj's dim 0)."""
    source = tmp_path / "src"
    model = testing.save_tiny_model("qwen3_moe", source)
    folder = tmp_path / "stacked"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((source / "config.json").read_text())
    path = tmp_path / "engine_stacked.py"
    path.write_text(compile_target("engine_stacked", testing.ROOT / "specs/qwen3_moe.yaml", folder / "config.json", "local", "test", hf_experts="stacked"))
    module = testing.import_module_from_path(path, "engine_stacked")
    original = load_file(folder / "model.safetensors")
    pieces = list(_converter(module, folder).export_local())
    stacked = [n for n in original if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert stacked and all(p.expert is not None for p in pieces if p.name in stacked)
    receiver = PieceReceiver(module)
    for piece in pieces:
        receiver.add(piece)
    assert all(_same_bytes(t, original[n]) for n, t in receiver.tensors().items()) and len(receiver.tensors()) == len(original)

    def dims(name: str) -> int | None:
        if name.endswith("experts.gate_up_proj"):
            return 1
        if name.endswith("experts.down_proj"):
            return 0
        return vllm_shard_dim(name)

    for rank in range(2):
        shard = PieceReceiver(module, tp_rank=rank, tp_size=2, shard_dims=dims)
        for piece in pieces:
            shard.add(piece)
        for name, tensor in shard.tensors().items():
            assert _same_bytes(tensor, _shard(original[name], dims(name), rank, 2)), (rank, name)


# --- distributed: one spawn of 4 processes ----------------------------------------------------

LAYOUT = ParallelLayout(tp=2, pp=2, ep=2, etp=1)
TARGET = "qwen3_30b_a3b"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    entry = {e.name: e for e in read_targets(testing.ROOT)}[TARGET]
    folder = tmp_path_factory.mktemp("engine") / TARGET
    testing.save_standin(json.loads((testing.ROOT / entry.config).read_text()), folder)
    path = folder / f"{TARGET}.py"
    path.write_text(compile_target(TARGET, testing.ROOT / entry.spec, folder / "config.json", "local", "test"))
    results = spawn([(dist_tasks.engine_sync, (str(path), str(folder), LAYOUT, StandInEngine, 4096))], 4, timeout_s=600)
    for rank in range(4):
        result = results[rank][0]
        assert not isinstance(result, TaskFailed), result.traceback
    return {"folder": folder, "path": path, "results": [results[rank][0] for rank in range(4)]}


def test_rank_0_feeds_the_engine_while_the_others_drain(spawned: dict[str, Any], cpu_megatron: None) -> None:
    """At TP2 x PP2 x EP2, rank 0's engine holds the single-process export byte for byte while
    ranks 1-3 yield nothing but run the same collectives; an engine that raises part way (on the
    last layer, with buckets still to come from the second stage) gets its error with a note,
    every rank finishes that export, and a sync after it gives the same bytes again."""
    folder, results = spawned["folder"], spawned["results"]
    module = testing.import_module_from_path(spawned["path"], "engine_reference")
    reference = dict(_converter(module, folder).export())
    original = load_file(folder / "model.safetensors")
    assert sorted(reference) == sorted(original) and all(_same_bytes(reference[n], original[n]) for n in original)
    total = len(reference)
    feeder = results[0]
    assert feeder["first"]["loaded"] == set(reference) and feeder["first"]["handed"] == total
    assert feeder["first"]["left"] == 0 and feeder["first"]["finished"]
    for key in ("engine", "again"):
        assert sorted(feeder[key]) == sorted(reference)
        assert all(_same_bytes(feeder[key][n], reference[n]) for n in reference), key
    for result in results[1:]:
        assert result["first"]["loaded"] == [] and result["first"]["handed"] == 0
        assert result["first"]["drained"] == total and result["first"]["finished"]
        assert result["third"]["drained"] == total and result["third"]["finished"]
    for result in results:  # the drained ranks ran the gathers and broadcasts too
        assert result["counts"].get("broadcast", 0) > 0 and result["counts"].get("all_gather", 0) > 0, result["rank"]
    failed = feeder["second"]
    assert failed["error"]["args"] == (failed["fail_on"],)
    assert any("drained so that the other ranks finished the export" in n for n in failed["error"]["notes"])
    assert failed["finished"] and failed["handed"] + failed["drained"] == total and failed["drained"] > 0
    assert all(r["second"]["error"] is None and r["second"]["finished"] and r["second"]["drained"] == total for r in results[1:])


def test_every_ranks_pieces_fill_two_engine_tp2_receivers(spawned: dict[str, Any]) -> None:
    """Every rank's export_local pieces (as a consumer would collect them over its own
    transport) into the two ranks of an engine TP2: each receiver complete, each tensor its
    rank's shard of the checkpoint's; one rank's pieces alone leave it incomplete; all pieces
    again change nothing."""
    folder, results = spawned["folder"], spawned["results"]
    module = testing.import_module_from_path(spawned["path"], "engine_pieces")
    original = load_file(folder / "model.safetensors")
    for rank in range(2):
        receiver = PieceReceiver(module, tp_rank=rank, tp_size=2, shard_dims=vllm_shard_dim)
        for piece in results[0]["pieces"]:
            receiver.add(piece)
        assert not receiver.done and 0 < len(receiver.missing()) < len(original)
        for _ in range(2):
            for result in results:
                for piece in result["pieces"]:
                    receiver.add(piece)
            assert receiver.done and sorted(receiver.complete()) == sorted(original)
        tensors = receiver.tensors()
        assert sorted(tensors) == sorted(original)
        for name, tensor in tensors.items():
            assert _same_bytes(tensor, _shard(original[name], vllm_shard_dim(name), rank, 2)), (rank, name)
    assert {vllm_shard_dim(n) for n in original} == {0, 1, None}
