"""Reading a checkpoint's runs straight into a tensor (`runtime/fileread.py`): the same bytes as the
safetensors library reads, for every kind of copy an import makes, and a clear error for a file that
shrank."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mapgen.runtime import fileread, ops, transforms
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.context import Group


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every tensor takes the file path, in chunks of 256 bytes; the list records each read's size."""
    monkeypatch.setattr(fileread, "MIN_BYTES", 1)
    monkeypatch.setattr(fileread, "CHUNK_BYTES", 256)
    seen: list[int] = []
    read = fileread._read

    def counted(mapped: Any, target: memoryview, offset: int) -> None:
        seen.append(len(target))
        read(mapped, target, offset)

    monkeypatch.setattr(fileread, "_read", counted)
    return seen


def _saved(folder: Path, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    save_file(tensors, str(folder / "model.safetensors"))
    return load_file(folder / "model.safetensors")


def test_whole_and_split_copies_read_the_files_bytes(tmp_path: Path, reads: list[int]) -> None:
    expected = _saved(tmp_path, w=torch.randn(24, 40).to(torch.bfloat16), b=torch.randn(24))
    checkpoint = HFCheckpoint(tmp_path)
    whole = ops.whole_import(checkpoint.get("w"), out=torch.empty(24, 40, dtype=torch.bfloat16))
    assert torch.equal(whole.view(torch.int16), expected["w"].view(torch.int16))
    assert sum(reads) == 24 * 40 * 2 and max(reads) == 256  # read from the file, chunked
    reads.clear()
    rows = ops.column_import(Group(1, 2), checkpoint.get("w"), out=torch.empty(12, 40, dtype=torch.bfloat16))
    assert torch.equal(rows, expected["w"][12:]) and sum(reads) == 12 * 40 * 2
    reads.clear()
    # a column block is not a run of the file; a bf16 tensor into float32 is a conversion: torch copies both
    columns = ops.row_import(Group(0, 2), checkpoint.get("w"), out=torch.empty(24, 20, dtype=torch.bfloat16))
    widened = ops.whole_import(checkpoint.get("w"), out=torch.empty(24, 40))
    assert torch.equal(columns, expected["w"][:, :20]) and torch.equal(widened, expected["w"].float())
    assert reads == []


@pytest.mark.parametrize("gate", [False, True])
def test_fused_qkv_and_gate_up_are_read_block_by_block(tmp_path: Path, reads: list[int], gate: bool) -> None:
    heads, groups, head_dim, hidden = 8, 4, 4, 16
    q_rows = heads * head_dim * (2 if gate else 1)
    expected = _saved(
        tmp_path,
        q=torch.randn(q_rows, hidden),
        k=torch.randn(groups * head_dim, hidden),
        v=torch.randn(groups * head_dim, hidden),
        gate=torch.randn(32, hidden),
        up=torch.randn(32, hidden),
    )
    checkpoint = HFCheckpoint(tmp_path)
    for rank in range(2):
        group = Group(rank, 2)
        rows = (q_rows + 2 * groups * head_dim) // 2
        ours = ops.qkv_import(
            group, *(checkpoint.get(n) for n in "qkv"), heads=heads, groups=groups, head_dim=head_dim, gate=gate,
            out=torch.empty(rows, hidden),
        )
        theirs = ops.qkv_import(
            group, *(expected[n] for n in "qkv"), heads=heads, groups=groups, head_dim=head_dim, gate=gate
        )
        assert torch.equal(ours, theirs)
        fc1 = ops.gated_mlp_import(group, checkpoint.get("gate"), checkpoint.get("up"), out=torch.empty(32, hidden))
        assert torch.equal(fc1, torch.cat([expected["gate"].chunk(2)[rank], expected["up"].chunk(2)[rank]]))
    # k and v (and q without a gate) are read from the file, one query group's rows per read
    assert reads and sum(reads) >= 2 * 2 * groups * head_dim * hidden * 4 // 2
    direct = transforms.concat_into([expected["gate"], expected["up"]], 0, torch.empty(64, hidden))
    assert torch.equal(direct, torch.cat([expected["gate"], expected["up"]]))


def test_a_converter_load_reads_every_large_run_from_the_files(
    tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapgen.compiler.gpt_model import build_gpt_model
    from mapgen.runtime.drivers import load_hf_checkpoint

    folder, _ = tiny_checkpoint("qwen3")
    module = compile_module("qwen3", folder / "config.json")
    plain, direct = (build_gpt_model(module.DIMS, params_dtype=torch.float32) for _ in range(2))
    load_hf_checkpoint(module, [plain], str(folder))
    monkeypatch.setattr(fileread, "MIN_BYTES", 1)
    read: list[int] = []
    original = fileread._read
    monkeypatch.setattr(fileread, "_read", lambda m, t, o: (read.append(len(t)), original(m, t, o))[1])
    load_hf_checkpoint(module, [direct], str(folder))
    theirs = dict(plain.named_parameters())
    for name, param in direct.named_parameters():
        assert torch.equal(param, theirs[name]), name
    assert sum(read) > sum(p.numel() * 4 for p in direct.parameters()) // 2


def test_a_file_that_shrank_is_named(tmp_path: Path, reads: list[int]) -> None:
    _saved(tmp_path, w=torch.randn(64, 64))
    checkpoint = HFCheckpoint(tmp_path)
    view = checkpoint.get("w")
    os.truncate(tmp_path / "model.safetensors", 1000)  # the view is never touched: no SIGBUS
    with pytest.raises(fileread.FileReadError, match=r"model\.safetensors: no bytes at offset \d+ .*shrank"):
        ops.whole_import(view, out=torch.empty(64, 64))
    with pytest.raises(fileread.FileReadError, match="shrank"):
        with fileread.reading():  # deferred reads raise when the block ends
            ops.whole_import(view, out=torch.empty(64, 64))


def test_a_closed_checkpoint_unregisters_its_files(tmp_path: Path) -> None:
    _saved(tmp_path, w=torch.randn(8))
    before = dict(fileread._MAPPED)
    checkpoint = HFCheckpoint(tmp_path)
    checkpoint.get("w")
    (added,) = set(fileread._MAPPED) - set(before)
    fd = fileread._MAPPED[added].fd
    del checkpoint
    gc.collect()
    assert added not in fileread._MAPPED
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_forked_child_reads_with_a_pool_of_its_own(tmp_path: Path, reads: list[int]) -> None:
    """A process that read (so made its pool) and then forked: the child's reads still run (the
    parent's threads are not in the child; a pool that counted them would never start a read)."""
    import multiprocessing

    expected = _saved(tmp_path, w=torch.randn(32, 32))
    checkpoint = HFCheckpoint(tmp_path)
    ops.whole_import(checkpoint.get("w"), out=torch.empty(32, 32))  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    assert reads  # the parent read through its pool
    with context.Pool(1) as pool:
        read, nbytes = pool.apply_async(_read_in_child, (str(tmp_path),)).get(timeout=60)
    assert torch.equal(read, expected["w"]) and nbytes == 32 * 32 * 4


def _read_in_child(folder: str) -> tuple[torch.Tensor, int]:
    read = fileread._read
    calls: list[int] = []
    fileread._read = lambda mapped, target, offset: (calls.append(len(target)), read(mapped, target, offset))[1]
    checkpoint = HFCheckpoint(folder)  # held: its files stay registered while they are read
    out = ops.whole_import(checkpoint.get("w"), out=torch.empty(32, 32))
    return out, sum(calls)


def test_read_into_reads_a_files_bytes_at_an_offset(tmp_path: Path) -> None:
    """The bare read benchmarks time (`read_into`): the bytes at the offset, every chunk."""
    data = bytes(range(256)) * 64
    (tmp_path / "f").write_bytes(data)
    out = torch.empty(1000, dtype=torch.uint8)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        fileread.read_into(out, fd, 300)
        assert bytes(out.numpy()) == data[300:1300]
        with pytest.raises(fileread.FileReadError, match="shrank"):
            fileread.read_into(torch.empty(100, dtype=torch.uint8), fd, len(data) - 10, "f")
    finally:
        os.close(fd)
