"""The tensor transforms, against row-index formulas written independently of the code."""

from __future__ import annotations

import pytest
import torch

from mapgen.runtime import Group, ops, transforms

HIDDEN = 8


def _rows(n: int, hidden: int | None = HIDDEN) -> torch.Tensor:
    """Row i holds the value i everywhere: a row's content says where it came from."""
    base = torch.arange(n, dtype=torch.float64)
    return base if hidden is None else base[:, None].repeat(1, hidden)


@pytest.mark.parametrize("hidden", [HIDDEN, None], ids=["weight", "bias"])
@pytest.mark.parametrize(("heads", "groups", "head_dim"), [(4, 2, 3), (4, 4, 2), (8, 1, 2)])
def test_qkv_merge_matches_megatron_row_formula(heads: int, groups: int, head_dim: int, hidden: int | None) -> None:
    q, k, v = _rows(heads * head_dim, hidden), _rows(groups * head_dim, hidden) + 1000, _rows(groups * head_dim, hidden) + 2000
    merged = transforms.qkv_merge(q, k, v, groups=groups, head_dim=head_dim, gate=False)
    hpg, slots = heads // groups, heads // groups + 2
    expected = torch.empty_like(merged)
    for h in range(heads):
        g, j = divmod(h, hpg)
        for t in range(head_dim):
            expected[(g * slots + j) * head_dim + t] = q[h * head_dim + t]
    for g in range(groups):
        for t in range(head_dim):
            expected[(g * slots + hpg) * head_dim + t] = k[g * head_dim + t]
            expected[(g * slots + hpg + 1) * head_dim + t] = v[g * head_dim + t]
    assert torch.equal(merged, expected)
    back = transforms.qkv_split(merged, heads=heads, groups=groups, head_dim=head_dim, gate=False)
    for ours, theirs in zip(back, (q, k, v)):
        assert torch.equal(ours, theirs)


def test_qkv_gate_layout() -> None:
    """HF q_proj holds [q_h; gate_h] per head; Megatron's group is [q heads, gate heads, k, v]."""
    heads, groups, d = 4, 2, 2
    q = _rows(heads * 2 * d)
    k, v = _rows(groups * d) + 1000, _rows(groups * d) + 2000
    merged = transforms.qkv_merge(q, k, v, groups=groups, head_dim=d, gate=True)
    hpg = heads // groups
    per_group = merged.reshape(groups, -1, HIDDEN)
    for g in range(groups):
        for j in range(hpg):
            h = g * hpg + j
            assert torch.equal(per_group[g, j * d : (j + 1) * d], q[h * 2 * d : h * 2 * d + d])
            gate_at = hpg * d + j * d
            assert torch.equal(per_group[g, gate_at : gate_at + d], q[h * 2 * d + d : (h + 1) * 2 * d])
        assert torch.equal(per_group[g, 2 * hpg * d : 2 * hpg * d + d], k[g * d : (g + 1) * d])
    back = transforms.qkv_split(merged, heads=heads, groups=groups, head_dim=d, gate=True)
    for ours, theirs in zip(back, (q, k, v)):
        assert torch.equal(ours, theirs)


def test_kv_merge_interleaves_per_group() -> None:
    k, v = _rows(6) , _rows(6) + 100
    merged = transforms.kv_merge(k, v, groups=3, head_dim=2)
    assert merged[:, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103, 4, 5, 104, 105]
    back = transforms.kv_split(merged, groups=3, head_dim=2)
    assert torch.equal(back[0], k) and torch.equal(back[1], v)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_tp_imports_equal_split_of_the_full_merge(size: int) -> None:
    heads, groups, d = 8, 4, 2
    q, k, v = torch.randn(heads * d, HIDDEN), torch.randn(groups * d, HIDDEN), torch.randn(groups * d, HIDDEN)
    full = transforms.qkv_merge(q, k, v, groups=groups, head_dim=d, gate=False)
    gate, up = torch.randn(8, HIDDEN), torch.randn(8, HIDDEN)
    concat = torch.cat([q, k, v])
    for rank in range(size):
        group = Group(rank, size)
        assert torch.equal(ops.qkv_import(group, q, k, v, heads=heads, groups=groups, head_dim=d), full.chunk(size)[rank])
        assert torch.equal(ops.concat_qkv_import(group, concat, heads=heads, groups=groups, head_dim=d), full.chunk(size)[rank])
        assert torch.equal(ops.row_import(group, gate), gate.chunk(size, dim=1)[rank])
        expected_fc1 = torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
        assert torch.equal(ops.gated_mlp_import(group, gate, up), expected_fc1)


