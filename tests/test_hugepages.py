"""Export's fresh buffers (runtime/hugepages.py) and the concatenation of gathered parts
(runtime/ops.cat): the same values as torch.empty and torch.cat give, the buffers advised as huge
where the kernel takes the advice, and a gather's adjacent parts joined without a copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mapgen.runtime import hugepages, ops


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_a_large_buffer_is_a_plain_tensor_of_its_size(dtype: torch.dtype) -> None:
    numel = (hugepages.MIN_BYTES * 3) // torch.empty((), dtype=dtype).element_size() + 5
    one, two = hugepages.empty(numel, dtype), hugepages.empty(numel, dtype)
    assert one.shape == (numel,) and one.dtype == dtype and one.is_contiguous()
    one.fill_(1)
    two.fill_(2)
    assert torch.equal(one, torch.ones(numel, dtype=dtype)) and torch.equal(two, torch.full((numel,), 2, dtype=dtype))


def test_a_small_buffer_is_torch_empty() -> None:
    small = hugepages.empty(1000, torch.float32)
    assert small.shape == (1000,) and small.storage_offset() == 0
    assert small.untyped_storage().nbytes() == 4000


@pytest.mark.skipif(not hugepages._advise_function(), reason="no transparent huge pages to ask for on this kernel")
def test_a_large_buffer_starts_on_a_huge_page_and_is_advised() -> None:
    buffer = hugepages.empty(hugepages.MIN_BYTES, torch.uint8)
    assert buffer.data_ptr() % hugepages.PAGE == 0
    assert "hg" in _vm_flags(buffer.data_ptr())  # madvise(MADV_HUGEPAGE) took on its mapping
    buffer.fill_(7)  # faulted in, at 2 MiB a fault where the kernel has them
    assert int(buffer.sum()) == 7 * buffer.numel()


def test_gathered_parts_that_lie_in_one_buffer_are_joined_without_a_copy() -> None:
    whole = torch.arange(4 * 6 * 5, dtype=torch.float32)
    parts = [p.view(6, 5) for p in whole.chunk(4)]
    joined = ops.cat(parts, 0)
    assert torch.equal(joined, torch.cat(parts, 0)) and joined.shape == (24, 5)
    assert joined.data_ptr() == whole.data_ptr() and joined.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    offset = torch.arange(100, dtype=torch.float32)[10:70]  # parts starting inside their storage
    parts = [p.view(2, 15) for p in offset.chunk(2)]
    assert torch.equal(ops.column_export(parts), torch.cat(parts, 0)) and ops.column_export(parts).data_ptr() == offset.data_ptr()
    rows = torch.arange(8, dtype=torch.float32).view(1, 8)  # a size-1 dim's stride is free: the view's is made anew
    parts = [rows[:, :4].contiguous(), rows[:, 4:].contiguous()]
    assert torch.equal(ops.cat(parts, 0), torch.cat(parts, 0))


def test_parts_that_do_not_lie_together_are_copied() -> None:
    whole = torch.arange(60, dtype=torch.float32)
    out_of_order = [whole[30:].view(6, 5), whole[:30].view(6, 5)]
    joined = ops.cat(out_of_order, 0)
    assert torch.equal(joined, torch.cat(out_of_order, 0)) and joined.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
    gap = [whole[:20].view(4, 5), whole[25:45].view(4, 5)]
    assert torch.equal(ops.cat(gap, 0), torch.cat(gap, 0))
    apart = [torch.randn(6, 5), torch.randn(6, 5)]
    assert torch.equal(ops.cat(apart, 0), torch.cat(apart, 0))
    bf16 = [torch.randn(3, 4096).to(torch.bfloat16) for _ in range(2)]  # along dim 1, and large: into a fresh buffer
    big = [torch.randn(1024, 2048) for _ in range(2)]
    assert torch.equal(ops.row_export(bf16), torch.cat(bf16, 1))
    assert torch.equal(ops.row_export(big), torch.cat(big, 1))
    assert torch.equal(ops.cat(big, 0), torch.cat(big, 0))
