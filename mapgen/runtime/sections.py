"""Sectioned tensors: one Megatron tensor that is a concatenation of named sections, each split
over TP in equal contiguous blocks, read from HF tensors that are themselves concatenations of
some of those sections.

`sections` gives, per HF tensor in order, the row counts of its sections in order (the full,
unsharded sizes); the Megatron tensor's sections are all of them, in the same order. TP rank t
holds, one after the other, the t-th of TP blocks of every section:

    HF      A = [s0; s1; s2],  B = [s3],  C = [s4]
    rank t  [s0_t; s1_t; s2_t; s3_t; s4_t]          (s_t: the t-th of TP blocks of s)

This is megatron-core's layout of a column-parallel linear whose forward splits its output
into sections (GatedDeltaNet.in_proj: [q_t; k_t; v_t; z_t; beta_t; alpha_t], which Qwen3.5's
transformers model reads from in_proj_qkv = [q; k; v], in_proj_z, in_proj_b, in_proj_a;
MambaMixer.in_proj: [z_t; x_t; B_t; C_t; dt_t]). Weights [rows, ...] and 1-D biases alike.

The import reads only this rank's blocks. The export takes the shards of every rank in rank
order, or of one rank alone (`export_local`): the number of ranks a part stands for is read from
its size, so one rank's shard gives its own blocks of every HF tensor.
(The runtime functions' names carry no digit: the generated-code gate reads digits as 0.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mapgen.runtime.context import Group
from mapgen.runtime.transforms import concat_into

Sections = Sequence[Sequence[int]]


def _check(tensors: Sequence[torch.Tensor], sections: Sections) -> None:
    if len(tensors) != len(sections):
        raise ValueError(f"{len(tensors)} HF tensors for {len(sections)} groups of sections")
    tail = tensors[0].shape[1:]
    for index, (tensor, sizes) in enumerate(zip(tensors, sections)):
        if tensor.shape[0] != sum(sizes) or tensor.shape[1:] != tail:
            raise ValueError(
                f"HF tensor {index} {list(tensor.shape)} is not the sections {list(sizes)} "
                f"(rows {sum(sizes)}) of trailing shape {list(tail)}"
            )


def sections_import(
    group: Group, *tensors: torch.Tensor, sections: Sections, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF tensors (each the concatenation of its `sections`) -> this rank's block of every
    section, in order."""
    _check(tensors, sections)
    pieces: list[torch.Tensor] = []
    for tensor, sizes in zip(tensors, sections):
        start = 0
        for size in sizes:
            if size % group.size:
                raise ValueError(f"a section of {size} rows does not split over {group.size} TP ranks")
            block = size // group.size
            pieces.append(tensor.narrow(0, start + group.rank * block, block))
            start += size
    return concat_into(pieces, 0, out)


def sections_export(parts: Sequence[torch.Tensor], *, sections: Sections) -> tuple[torch.Tensor, ...]:
    """Every rank's shard (or one rank's alone), in rank order -> the HF tensors, each its
    sections' blocks of every part joined in order."""
    sizes = [size for group in sections for size in group]
    total = sum(sizes)
    blocks: list[list[torch.Tensor]] = [[] for _ in sizes]  # per section, each part's block
    for part in parts:
        rows = part.shape[0]
        if rows <= 0 or total % rows or any(size % (total // rows) for size in sizes):
            raise ValueError(f"a shard of {rows} rows is no TP block of the sections {[list(s) for s in sections]}")
        ranks = total // rows
        for index, piece in enumerate(torch.split(part, [size // ranks for size in sizes], dim=0)):
            blocks[index].append(piece)
    found: list[torch.Tensor] = []
    first = 0
    for group in sections:
        joined = [piece for index in range(first, first + len(group)) for piece in blocks[index]]
        found.append(joined[0].contiguous() if len(joined) == 1 else torch.cat(joined, dim=0))
        first += len(group)
    return tuple(found)


def section_runs(sections: Sections, rank: int, ranks: int) -> list[list[tuple[int, int]]]:
    """Per HF tensor, the row runs [start, stop) that TP rank `rank` of `ranks` reads (what
    `sections_import` narrows), for the static shard map."""
    found: list[list[tuple[int, int]]] = []
    for sizes in sections:
        runs: list[tuple[int, int]] = []
        start = 0
        for size in sizes:
            block = size // ranks
            runs.append((start + rank * block, start + (rank + 1) * block))
            start += size
        found.append(runs)
    return found
