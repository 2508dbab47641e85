"""The zero-copy safetensors reader against the safetensors library's own reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mapgen.runtime.checkpoint import CheckpointError, HFCheckpoint


def test_sharded_checkpoint_reads_bit_exact(tmp_path: Path, tiny_checkpoint: Any) -> None:
    _, model = tiny_checkpoint("qwen2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:
        expected.update(load_file(shard))
    checkpoint = HFCheckpoint(tmp_path)
    assert sorted(checkpoint.names()) == sorted(expected)
    for name, tensor in expected.items():
        ours = checkpoint.get(name)
        assert checkpoint.shape(name) == tuple(tensor.shape)
        assert ours.dtype == tensor.dtype and torch.equal(ours, tensor), name
    assert checkpoint.integrity_problems() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_dtypes_and_empty_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"a": torch.randn(3, 5).to(dtype), "empty": torch.zeros(0, 4).to(dtype), "b": torch.randn(7).to(dtype)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = HFCheckpoint(tmp_path)
    for name, tensor in tensors.items():
        ours = checkpoint.get(name)
        assert ours.dtype == dtype and ours.shape == tensor.shape
        assert torch.equal(ours.view(torch.uint8), tensor.view(torch.uint8)), name


def test_reading_never_modifies_the_file(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    view = HFCheckpoint(tmp_path).get("a")
    view.add_(1)  # a caller that ignores the read-only contract touches its private copy only
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_missing_files_and_truncation_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        HFCheckpoint(tmp_path)
    save_file({"a": torch.ones(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    (problem,) = HFCheckpoint(tmp_path).integrity_problems()
    assert problem.endswith(f"truncated: {len(data) - 10} bytes, its header needs {len(data)}")


def test_reopening_reads_the_headers_as_they_are_now(tmp_path: Path) -> None:
    """What a checkpoint's headers say is parsed once per process for the same bytes: opening it
    again with unchanged files reuses that (the same `serial`), but a file rewritten in place with
    the same size and modification time, whose header now gives other shapes, is read anew, and
    a file truncated after it was first opened is reported."""
    import os

    path = tmp_path / "model.safetensors"
    x, y = torch.randn(4, 6), torch.randn(6, 4)
    save_file({"x": x, "y": y}, str(path))
    first = HFCheckpoint(tmp_path)
    assert HFCheckpoint(tmp_path).serial == first.serial  # unchanged bytes: parsed once
    assert first.shape("x") == (4, 6) and torch.equal(first.get("y"), y)
    stat = path.stat()
    save_file({"x": y.clone(), "y": x.clone()}, str(path))  # the shapes trade places
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    again = HFCheckpoint(tmp_path)
    assert again.serial != first.serial
    assert again.shape("x") == (6, 4) and torch.equal(again.get("x"), y) and torch.equal(again.get("y"), x)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    (problem,) = HFCheckpoint(tmp_path).integrity_problems()
    assert "truncated" in problem


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_experts_are_served_one_expert_at_a_time(tmp_path: Path, dtype: torch.dtype) -> None:
    """With `unstack`, a layer's stacked experts (gate_up_proj [E, 2I, H]: expert e's gate rows,
    then its up rows; down_proj [E, H, I]) read as one tensor per expert, each a view of the
    file's bytes (transformers' own split: chunk(2) of gate_up_proj[e]); a layer whose experts
    are one tensor each, a pair of other shapes, and a checkpoint opened without `unstack` stay
    as they are (Qwen3.5-MoE's published layout: decoder stacked, MTP per expert)."""
    from mapgen.runtime.hf_names import per_expert_names

    experts, inner, hidden = 3, 4, 5
    gate_up = torch.randn(experts, 2 * inner, hidden).to(dtype)
    down = torch.randn(experts, hidden, inner).to(dtype)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": gate_up,
        "model.layers.0.mlp.experts.down_proj": down,
        "mtp.layers.0.mlp.experts.0.gate_proj.weight": torch.randn(inner, hidden).to(dtype),
        # a pair of other shapes (gpt-oss' [E, H, 2I] orientation with an interleaved split) stays stacked
        "other.experts.gate_up_proj": torch.randn(experts, hidden, 2 * inner).to(dtype),
        "other.experts.down_proj": torch.randn(experts, inner, hidden).to(dtype),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert sorted(HFCheckpoint(tmp_path).names()) == sorted(tensors)
    checkpoint = HFCheckpoint(tmp_path, unstack=True)
    assert checkpoint.unstacked == (("model.layers.0.mlp.experts.gate_up_proj", experts), ("model.layers.0.mlp.experts.down_proj", experts))
    names = set(checkpoint.names())
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names and "other.experts.gate_up_proj" in names
    assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in names
    for e in range(experts):
        gate, up = gate_up[e].chunk(2, dim=0)
        for part, expected in (("gate", gate), ("up", up), ("down", down[e])):
            name = f"model.layers.0.mlp.experts.{e}.{part}_proj.weight"
            ours = checkpoint.get(name)
            assert checkpoint.shape(name) == tuple(expected.shape) and checkpoint.dtype(name) == checkpoint.dtype("mtp.layers.0.mlp.experts.0.gate_proj.weight")
            assert torch.equal(ours, expected), name
    assert checkpoint.integrity_problems() == []
    assert per_expert_names(["a.experts.12.down_proj.weight"]) and not per_expert_names(["a.experts.gate_up_proj"])