def test_transforms_do_not_modify_inputs() -> None:
    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)
    copies = [t.clone() for t in (q, k, v)]
    merged = transforms.qkv_merge(q, k, v, groups=2, head_dim=2, gate=False)
    transforms.qkv_split(merged, heads=4, groups=2, head_dim=2, gate=False)
    transforms.zero_centered_from_hf(q)
    transforms.permute(q, (1, 0))
    ops.gated_mlp_import(Group(1, 2), q, q)
    for original, copy in zip((q, k, v), copies):
        assert torch.equal(original, copy)


def test_zero_centered_and_permute_round_trip() -> None:
    weight = torch.tensor([1.0, 1.5, 0.25, 2.0])
    assert torch.equal(transforms.zero_centered_from_hf(weight), torch.tensor([0.0, 0.5, -0.75, 1.0]))
    assert torch.equal(transforms.zero_centered_to_hf(transforms.zero_centered_from_hf(weight)), weight)
    x = torch.randn(2, 3, 4)
    dims = (2, 0, 1)
    assert torch.equal(transforms.permute(transforms.permute(x, dims), transforms.inverse_permutation(dims)), x)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_kind_round_trips_through_tp_shards(size: int) -> None:
    heads, groups, d = 8, 4, 2
    q, k, v = torch.randn(heads * d, HIDDEN), torch.randn(groups * d, HIDDEN), torch.randn(groups * d, HIDDEN)
    qg = torch.randn(heads * 2 * d, HIDDEN)
    gate, up, w, bias = torch.randn(8, HIDDEN), torch.randn(8, HIDDEN), torch.randn(4, HIDDEN), torch.randn(4)
    groups_of = [Group(rank, size) for rank in range(size)]
    geometry = dict(heads=heads, groups=groups, head_dim=d)
    back = ops.qkv_export([ops.qkv_import(g, q, k, v, **geometry) for g in groups_of], **geometry)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    back = ops.qkv_export([ops.qkv_import(g, qg, k, v, **geometry, gate=True) for g in groups_of], **geometry, gate=True)
    assert all(torch.equal(a, b) for a, b in zip(back, (qg, k, v)))
    back = ops.kv_export([ops.kv_import(g, k, v, groups=groups, head_dim=d) for g in groups_of], groups=groups, head_dim=d)
    assert torch.equal(back[0], k) and torch.equal(back[1], v)
    concat = torch.cat([q, k, v])
    assert torch.equal(ops.concat_qkv_export([ops.concat_qkv_import(g, concat, **geometry) for g in groups_of], **geometry), concat)
    back = ops.gated_mlp_export([ops.gated_mlp_import(g, gate, up) for g in groups_of])
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)
    assert torch.equal(ops.column_export([ops.column_import(g, w) for g in groups_of]), w)
    assert torch.equal(ops.row_export([ops.row_import(g, w) for g in groups_of]), w)
    assert torch.equal(ops.row_export([ops.row_import(g, bias) for g in groups_of][:1]), bias)


def test_bad_splits_raise() -> None:
    with pytest.raises(ValueError, match="query groups do not split over 4"):
        ops.qkv_import(Group(0, 4), torch.randn(8, 2), torch.randn(4, 2), torch.randn(4, 2), heads=4, groups=2, head_dim=2)


# --- ops.cat: the export's concatenation of gathered parts ------------------------------------


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
    bf16 = [torch.randn(3, 4096).to(torch.bfloat16) for _ in range(2)]  # along dim 1
    big = [torch.randn(1024, 2048) for _ in range(2)]
    assert torch.equal(ops.row_export(bf16), torch.cat(bf16, 1))
    assert torch.equal(ops.row_export(big), torch.cat(big, 1))
    assert torch.equal(ops.cat(big, 0), torch.cat(big, 0))
