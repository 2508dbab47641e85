"""Nemotron-H's pieces against independent truths: the torch stand-ins for mamba_ssm (the SSD scan
against the step-by-step recurrence, the gated norm against transformers'), the einops stand-in,
the Mamba sections' TP blocks, and the stand-in config. The model's logits and export at TP2,
PP2, EP2 and TP2 x EP2 are tests/test_distributed.py's (target nemotron_3_nano_30b_a3b)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mapgen.common.mamba import mamba_conv1d_sections, mamba_in_proj_sections
from mapgen.compiler.mamba_torch import TorchRMSNormGated, torch_chunk_scan, torch_rearrange
from mapgen.runtime.context import Group
from mapgen.runtime.sections import sections_export, sections_import
from mapgen.verify import testing

CONFIG = testing.ROOT / "specs" / "configs" / "nemotron_3_nano_30b_a3b.json"


def _recurrence(x, dt, A, B, C, D, z, dt_bias, initial):  # type: ignore[no-untyped-def]
    """Mamba-2's scan one position at a time: S = exp(dt A) S + dt x B^T, y = S C + D x."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    step = torch.nn.functional.softplus(dt + dt_bias)
    state = initial.clone()
    ys = []
    for t in range(length):
        b = B[:, t].repeat_interleave(per_group, dim=1)  # [batch, heads, n]
        c = C[:, t].repeat_interleave(per_group, dim=1)
        decay = torch.exp(step[:, t] * A)[:, :, None, None]
        state = decay * state + (step[:, t, :, None] * x[:, t])[..., None] * b[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, c) + D[:, None] * x[:, t])
    y = torch.stack(ys, dim=1) * torch.nn.functional.silu(z)
    return y, state


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_the_chunked_scan_is_the_recurrence(chunk_size: int) -> None:
    torch.manual_seed(0)
    batch, length, heads, head_dim, groups, state = 2, 11, 4, 3, 2, 5
    x = torch.randn(batch, length, heads, head_dim, dtype=torch.float64)
    dt = torch.randn(batch, length, heads, dtype=torch.float64)
    A = -torch.rand(heads, dtype=torch.float64) * 2
    B = torch.randn(batch, length, groups, state, dtype=torch.float64)
    C = torch.randn(batch, length, groups, state, dtype=torch.float64)
    D = torch.randn(heads, dtype=torch.float64)
    z = torch.randn(batch, length, heads, head_dim, dtype=torch.float64)
    dt_bias = torch.randn(heads, dtype=torch.float64)
    initial = torch.randn(batch, heads, head_dim, state, dtype=torch.float64)
    y, final = torch_chunk_scan(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
        return_final_states=True, initial_states=initial,
    )
    expected, expected_final = _recurrence(x, dt, A, B, C, D, z, dt_bias, initial)
    torch.testing.assert_close(y, expected.to(y.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), expected_final, rtol=1e-5, atol=1e-5)


def test_the_gated_norm_is_transformers() -> None:
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNormGated

    torch.manual_seed(1)
    theirs = NemotronHRMSNormGated(24, group_size=8, eps=1e-5)
    ours = TorchRMSNormGated(24, eps=1e-5, group_size=8)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(24))
        ours.weight.copy_(theirs.weight)
    x, gate = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x, gate), theirs(x, gate), rtol=0, atol=1e-6)
    # the groups are normalised apart: scaling one group leaves the others' outputs
    scaled = x.clone()
    scaled[..., :8] *= 10
    torch.testing.assert_close(ours(scaled, gate)[..., 8:], ours(x, gate)[..., 8:])


def test_the_rearrange_stand_in() -> None:
    t = torch.arange(2 * 3 * 12).reshape(2, 3, 12)
    assert torch.equal(torch_rearrange(t, "l b d -> b l d"), t.transpose(0, 1))
    assert torch.equal(torch_rearrange(t, "b l (h p) -> b l h p", p=4), t.reshape(2, 3, 3, 4))
    four = t.reshape(2, 3, 3, 4)
    assert torch.equal(torch_rearrange(four, "b l h p -> l b (h p)"), four.permute(1, 0, 2, 3).reshape(3, 2, 12))
    assert torch.equal(torch_rearrange(t[:, :1, :], "d 1 w -> d w"), t[:, 0, :])
    assert torch.equal(torch_rearrange(torch.arange(6), "(h p) -> h p", p=3), torch.arange(6).reshape(2, 3))


@pytest.mark.parametrize(
    "sizes, names",
    [(mamba_in_proj_sections, ("z", "x", "B", "C", "dt")), (mamba_conv1d_sections, ("x", "B", "C"))],
    ids=["in_proj", "conv1d"],
)
def test_each_tp_rank_holds_its_block_of_every_section(sizes, names) -> None:  # type: ignore[no-untyped-def]
    heads, head_dim, groups, state = 4, 3, 2, 5
    (sections,) = sizes(heads, head_dim, groups, state)
    assert len(sections) == len(names)
    full = torch.randn(sum(sections), 7)
    pieces = dict(zip(names, torch.split(full, list(sections))))
    shards = []
    for rank in range(2):
        shard = sections_import(Group(rank=rank, size=2), full, sections=(sections,))
        # megatron-core's MambaMixer: [z_t; x_t; B_t; C_t; dt_t] (conv1d: [x_t; B_t; C_t])
        expected = torch.cat([p.chunk(2)[rank] for p in pieces.values()])
        assert torch.equal(shard, expected)
        shards.append(shard)
    (back,) = sections_export(shards, sections=(sections,))
    assert torch.equal(back, full)
    (alone,) = sections_export(shards[1:], sections=(sections,))  # one rank's own blocks
    assert torch.equal(alone, torch.cat([p.chunk(2)[1] for p in pieces.values()]))


def test_the_standin_has_every_layer_kind_and_the_published_pattern_fields(tmp_path: Path) -> None:
    fields = json.loads(CONFIG.read_text())
    tiny = testing.standin_config(fields)
    pattern = tiny["hybrid_override_pattern"]
    assert set(pattern) == {"M", "*", "-", "E"} and tiny["num_hidden_layers"] == len(pattern)
    half = len(pattern) // 2  # each of two pipeline stages has a Mamba and an expert layer
    assert {"M", "E"} <= set(pattern[:half]) and {"M", "E"} <= set(pattern[half:])
    assert tiny["mamba_num_heads"] % 2 == 0 and tiny["n_groups"] % 2 == 0  # TP 2 splits them
    testing.save_standin(fields, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hybrid_override_pattern"] == pattern and saved["num_hidden_layers"] == len(pattern)
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
    assert saved["layers_block_type"] == [kinds[s] for s in pattern]
