"""Writing a layer's experts back stacked: export and save of a module that maps experts one tensor
each (`<P>experts.<e>.gate_proj.weight`, ...), for a checkpoint that stored some layers' experts
stacked (`<P>experts.gate_up_proj` [E, 2I, H]: expert e's gate rows then its up rows, and
`<P>experts.down_proj` [E, H, I]), as Qwen3.5-MoE's published checkpoint does for its decoder
layers but not its MTP layer. `HFCheckpoint(unstack=True)` serves those stacked tensors one expert
at a time (its `unstacked`); these functions put an export's per-expert tensors back together
under the stacked names, layer by layer, so that a save writes the layout it read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from mapgen.runtime.hf_names import PER_EXPERT_RE, STACKED_DOWN, STACKED_GATE_UP

Stacking = tuple[tuple[str, int], ...]  # (stacked tensor's name, its count of experts): HFCheckpoint.unstacked


def stacked_prefixes(stacking: Stacking) -> dict[str, int]:
    """`<P>experts.` -> the count of experts, for each layer whose pair is stacked."""
    return {name[: -len(STACKED_GATE_UP)]: experts for name, experts in stacking if name.endswith("." + STACKED_GATE_UP)}


def stacking_problems(stacking: object, hf_names: Iterable[str]) -> list[str]:
    """What is wrong with a `stacked_experts` argument for a module of `hf_names`: each pair
    must name a layer whose experts the module maps one tensor each, all of them."""
    if not isinstance(stacking, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int) and not isinstance(p[1], bool)
        for p in stacking
    ):
        return [f"stacked_experts must be a tuple of (stacked tensor name, count of experts) pairs, not {stacking!r:.80}"]
    counts: dict[str, set[int]] = {}
    for name in hf_names:
        match = PER_EXPERT_RE.match(name)
        if match:
            counts.setdefault(match["prefix"], set()).add(int(match["expert"]))
    problems = []
    for name, experts in stacking:
        prefix = name[: -len(STACKED_GATE_UP)] if name.endswith("." + STACKED_GATE_UP) else name[: -len(STACKED_DOWN)]
        if not name.endswith(("." + STACKED_GATE_UP, "." + STACKED_DOWN)) or counts.get(prefix) != set(range(experts)):
            problems.append(f"stacked_experts: {name} ({experts} experts) is not a layer whose experts the module maps one by one")
    return problems


def restacked_sizes(sizes: dict[str, int], stacking: Stacking) -> dict[str, int]:
    """A save's tensor sizes (HF order) with each stacked layer's per-expert tensors replaced by
    its two stacked tensors, where the layer's first expert tensor stood."""
    prefixes = stacked_prefixes(stacking)
    out: dict[str, int] = {}
    for name, nbytes in sizes.items():
        match = PER_EXPERT_RE.match(name)
        if match is None or match["prefix"] not in prefixes:
            out[name] = nbytes
            continue
        target = match["prefix"] + (STACKED_DOWN if match["which"] == "down" else STACKED_GATE_UP)
        out[target] = out.get(target, 0) + nbytes
    return out


def restack_bound(sizes: dict[str, int], stacking: Stacking) -> int:
    """The most bytes `restack` holds at once: the two stacked tensors of the largest stacked
    layer (one layer's are built at a time), from the per-expert tensors' export `sizes`."""
    restacked = restacked_sizes(sizes, stacking)
    return max(
        (restacked.get(prefix + STACKED_GATE_UP, 0) + restacked.get(prefix + STACKED_DOWN, 0) for prefix in stacked_prefixes(stacking)),
        default=0,
    )


def restack(stream: Iterable[tuple[str, torch.Tensor]], stacking: Stacking) -> Iterator[tuple[str, torch.Tensor]]:
    """`stream` (an export's (HF name, tensor) pairs) with each stacked layer's expert tensors
    gathered into its `gate_up_proj` and `down_proj`, each yielded once its last expert has come
    (every other tensor passes through as it comes). Holds at most the stacked tensors of the
    layers whose experts are coming (one layer, in HF order)."""
    prefixes = stacked_prefixes(stacking)
    building: dict[str, tuple[torch.Tensor, int]] = {}  # stacked name -> (tensor, expert tensors still to come)
    for name, tensor in stream:
        match = PER_EXPERT_RE.match(name)
        if match is None or match["prefix"] not in prefixes:
            yield name, tensor
            continue
        experts, expert, which = prefixes[match["prefix"]], int(match["expert"]), match["which"]
        rows, cols = tensor.shape
        if which == "down":
            target, shape, view = match["prefix"] + STACKED_DOWN, (experts, rows, cols), slice(None)
        else:
            target, shape = match["prefix"] + STACKED_GATE_UP, (experts, 2 * rows, cols)
            view = slice(0, rows) if which == "gate" else slice(rows, 2 * rows)
        if target not in building:
            building[target] = (torch.empty(shape, dtype=tensor.dtype), experts * (1 if which == "down" else 2))
        whole, left = building[target]
        whole[expert, view].copy_(tensor)
        del tensor
        if left > 1:
            building[target] = (whole, left - 1)
            continue
        del building[target]
        yield target, whole
        del whole
    if building:  # the stream ended before every expert of a layer came: a bug, not an input
        raise RuntimeError(f"export ended with stacked experts incomplete: {sorted(building)}")
