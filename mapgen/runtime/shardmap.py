"""The static shard map: for a module and a parallel layout, where every Megatron parameter lives
and which part of which HF tensor each of its shards holds, computed from the module's tables
alone (no process group, no model, no weights).

For every parameter: the pipeline stage that owns it (pp rank and virtual stage, by
megatron-core's own layer-offset functions, called with a config that carries only the pipeline
sizes), the EP rank and local index of an expert, and for each TP rank (expert-TP rank for expert
parameters) the HF coordinates of its shard: the HF tensor (a stacked-experts tensor and the
expert's index in it), and per dimension the runs of indices `(start, stop)` the shard covers;
the shard holds the product of the runs. Interleaving kinds (qkv, concat_qkv, the stacked
[gate; up] slice) have several runs in dim 0. A parameter every rank of its group holds whole
is marked `replicated`. `export` says what export gathers: over TP (expert-TP) along which
Megatron dim, over EP for experts, and the broadcast from the owning stage.

Global ranks (optional: `ranks=True`) come from megatron-core's `RankGenerator` with its default
order, for `dp` data-parallel replicas; each shard lists every global rank that holds it.

The coordinates are the ones the generated import functions read (`tests/test_shardmap.py`
checks them against the importers); the vocabulary parameters follow the drivers'
`make_vocab_size_divisible_by` padding (pad rows are zeros, no HF coordinates).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from mapgen.common.errors import MapgenError
from mapgen.common.layout import stacked_slice
from mapgen.common.parallel import ParallelLayout
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.ownership import Owner, expert_owner, layer_owners, local_name, param_owner
from mapgen.runtime.plan import ParamPlan, RulePlan
from mapgen.common.mamba import mamba_conv1d_sections, mamba_in_proj_sections
from mapgen.common.sections import gdn_in_proj_sections
from mapgen.runtime.sections import section_runs
from mapgen.runtime.vocab import VOCAB_PARAMS, padded_vocab_size

# megatron-core's default rank order (initialize_model_parallel's `order`), which mapgen uses
RANK_ORDER = "tp-cp-ep-dp-pp"

Run = tuple[int, int]  # [start, stop)


class ShardMapError(MapgenError):
    """The layout does not fit the module (what megatron-core would refuse), said up front."""


def rank_context(layout: ParallelLayout, tp_rank: int = 0, pp_rank: int = 0, ep_rank: int = 0, etp_rank: int = 0) -> ParallelContext:
    """The ParallelContext of one rank of `layout` (groups without handles)."""
    return ParallelContext(
        tp=Group(tp_rank, layout.tp),
        pp=Group(pp_rank, layout.pp),
        ep=Group(ep_rank, layout.ep),
        etp=Group(etp_rank, layout.expert_tp),
        vpp_size=layout.vpp,
    )


@dataclass(frozen=True)
class HFPiece:
    """The part of one HF tensor a shard holds: every index whose coordinate in each dimension
    lies in one of that dimension's runs. For a slice of a stacked-experts tensor (`expert` set),
    `runs` index the slice's dims (the stacked tensor without its expert dim)."""

    name: str  # the HF tensor (the stacked tensor's own name for a slice)
    expert: int | None  # the slice of a stacked-experts tensor, or None
    role: str  # the rule's role: hf, q, k, v, gate, up, gate_up
    shape: tuple[int, ...]  # of the tensor (of the slice)
    runs: tuple[tuple[Run, ...], ...]  # per dimension

    @property
    def label(self) -> str:
        """As the module's tables name it: `X[i]` for a slice."""
        return self.name if self.expert is None else f"{self.name}[{self.expert}]"

    @property
    def numel(self) -> int:
        return math.prod(sum(stop - start for start, stop in dim) for dim in self.runs)

    @property
    def whole(self) -> bool:
        return all(dim == ((0, size),) for dim, size in zip(self.runs, self.shape))

    def full_runs(self) -> tuple[tuple[Run, ...], ...]:
        """The runs over the HF tensor's own dims (the expert dim first for a slice)."""
        return self.runs if self.expert is None else (((self.expert, self.expert + 1),), *self.runs)

    def boxes(self) -> Iterator[tuple[slice, ...]]:
        """The piece as rectangular blocks of the HF tensor (of its full shape, expert dim too)."""
        def product(dims: tuple[tuple[Run, ...], ...]) -> Iterator[tuple[slice, ...]]:
            if not dims:
                yield ()
                return
            for start, stop in dims[0]:
                for rest in product(dims[1:]):
                    yield (slice(start, stop), *rest)

        yield from product(self.full_runs())


