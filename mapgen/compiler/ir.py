"""The intermediate representation: a spec's rule, its kind, one decided mapping per Megatron parameter.

A `Rule` is one rule of a family spec as `mapgen.compiler.spec` parses it; a `Kind` is what
every mapping kind implements (the kinds: `mapgen.compiler.kinds`); a `Mapping` is one Megatron
parameter with its HF sources, kind and TP split decided; a `Target` is every mapping of one
model. A rule names its kind, a mapping its rule and kind, and a kind reads both: they are
defined together here, below the spec's parser and the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mapgen.common.dims import ModelDims
from mapgen.common.errors import Location
from mapgen.common.layout import QKVGeometry, slice_name
from mapgen.compiler.expr import Expr
from mapgen.compiler.inventory import HFTensor
from mapgen.compiler.pattern import Pattern

if TYPE_CHECKING:
    from mapgen.common.errors import ErrorSink
    from mapgen.compiler.hfconfig import HFConfig
    from mapgen.compiler.inventory import MegatronParam

__all__ = ["HFSource", "Kind", "Mapping", "QKVGeometry", "Rule", "Source", "Target"]


class Kind:
    """A mapping kind. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]] = ("hf",)
    # further role sets a rule may give instead of `roles` (told apart by their count or keys)
    alternative_roles: ClassVar[tuple[tuple[str, ...], ...]] = ()
    doc: ClassVar[str]
    # the roles when the checkpoint stacks the experts (the rule's `fused_hf`); () if it may not
    stacked_roles: ClassVar[tuple[str, ...]] = ()
    permutable: ClassVar[bool] = False  # takes `permute_dims`
    interleavable: ClassVar[bool] = False  # takes `interleaved` (a fused tensor's parts alternate)
    extra_keys: ClassVar[tuple[str, ...]] = ()  # rule keys only this kind takes (all required)
    merges_heads: ClassVar[bool] = False  # needs a QKVGeometry (`geometry`)
    fixed_split: ClassVar[str] = ""  # the TP split of a kind that implies one; auto decides per parameter

    @property
    def role_sets(self) -> tuple[tuple[str, ...], ...]:
        return (self.roles, *self.alternative_roles)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<kind {self.name}>"

    def split(self, param: MegatronParam, module_types: dict[str, str]) -> str | None:
        """column, row or replicated; None when it cannot be decided (an error)."""
        return self.fixed_split or None

    def geometry(self, rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> QKVGeometry | None:
        return None

    def shape_problem(self, m: Mapping) -> str | None:
        raise NotImplementedError

    def import_expr(self, m: Mapping, group: str) -> str:
        raise NotImplementedError

    def export_expr(self, m: Mapping) -> str:
        raise NotImplementedError

    def describe(self, m: Mapping) -> str:
        """The kind as decided for this parameter, as docstrings and `explain` give it."""
        return self.name


@dataclass(frozen=True)
class Rule:
    """One rule of a family spec: a Megatron parameter pattern, the HF patterns it is made from, its kind."""

    megatron: Pattern
    hf: tuple[tuple[str, Pattern], ...]  # (role, pattern), in the kind's role order
    kind: Kind
    loc: Location
    permute_dims: tuple[int, ...] | None = None
    when: Expr | None = None
    heads: Expr | None = None
    head_dim: Expr | None = None
    # the HF tensor where a checkpoint stacks the experts: `[*]` picks this expert's slice;
    # for gated_mlp the slice is [gate; up]
    fused_hf: Pattern | None = None
    given_id: str | None = None  # the spec's `id:`
    # gated_mlp read from one fused tensor whose gate and up rows alternate (gate rows 0, 2, ...)
    interleaved: bool = False

    @property
    def id(self) -> str:
        """The rule's stable identity, which generated code cites: its `id:` or its Megatron pattern."""
        return self.given_id or str(self.megatron)

    def __str__(self) -> str:
        return self.id


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
