"""The intermediate representation: one concrete, fully decided mapping per Megatron parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mapgen.common.dims import ModelDims
from mapgen.common.layout import QKVGeometry, slice_name
from mapgen.compiler.inventory import HFTensor

if TYPE_CHECKING:
    from mapgen.compiler.kinds import Kind
    from mapgen.compiler.spec import Rule

__all__ = ["HFSource", "Mapping", "QKVGeometry", "Source", "Target"]


@dataclass(frozen=True)
class HFSource:
    """One HF tensor a mapping reads, in its role: a whole tensor, or one expert's slice of a
    stacked-experts tensor (`expert_slice`; `shape` is then the slice's)."""

    role: str
    name: str  # the checkpoint tensor's name (the stacked tensor's, for a slice)
    shape: tuple[int, ...]
    expert_slice: int | None = None

    @property
    def label(self) -> str:
        """The name the module's tables give it: `X[i]` for slice i of X."""
        return slice_name(self.name, self.expert_slice)


@dataclass(frozen=True)
class Mapping:
    megatron_name: str
    shape: tuple[int, ...]  # global (unsharded) shape
    dtype: str
    module_kind: str
    layer: int | None
    expert: int | None
    kind: Kind
    split: str  # resolved TP treatment: column | row | replicated
    hf: tuple[HFSource, ...]  # in the kind's role order
    rule: Rule
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
    # (copy, original): HF tensors that repeat another (a multi-token-prediction layer's copy of
    # the shared embedding or output head), read by no rule, written back from the original
    hf_copies: tuple[tuple[str, str], ...] = ()
    # (prefix, other prefix): another naming checkpoints of the architecture use for the tensors
    # under `prefix` (a LLaVA saved by transformers 5); the runtime reads and writes either
    hf_namings: tuple[tuple[str, str], ...] = ()
