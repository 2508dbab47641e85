"""megatron-core's sharded state of a model under Megatron-LM's checkpoint keys, checked against a checkpoint.

The keys are the TE spec's or the local one's (`sharded_state`). `mapgen convert` writes this
state with megatron-core's `dist_checkpointing.save` and loads a checkpoint into it; before it
reads a byte, every rank checks its sharded tensors against the checkpoint's metadata
(`model_problems`) and the ranks agree that each tensor of the checkpoint has a place in the
model (`unused_tensors`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

from mapgen.common.layout import canonical_name
from mapgen.megatron_checkpoint import MegatronCheckpoint

# the sharded-state metadata Megatron-LM builds for the model (without a distributed optimizer)
SHARDED_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# a decoder layer's prefix, or the MTP block's transformer layer's (whose TE names are a decoder layer's)
_LAYER_KEY = re.compile(r"^(?:decoder\.layers\.(?:\d+\.)?|mtp\.layers\.\d+\.transformer_layer\.)")
# (megatron-core 0.19 names the MTP layer's module mtp_model_layer; its keys say transformer_layer)
_LAYER_NAME = re.compile(r"^(?:decoder\.layers\.\d+\.|mtp\.layers\.\d+\.(?:transformer_layer|mtp_model_layer)\.)")


def state_keys(chunks: list[Any]) -> list[str]:
    """Megatron-LM's keys of the model chunks in its checkpoints: `model`, or `model0`, ..."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _leaves(state: Any) -> list[tuple[str, Any]]:
    """(state-dict name, sharded entry) of a chunk's sharded state dict, nested dicts flattened."""
    found: list[tuple[str, Any]] = []
    for name, value in state.items():
        if isinstance(value, dict):
            found += [(f"{name}.{n}", v) for n, v in _leaves(value)]
        elif hasattr(value, "key"):
            found.append((name, value))
    return found


def _te_key(name: str, key: str, te_names: dict[str, str]) -> str:
    """The checkpoint key megatron-core's TransformerEngine spec gives the parameter that the
    local spec names `name` and keys `key`: the same layer prefix (with or without the layer
    index, as megatron-core wrote it), the TE parameter's name within its layer."""
    te_name = canonical_name(te_names.get(name, name))  # 0.19's Mamba conv1d_weight keys as conv1d.weight
    prefix = _LAYER_KEY.match(key)
    if prefix is None or _LAYER_NAME.match(te_name) is None or ".local_experts." in name:
        return key  # outside the decoder layers, and experts (TEGroupedMLP keys as SequentialMLP)
    return prefix.group(0) + _LAYER_NAME.sub("", te_name, count=1)


def _te_names(names: list[str]) -> dict[str, str]:
    from mapgen.compiler.inventory import MegatronParam, to_te_layout

    params = tuple(MegatronParam(n, (), "", "", None, None) for n in names)
    return {p.name: t.name for p, t in zip(params, to_te_layout(params))}


def sharded_state(chunks: list[Any], key_style: str, available: set[str] | None = None) -> dict[str, Any]:
    """Megatron-LM's model part of a checkpoint: each chunk's `sharded_state_dict()` under its
    key. With `key_style` "te", decoder-layer tensors carry the TE spec's keys. When reading
    (`available`: the checkpoint's keys), each tensor takes whichever of its local and TE keys
    the checkpoint has."""
    state: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        sharded = chunk.sharded_state_dict(metadata=dict(SHARDED_METADATA))
        leaves = _leaves(sharded)
        te_names = _te_names([name for name, _ in leaves])
        for name, entry in leaves:
            te_key = _te_key(name, entry.key, te_names)
            if te_key == entry.key:
                continue
            if available is None:
                if key_style == "te":
                    entry.key = te_key
            elif entry.key not in available and te_key in available:
                entry.key = te_key
        state[state_keys(chunks)[index]] = sharded
    return state


def without_objects(state: dict[str, Any]) -> None:
    """Drop the chunks' sharded objects (the linear layers' `_extra_state`): the local layers
    hold nothing in them, and a checkpoint of TransformerEngine layers has its own."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    for chunk in state.values():
        for name in [n for n, v in chunk.items() if isinstance(v, ShardedObject)]:
            del chunk[name]


def model_problems(state: dict[str, Any], checkpoint: MegatronCheckpoint) -> tuple[list[str], set[str]]:
    """This rank's sharded tensors against the checkpoint: (problems, the keys it reads)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    missing: list[str] = []
    shapes: list[str] = []
    used: set[str] = set()
    for chunk in state.values():
        for _, entry in _leaves(chunk):
            built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry
            for tensor in built if isinstance(built, (list, tuple)) else [built]:
                if not isinstance(tensor, ShardedTensor):
                    continue
                stored = checkpoint.tensors.get(tensor.key)
                if stored is None:
                    missing.append(tensor.key)
                elif stored[0] != tuple(tensor.global_shape):
                    shapes.append(f"{tensor.key} is {list(stored[0])} in the checkpoint, {list(tensor.global_shape)} in the model")
                else:
                    used.add(tensor.key)
    problems = []
    if missing:
        unique = sorted(set(missing))
        problems.append(
            f"{checkpoint.folder}: a checkpoint of another model? it lacks {len(unique)} tensor(s) the model has: "
            + ", ".join(unique[:6])
        )
    if shapes:
        problems.append(f"{checkpoint.folder}: a checkpoint of another model? {len(set(shapes))} tensor(s) differ: " + "; ".join(sorted(set(shapes))[:6]))
    return problems, used


def unused_tensors(checkpoint: MegatronCheckpoint, used: set[str]) -> list[str]:
    """The checkpoint's model tensors that no rank reads: one all_reduce of a flag per tensor
    (every rank has the same sorted list of the checkpoint's keys)."""
    keys = checkpoint.model_tensors()
    flags = torch.tensor([key in used for key in keys], dtype=torch.uint8)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [key for key, flag in zip(keys, flags.tolist()) if not flag]