@dataclass(frozen=True)
class RankShard:
    """What one rank of the parameter's group (TP, or expert-TP for experts) holds."""

    rank: int  # in the TP (expert-TP) group
    shape: tuple[int, ...]  # the local shard's shape
    block: Run | None  # the rows (columns, ...) of the Megatron parameter along split_dim; None: whole
    pieces: tuple[HFPiece, ...]
    pad_rows: int = 0  # vocabulary padding past the HF rows: zeros, no HF coordinates
    global_ranks: tuple[int, ...] = ()  # every global rank holding this shard (all DP replicas)


@dataclass(frozen=True)
class ExportSteps:
    """What export does to bring the parameter back to HF tensors (drivers.Converter.export)."""

    group: str  # "tp" or "etp"
    group_size: int
    gather_dim: int | None  # the Megatron dim the shards are all-gathered and joined along; None: not gathered
    ep_size: int  # > 1 for an expert: its HF tensors are all-gathered over EP from the owning EP rank
    source: Owner  # the stage that exports it
    pp_size: int  # > 1: broadcast from `source` to every stage (export with all_stages)
    stacked: str | None  # the stacked-experts tensor its slice is stacked into
    vocab_rows: int | None  # the HF rows kept of a padded vocabulary parameter
    source_ep: int | None = None  # an expert: the EP rank that holds it

    def lines(self) -> list[str]:
        group = "expert-TP" if self.group == "etp" else "TP"
        found: list[str] = []
        if self.gather_dim is None:
            found.append(f"no {group} gather: every {group} rank holds it whole and exports its own copy"
                         if self.group_size > 1 else f"no {group} gather ({group} size 1)")
        elif self.group_size == 1:
            found.append(f"no {group} gather ({group} size 1)")
        else:
            found.append(f"all-gather over {group} ({self.group_size} ranks), joined along Megatron dim {self.gather_dim}")
        if self.vocab_rows is not None:
            found.append(f"the padded vocabulary cut to the HF rows (first {self.vocab_rows})")
        if self.ep_size > 1:
            found.append(f"all-gather over EP ({self.ep_size} ranks), from EP rank {self.source_ep}, which holds it")
        if self.pp_size > 1:
            where = f"pp rank {self.source.pp_rank}" + (f" (virtual stage {self.source.vp_stage})" if self.source.vp_stage else "")
            others = "the other stage" if self.pp_size == 2 else f"the other {self.pp_size - 1} stages"
            found.append(f"broadcast over PP from {where} to {others}")
        if self.stacked is not None:
            found.append(f"stacked into {self.stacked} once every expert's slice is there")
        return found


@dataclass(frozen=True)
class ParamShards:
    """One Megatron parameter under a layout."""

    plan: ParamPlan
    rule: RulePlan
    split: str  # column, row or replicated: how its group splits it
    group: str  # "tp", or "etp" for an expert parameter
    group_size: int
    owner: Owner  # the pipeline stage (pp rank, virtual stage) that holds it
    local_name: str  # its name inside that stage's model chunk
    ep_rank: int | None  # an expert: the EP rank that holds it
    local_expert: int | None  # an expert: its index on that EP rank
    shards: tuple[RankShard, ...]  # one per rank of the group, in rank order
    export: ExportSteps
    tied_copies: tuple[tuple[str, Owner], ...] = ()  # TIED copies (local name, stage) imported too

    @property
    def name(self) -> str:
        return self.plan.megatron_name

    @property
    def replicated(self) -> bool:
        """Every rank of its group holds the whole parameter (its HF tensors once per rank)."""
        return self.split == "replicated"


