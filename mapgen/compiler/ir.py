"""The intermediate representation: one concrete, fully decided mapping per Megatron parameter."""

from __future__ import annotations

from dataclasses import dataclass

from mapgen.common.dims import ModelDims
from mapgen.common.errors import Location
from mapgen.compiler.inventory import HFTensor


@dataclass(frozen=True)
class QKVGeometry:
    heads: int
    groups: int
    head_dim: int
    gate: bool = False


@dataclass(frozen=True)
class Mapping:
    megatron_name: str
    shape: tuple[int, ...]  # global (unsharded) shape
    dtype: str
    module_kind: str
    layer: int | None
    expert: int | None
    kind: str  # the spec kind, auto included
    split: str  # resolved TP treatment: column | row | replicated
    hf: tuple[tuple[str, HFTensor], ...]  # (role, tensor) in the kind's role order
    rule_pattern: str
    rule_loc: Location
    permute_dims: tuple[int, ...] | None = None
    qkv: QKVGeometry | None = None

    @property
    def split_dim(self) -> int | None:
        """The dim this parameter is sharded along over TP, or None when every rank holds it all."""
        if self.split == "column":
            return 0
        if self.split == "row" and len(self.shape) >= 2:
            return 1
        return None


@dataclass(frozen=True)
class Source:
    path: str  # as given on the command line, relative where possible
    sha256: str


@dataclass(frozen=True)
class Target:
    name: str
    family: str
    hf_architecture: str
    layout: str
    model: str  # megatron-core model class: "gpt" (GPTModel) or "hybrid" (HybridModel)
    spec: Source
    config: Source
    dims: ModelDims
    mappings: tuple[Mapping, ...]
    hf_tensors: tuple[HFTensor, ...]  # in the order HF lays out its state dict
    ignored_hf: tuple[tuple[str, str], ...] = ()  # (name prefix, why) left alone on purpose
