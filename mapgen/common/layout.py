"""HF-name and tensor-layout facts that both the compiler and the runtime need. Torch-free.

A stacked-experts HF tensor (transformers' in-memory layout: one tensor for all experts of a
layer, expert first) is read one expert at a time; the IR carries that as `HFSource.expert_slice`,
and the generated tables name it as `X[i]`, which `stacked_slice` reads back.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any

LAYOUTS = ("te", "local")  # megatron-core's TransformerEngine layer-spec names, or its local ones
# megatron-core's GPTModel, its HybridModel, LLaVAModel, or a Mamba-hybrid model (HybridModel /
# MambaModel from the config's own layer pattern, Nemotron-H: mapgen/compiler/mamba_model.py)
MODEL_CLASSES = ("gpt", "hybrid", "llava", "mamba")
HF_EXPERTS = ("per_expert", "stacked")  # how an HF checkpoint stores MoE experts


@dataclass(frozen=True)
class QKVGeometry:
    """The attention sizes a QKV-like kind merges by: query heads, query groups (KV heads), head
    dim, and whether HF's q holds an output gate beside each head's query."""

    heads: int
    groups: int
    head_dim: int
    gate: bool = False
    # gated delta net kinds: heads are its value heads, groups its key heads, head_dim the key
    # head dim and value_dim the value head dim; None for attention (values are head_dim wide)
    value_dim: int | None = None


def stacked_slice(name: str) -> tuple[str, int | None]:
    """`X[i]` -> (X, i): slice i of a stacked-experts HF tensor; other names -> (name, None)."""
    if name.endswith("]") and "[" in name:
        base, index = name[:-1].rsplit("[", 1)
        return base, int(index)
    return name, None


def slice_name(base: str, index: int | None) -> str:
    """The inverse of `stacked_slice`."""
    return base if index is None else f"{base}[{index}]"


def inverse_permutation(dims: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(dims)
    for position, dim in enumerate(dims):
        inverse[dim] = position
    return tuple(inverse)


# megatron-core's weight buffers, by attribute name, that it keeps in float32 whatever the model's
# dtype (the router's `expert_bias`, DeepSeek's `e_score_correction_bias`: registered float32)
FLOAT32_BUFFERS = ("expert_bias",)


def model_weights(model: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """A Megatron model's parameters and its weight buffers, as two lists of (name, tensor) in
    `named_parameters()` / `named_buffers()` order, from one walk over its modules. Weight buffers
    are the persistent floating-point buffers a checkpoint carries (the router's expert_bias).
    A module or tensor reached twice is listed once, as torch does."""
    parameters: list[tuple[str, Any]] = []
    buffers: list[tuple[str, Any]] = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    stack: list[tuple[str, Any]] = [("", model)]
    pop, push = stack.pop, stack.append
    while stack:
        prefix, module = pop()
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        if module._parameters:
            for name, param in module._parameters.items():
                if param is not None and id(param) not in seen_params:
                    seen_params.add(id(param))
                    parameters.append((prefix + name, param))
        if module._buffers:
            skipped = module._non_persistent_buffers_set
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in skipped and buffer.is_floating_point() and id(buffer) not in seen_buffers:
                    seen_buffers.add(id(buffer))
                    buffers.append((prefix + name, buffer))
        if module._modules:  # depth first, in registration order: named_modules' order
            for name, child in reversed(module._modules.items()):
                if child is not None:
                    push((prefix + name + ".", child))
    return parameters, buffers


def weight_buffers(model: Any) -> list[tuple[str, Any]]:
    """A Megatron model's persistent buffers that hold weights a checkpoint carries (the router's
    expert_bias), as (name, tensor)."""
    return model_weights(model)[1]


# megatron-core 0.19 calls the MTP layer's decoder layer `mtp_model_layer` (its checkpoint keys
# stay `transformer_layer`, 0.16's module name); mapgen names it `transformer_layer` on every release
_MTP_MODEL_LAYER = re.compile(r"^(mtp\.layers\.\d+\.)mtp_model_layer\.")


# megatron-core 0.19's MambaMixer holds its convolution as plain parameters `conv1d_weight` and
# `conv1d_bias` (0.16: an nn.Conv1d, `conv1d.weight`, `conv1d.bias`; the checkpoint keys of both
# releases); mapgen names them `conv1d.weight` and `conv1d.bias` on every release
_MAMBA_CONV = re.compile(r"\.mixer\.conv1d_(weight|bias)$")


def canonical_name(name: str) -> str:
    """A megatron-core parameter's name as mapgen writes it (see above)."""
    if "conv1d_" in name:
        name = _MAMBA_CONV.sub(r".mixer.conv1d.\1", name)
    if "mtp_model_layer" not in name:
        return name
    return _MTP_MODEL_LAYER.sub(r"\1transformer_layer.", name, count=1)