@dataclass(frozen=True)
class ShardMap:
    layout: ParallelLayout
    params: dict[str, ParamShards]
    layers: dict[int, tuple[Owner, int]]  # global layer -> (stage, index in that chunk)
    hf_shapes: dict[str, tuple[int, ...]]
    # HF name (`X`, `X[i]`) -> the Megatron parameters it feeds, over the whole module
    by_hf: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def for_hf(self, name: str) -> list[ParamShards]:
        """The mapped parameters an HF tensor feeds (`X` stacked: one per expert; `X[i]`: that
        expert's)."""
        return [self.params[n] for n in self.by_hf.get(name, ()) if n in self.params]

    def stage(self, pp_rank: int, vp_stage: int = 0) -> list[ParamShards]:
        return [p for p in self.params.values() if p.owner == Owner(pp_rank, vp_stage)]


def _megatron() -> tuple[Any, Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    return TransformerConfig, get_num_layers_to_build, get_transformer_layer_offset


def pipeline_config(num_layers: int, layout: ParallelLayout) -> Any:
    """A megatron-core TransformerConfig carrying only what its layer-offset functions read (the
    layer count and the pipeline sizes); the model sizes in it are placeholders."""
    import torch

    config_class = _megatron()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(
            num_layers=num_layers,
            hidden_size=8,
            num_attention_heads=1,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            num_layers_in_first_pipeline_stage=layout.first_stage_layers,
            num_layers_in_last_pipeline_stage=layout.last_stage_layers,
            pipeline_dtype=torch.float32,
        )


def stage_layers(num_layers: int, layout: ParallelLayout) -> dict[int, tuple[Owner, int]]:
    """Global layer -> (owning stage, index in its chunk), by megatron-core's functions
    (`ownership.layer_owners`); a layout they cannot place is a ShardMapError."""
    try:
        config = pipeline_config(num_layers, layout)
        layers = layer_owners(config, rank_context(layout))
    except Exception as exc:  # noqa: BLE001 - megatron-core's refusal (assertions, ValueErrors, ...)
        raise ShardMapError(
            f"megatron-core cannot place {num_layers} layers on layout {layout}: {type(exc).__name__}"
            + (f": {str(exc).strip()}" if str(exc).strip() else "")
        ) from None
    placed = sorted(layers)
    if placed != list(range(num_layers)) or _overlaps(config, layout, num_layers):
        raise ShardMapError(
            f"layout {layout} does not place the {num_layers} layers each once (megatron-core's "
            f"offsets give layers {_ranges(placed)}); check pp, vpp and the first/last stage layers"
        )
    return layers


def _overlaps(config: Any, layout: ParallelLayout, num_layers: int) -> bool:
    """Whether the chunks' layer counts fail to add up to the model's: two chunks claiming a
    layer (layer_owners keeps the last claim), as megatron-core's offsets do for some layouts
    it does not refuse (first + last stage layers over the model's)."""
    _, count_of, offset_of = _megatron()
    total = 0
    for pp_rank in range(layout.pp):
        for vp_stage in range(layout.vpp):
            stage = vp_stage if layout.vpp > 1 else None
            count = count_of(config, vp_stage=stage, pp_rank=pp_rank)
            if count < 0 or offset_of(config, vp_stage=stage, pp_rank=pp_rank) < 0:
                return True
            total += count
    return total != num_layers


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    runs: list[list[int]] = [[values[0], values[0]]]
    for value in values[1:]:
        if value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class GlobalRanks:
    """megatron-core's RankGenerator's answer for a layout: each global rank's coordinates."""

    dense: dict[int, tuple[int, int, int]]  # global rank -> (tp, pp, dp)
    expert: dict[int, tuple[int, int, int]]  # global rank -> (etp, ep, pp)

    def holding(self, pp_rank: int, tp_rank: int) -> tuple[int, ...]:
        return tuple(g for g, (tp, pp, _) in sorted(self.dense.items()) if (tp, pp) == (tp_rank, pp_rank))

    def holding_expert(self, pp_rank: int, etp_rank: int, ep_rank: int) -> tuple[int, ...]:
        return tuple(g for g, c in sorted(self.expert.items()) if c == (etp_rank, ep_rank, pp_rank))


def global_ranks(layout: ParallelLayout) -> GlobalRanks:
    """Coordinates of every global rank, as megatron-core's `initialize_model_parallel` makes its
    groups (RankGenerator, order tp-cp-ep-dp-pp, no context parallelism); a rank's index in a
    group is its place among the group's sorted ranks, as torch.distributed.new_group gives it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator

    if problems := layout.problems():
        raise ShardMapError(f"layout {layout}: " + "; ".join(problems))
    world = layout.world_size
    dense = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=1, order=RANK_ORDER)
    expert_dp = world // (layout.expert_tp * layout.ep * layout.pp)
    expert = RankGenerator(tp=layout.expert_tp, ep=layout.ep, dp=expert_dp, pp=layout.pp, cp=1, order=RANK_ORDER)

    def positions(generator: Any, token: str) -> dict[int, int]:
        found: dict[int, int] = {}
        for group in generator.get_ranks(token):
            for index, rank in enumerate(sorted(group)):
                found[rank] = index
        return found

    tp, pp, dp = (positions(dense, t) for t in ("tp", "pp", "dp"))
    etp, ep, epp = (positions(expert, t) for t in ("tp", "ep", "pp"))
    return GlobalRanks(
        {g: (tp[g], pp[g], dp[g]) for g in range(world)},
        {g: (etp[g], ep[g], epp[g]) for g in range(world)},
    )


def _merge(runs: list[Run]) -> tuple[Run, ...]:
    merged: list[Run] = []
    for start, stop in sorted(r for r in runs if r[1] > r[0]):
        if merged and start == merged[-1][1]:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return tuple(merged)


def _full(shape: tuple[int, ...]) -> list[tuple[Run, ...]]:
    return [((0, size),) for size in shape]


def _block(size: int, rank: int, ranks: int) -> Run:
    block = size // ranks
    return rank * block, (rank + 1) * block


def _reshape_runs(hf_shape: tuple[int, ...], shape: tuple[int, ...], dim: int, lo: int, hi: int) -> list[tuple[Run, ...]]:
    """The HF indices (per HF dim) of the Megatron block [lo, hi) along `dim` of the row-major
    reshape of the HF tensor to `shape`; a block that is no product of per-dim runs is refused."""
    inner = math.prod(shape[dim + 1 :])
    period = shape[dim] * inner
    for j in reversed(range(len(hf_shape))):
        after = math.prod(hf_shape[j + 1 :])
        upto = hf_shape[j] * after
        if (lo * inner) % after or (hi * inner) % after or upto % period:
            continue
        runs = [((t * period + lo * inner) // after, (t * period + hi * inner) // after) for t in range(upto // period)]
        found = _full(hf_shape)
        found[j] = _merge(runs)
        return found
    raise ShardMapError(
        f"the block {lo}:{hi} of dim {dim} of the reshape {list(hf_shape)} -> {list(shape)} is not a "
        "product of per-dimension index runs"
    )


def _pieces(
    kind: str, rule: RulePlan, plan: ParamPlan, hf_shapes: dict[str, tuple[int, ...]], rank: int, ranks: int,
    vocab_rows: Run | None,
) -> tuple[HFPiece, ...]:
    """The HF coordinates of rank `rank`'s shard (of `ranks`), as the kind's import reads them."""
    sources: list[tuple[str, int | None, str, tuple[int, ...]]] = []
    for label, role in zip(plan.hf_names, rule.roles):
        base, expert = stacked_slice(label)
        shape = hf_shapes[base]
        sources.append((base, expert, role, shape if expert is None else shape[1:]))

    def piece(index: int, runs: list[tuple[Run, ...]]) -> HFPiece:
        name, expert, role, shape = sources[index]
        return HFPiece(name, expert, role, shape, tuple(runs))

    split = plan.split_dim
    if split is None or ranks == 1:
        return tuple(piece(i, _full(s[3])) for i, s in enumerate(sources))
    if kind in ("qkv", "kv", "concat_qkv", "vision_qkv"):
        geometry = rule.qkv
        assert geometry is not None
        count = geometry.groups // ranks
        first = rank * count
        d = geometry.head_dim
        q_rows = geometry.heads // geometry.groups * d * (2 if geometry.gate else 1)
        q = (first * q_rows, (first + count) * q_rows)
        kv = (first * d, (first + count) * d)
        if kind in ("qkv", "kv") or len(sources) == 3:  # vision_qkv from CLIP's q, k, v too
            rows = {"q": q, "k": kv, "v": kv}
            return tuple(piece(i, [(rows[s[2]],), *_full(s[3][1:])]) for i, s in enumerate(sources))
        q_total, kv_total = geometry.heads * d, geometry.groups * d
        rows_runs = [q, (q_total + kv[0], q_total + kv[1]), (q_total + kv_total + kv[0], q_total + kv_total + kv[1])]
        return (piece(0, [_merge(rows_runs), *_full(sources[0][3][1:])]),)
    if kind == "gated_mlp":
        if len(sources) == 1:  # one [gate; up] tensor or a stacked-experts slice of one, or gate and up rows alternating
            shape = sources[0][3]
            rows_dim = 0 if rule.permute_dims is None else rule.permute_dims[0]  # the HF dim of Megatron's rows
            half = shape[rows_dim] // 2
            start, stop = _block(half, rank, ranks)
            runs = [(2 * start, 2 * stop)] if rule.interleaved else [(start, stop), (half + start, half + stop)]
            per_dim = _full(shape)
            per_dim[rows_dim] = _merge(runs)
            return (piece(0, per_dim),)
        return tuple(piece(i, [(_block(s[3][0], rank, ranks),), *_full(s[3][1:])]) for i, s in enumerate(sources))
    if kind == "gdn_in_proj":  # both HF tensors are key-head-major: rank t reads its block of each
        return tuple(piece(i, [(_block(s[3][0], rank, ranks),), *_full(s[3][1:])]) for i, s in enumerate(sources))
    if kind == "gdn_in_proj_sections":  # in_proj_qkv [q; k; v], z, b, a: rank t reads its block of each section
        g = rule.qkv
        assert g is not None and g.value_dim is not None
        section_rows = section_runs(gdn_in_proj_sections(g.groups, g.heads, g.head_dim, g.value_dim), rank, ranks)
        return tuple(piece(i, [_merge(section_rows[i]), *_full(s[3][1:])]) for i, s in enumerate(sources))
    if kind in ("mamba_in_proj", "mamba_conv1d"):  # [z; x; B; C; dt] / [x; B; C]: rank t reads its block of each section
        g = rule.qkv
        assert g is not None and g.value_dim is not None
        sizes = (mamba_in_proj_sections if kind == "mamba_in_proj" else mamba_conv1d_sections)(g.heads, g.head_dim, g.groups, g.value_dim)
        (mamba_rows,) = section_runs(sizes, rank, ranks)
        return (piece(0, [_merge(mamba_rows), *_full(sources[0][3][1:])]),)
    if kind == "gdn_conv1d":  # [q; k; v] channels: rank t reads its block of each section
        g = rule.qkv
        assert g is not None and g.value_dim is not None
        qk_total = g.groups * g.head_dim
        shape = sources[0][3]
        q = _block(qk_total, rank, ranks)
        v = _block(g.heads * g.value_dim, rank, ranks)
        runs = [q, (qk_total + q[0], qk_total + q[1]), (2 * qk_total + v[0], 2 * qk_total + v[1])]
        return (piece(0, [_merge(runs), *_full(shape[1:])]),)
    (source,) = sources
    shape = source[3]
    if kind == "reshape":
        lo, hi = _block(plan.shape[split], rank, ranks)
        return (piece(0, _reshape_runs(shape, plan.shape, split, lo, hi)),)
    hf_dim = split if rule.permute_dims is None else rule.permute_dims[split]
    per_dim = _full(shape)
    if vocab_rows is not None:
        start, stop = vocab_rows
        per_dim[hf_dim] = ((start, stop),) if stop > start else ()
    else:
        per_dim[hf_dim] = (_block(shape[hf_dim], rank, ranks),)
    return (piece(0, per_dim),)


def shard_pieces(
    rule: RulePlan,
    plan: ParamPlan,
    hf_shapes: dict[str, tuple[int, ...]],
    rank: int,
    ranks: int,
    vocab_rows: Run | None = None,
) -> tuple[HFPiece, ...]:
    """The HF coordinates of TP (expert-TP) rank `rank`'s shard of `plan`, one piece per HF
    tensor it reads, in the rule's role order. `vocab_rows`: the HF rows a padded vocabulary
    parameter's shard holds (its pad rows have none)."""
    return _pieces(rule.kind, rule, plan, hf_shapes, rank, ranks, vocab_rows)


def _split_name(plan: ParamPlan) -> str:
    return {None: "replicated", 0: "column"}.get(plan.split_dim, "row")


def _check(module: ModuleType, layout: ParallelLayout, vocab: set[str]) -> list[str]:
    """What megatron-core would refuse about this layout for the module's parameters."""
    found: list[str] = []
    dims = module.DIMS
    experts = dims.num_moe_experts
    if experts is None and (layout.ep > 1 or layout.etp is not None):
        found.append(f"{module.TARGET} has no experts: ep and etp do not apply")
    elif experts is not None and experts % layout.ep:
        found.append(f"ep {layout.ep} does not divide the {experts} experts of {module.TARGET}")
    unsplit: dict[str, list[str]] = {}
    for plan in module.PARAMS:
        size = layout.expert_tp if plan.expert_parallel else layout.tp
        which = "expert-TP" if plan.expert_parallel else "TP"
        rule = module.RULES[plan.rule]
        if rule.qkv is not None and rule.qkv.groups % size:
            key = f"{which} {size} does not divide the {rule.qkv.groups} query groups of"
            unsplit.setdefault(key, []).append(plan.megatron_name)
        elif plan.split_dim is not None and plan.megatron_name not in vocab and plan.shape[plan.split_dim] % size:
            key = f"{which} {size} does not divide dim {plan.split_dim} ({plan.shape[plan.split_dim]}) of"
            unsplit.setdefault(key, []).append(plan.megatron_name)
    for key, names in unsplit.items():
        more = f" and {len(names) - 1} more parameter(s)" if len(names) > 1 else ""
        found.append(f"{key} {names[0]}{more}")
    return found


def num_layers(module: ModuleType) -> int:
    """The decoder layers megatron-core places: a hybrid module's are two per HF decoder layer."""
    return int(module.DIMS.num_layers) * (2 if getattr(module, "MODEL", "gpt") == "hybrid" else 1)


def shard_map(module: ModuleType, layout: ParallelLayout, *, ranks: bool = True, names: list[str] | None = None) -> ShardMap:
    """The shard map of `module` under `layout` (`names`: only those Megatron parameters).
    `ranks`: fill in every shard's global ranks (megatron-core's RankGenerator)."""
    if problems := layout.problems():
        raise ShardMapError(f"layout {layout}: " + "; ".join(problems))
    if getattr(module, "MODEL", "gpt") == "hybrid" and layout.vpp > 1:
        raise ShardMapError("hybrid modules have no virtual pipeline stages in mapgen (megatron-core sets them with '|' in the layer pattern)")
    if getattr(module, "MODEL", "gpt") == "llava" and layout.pp * layout.vpp > 1:
        raise ShardMapError(f"{module.TARGET} is a LLaVAModel, supported without pipeline parallelism only (megatron-core puts its vision tower on the first stage)")
    vocab = {
        p.megatron_name for p in module.PARAMS
        if p.megatron_name in VOCAB_PARAMS and p.split_dim == 0 and p.shape[0] == module.DIMS.vocab_size
    }
    if problems := _check(module, layout, vocab):
        raise ShardMapError(f"layout {layout} does not fit {module.TARGET}: " + "; ".join(problems))
    layers = stage_layers(num_layers(module), layout)
    ctx = rank_context(layout)
    experts = module.DIMS.num_moe_experts
    per_rank = experts // layout.ep if experts else 0
    numbering = global_ranks(layout) if ranks else None
    hf_shapes = {t.name: tuple(t.shape) for t in module.HF_TENSORS}
    tied: dict[str, list[str]] = {}
    for copy, source in module.TIED.items():
        tied.setdefault(source, []).append(copy)
    last = Owner(layout.pp - 1, layout.vpp - 1)
    wanted = None if names is None else set(names)
    params: dict[str, ParamShards] = {}
    by_hf: dict[str, list[str]] = {}
    for plan in module.PARAMS:
        for label in plan.hf_names:
            base, expert = stacked_slice(label)
            by_hf.setdefault(label, []).append(plan.megatron_name)
            if expert is not None:
                by_hf.setdefault(base, []).append(plan.megatron_name)
        if wanted is not None and plan.megatron_name not in wanted:
            continue
        rule = module.RULES[plan.rule]
        group, size = ("etp", layout.expert_tp) if plan.expert_parallel else ("tp", layout.tp)
        owner = param_owner(plan, layers, ctx)
        ep_rank = local_expert = None
        if plan.expert is not None:
            ep_rank, local_expert = expert_owner(plan, per_rank)
        is_vocab = plan.megatron_name in vocab
        padded = padded_vocab_size(plan.shape[0], layout.make_vocab_size_divisible_by, size) if is_vocab else 0
        shards: list[RankShard] = []
        for rank in range(size):
            local = list(plan.shape)
            block: Run | None = None
            rows: Run | None = None
            pad = 0
            if plan.split_dim is not None:
                if is_vocab:
                    per = padded // size
                    block = (rank * per, (rank + 1) * per)
                    rows = (min(block[0], plan.shape[0]), min(block[1], plan.shape[0]))
                    pad = per - (rows[1] - rows[0])
                else:
                    block = _block(plan.shape[plan.split_dim], rank, size)
                local[plan.split_dim] = block[1] - block[0]
            holders: tuple[int, ...] = ()
            if numbering is not None:
                holders = (
                    numbering.holding_expert(owner.pp_rank, rank, ep_rank) if ep_rank is not None
                    else numbering.holding(owner.pp_rank, rank)
                )
            pieces = _pieces(rule.kind, rule, plan, hf_shapes, rank, size, rows)
            shards.append(RankShard(rank, tuple(local), block, pieces, pad, holders))
        stacked = {stacked_slice(n)[0] for n in plan.hf_names if stacked_slice(n)[1] is not None}
        export = ExportSteps(
            group=group,
            group_size=size,
            gather_dim=plan.split_dim,
            ep_size=layout.ep if plan.expert is not None else 1,
            source=owner,
            pp_size=layout.pp,
            stacked=", ".join(sorted(stacked)) or None,
            vocab_rows=plan.shape[0] if is_vocab and padded != plan.shape[0] else None,
            source_ep=ep_rank,
        )
        copies = tuple((copy, last) for copy in tied.get(plan.megatron_name, ()) if layout.pp > 1)
        params[plan.megatron_name] = ParamShards(
            plan, rule, _split_name(plan), group, size, owner, local_name(plan, layers, per_rank),
            ep_rank, local_expert, tuple(shards), export, copies,
        )
    return ShardMap(layout, params, layers, hf_shapes, {k: tuple(v) for k, v in by_hf.items()})
