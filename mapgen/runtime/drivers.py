"""Drivers: an HF checkpoint into Megatron model chunks, Megatron chunks out as HF tensors, and
an HF checkpoint directory written atomically.

A generated module is the plan; these only walk it. `chunks` is the list of model chunks this
rank holds (one per virtual pipeline stage, in stage order). Which chunk holds which global
parameter follows from megatron-core's layer-offset rules (`ownership.py`), identically on
every rank, so the only collectives are the tensor gathers and broadcasts themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

from mapgen.common.errors import MapgenError
from mapgen.common.files import host_tag, process_alive, share_tree, temporary_folder
from mapgen.common.layout import canonical_name, model_weights, stacked_slice
from mapgen.runtime.checkpoint import DTYPES, SCALE_SUFFIX, HFCheckpoint, named_as, per_expert_names
from mapgen.common import gcpause
from mapgen.runtime import fileread, memo
from mapgen.runtime.collectives import RankError, agree_or_raise
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.ownership import (
    Owner,
    expert_owner,
    experts_per_rank,
    layer_owners,
    local_name,
    param_owner,
)
from mapgen.runtime import mx, package
from mapgen.runtime.package import FORMAT, is_package
from mapgen.runtime.plan import Loader, ParamPlan
from mapgen.runtime.buckets import BucketPlan, ExportBound, plan_buckets
from mapgen.runtime.formats import (
    DtypeArg,
    ExportFormat,
    ExportFormatError,
    FP8Arg,
    LoadedFormat,
    QuantArg,
    as_dtype,
    config_dtype,
    resolve_format,
)
from mapgen.runtime.placement import Module, Placement
from mapgen.runtime.local import LocalParam, LocalPiece, local_param_pieces, local_plan, no_fp8_local
from mapgen.runtime.restack import Stacking, restack, restacked_sizes, stacking_problems
from mapgen.runtime.sync import stream_export
from mapgen.runtime.vocab import VOCAB_PARAMS, padded_block, padded_rows_problem

DEFAULT_BUCKET_BYTES = 32 * 2**20  # at real widths on gloo, 32 MiB buckets export faster than 256 (docs/benchmarks.md)


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def num_experts(module: Module) -> int:
    if isinstance(getattr(module, "NUM_EXPERTS", None), int):  # a package's view: from DIMS
        return int(getattr(module, "NUM_EXPERTS"))
    return 1 + max((p.expert for p in module.PARAMS if p.expert is not None), default=-1)


def _weights(model: Any) -> list[tuple[str, torch.Tensor, bool]]:
    """A chunk's parameters, then its weight buffers (the router's expert_bias), as
    (name, tensor, whether it is a parameter)."""
    parameters, buffers = model_weights(model)
    return [(canonical_name(n), t, True) for n, t in parameters] + [(canonical_name(n), t, False) for n, t in buffers]


def vocab_params(module: Module) -> frozenset[str]:
    """The module's parameters whose dim 0 is the vocabulary, which a Megatron model may pad:
    the embedding and output layer, split over TP by rows, `DIMS.vocab_size` rows in the plan."""
    dims = getattr(module, "DIMS", None)
    if dims is None:
        return frozenset()
    return frozenset(
        p.megatron_name
        for p in module.PARAMS
        if p.megatron_name in VOCAB_PARAMS and p.split_dim == 0 and p.shape[0] == dims.vocab_size
    )


def place(
    module: Module, chunks: list[Any], ctx: ParallelContext, make_vocab_size_divisible_by: int = 1
) -> tuple[Placement, list[str]]:
    """Match this rank's chunks against the module; problems instead of raising. The
    vocabulary parameters may have more rows than the module's plan: Megatron-LM's padding to a
    multiple of `make_vocab_size_divisible_by` x TP, which is checked here."""
    if make_vocab_size_divisible_by < 1:  # the same argument on every rank: all raise here
        raise ValueError(f"make_vocab_size_divisible_by must be positive, not {make_vocab_size_divisible_by}")
    problems: list[str] = []
    nothing = Placement({}, {}, {}, torch.float32)
    if not isinstance(chunks, (list, tuple)):
        problems.append(
            f"chunks must be a list of this rank's model chunks (one per virtual pipeline stage), "
            f"not a {type(chunks).__name__}"
        )
        return nothing, problems
    if len(chunks) != ctx.vpp_size:
        problems.append(f"{len(chunks)} model chunks given for virtual pipeline size {ctx.vpp_size}")
        return nothing, problems
    models = [_unwrap(c) for c in chunks]
    for index, model in enumerate(models):
        if not hasattr(model, "config") or not callable(getattr(model, "named_parameters", None)):
            problems.append(
                f"model chunk {index} is a {type(model).__name__}, not a megatron-core model "
                "(it has no config or no named_parameters)"
            )
    if problems:
        return nothing, problems
    try:
        layers = layer_owners(models[0].config, ctx)
    except Exception as exc:  # noqa: BLE001 - megatron-core's own refusal, agreed on by the caller
        problems.append(f"megatron-core cannot place the layers of model chunk 0 under this layout: {exc}")
        return nothing, problems
    key = ("place", memo.layout_key(ctx), tuple(layers.items()))
    static = memo.once(module, key, lambda: _static_placement(module, layers, ctx))
    if isinstance(static, str):
        problems.append(static)
        return nothing, problems
    plans, owners, expert_ranks, expected_names, shapes = static
    expected = dict(expected_names)  # consumed below
    local: dict[str, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}
    dtypes: set[torch.dtype] = set()
    vocab = vocab_params(module)

    def shape_problem(name: str, plan: ParamPlan, actual: tuple[int, ...]) -> str | None:
        if plan.megatron_name not in vocab:
            return None if shapes.get(plan.megatron_name) == actual else _shape_problem(plan, actual, ctx, module.TARGET)
        if len(actual) != len(plan.shape) or actual[1:] != plan.shape[1:]:
            expected = ", ".join(map(str, plan.shape[1:]))
            return f"'{name}': the model's shard is {list(actual)}, {module.TARGET} expects [rows, {expected}]"
        return padded_rows_problem(name, actual[0], plan.shape[0], make_vocab_size_divisible_by, ctx.tp.size)
    for vp_stage, model in enumerate(models):
        for name, param, is_parameter in _weights(model):
            if is_parameter:
                dtypes.add(param.dtype)
            global_name = expected.pop((vp_stage, name), None)
            if global_name is not None and global_name not in vocab and shapes.get(global_name) == param.shape:
                local[global_name] = param  # the common case, checked at once
                continue
            if global_name is None and name in module.TIED:
                tied[name] = param
                if (problem := shape_problem(name, plans[module.TIED[name]], tuple(param.shape))) is not None:
                    problems.append(problem)
                continue
            if global_name is None:
                problems.append(f"model parameter '{name}' (chunk {vp_stage}) has no mapping in {module.TARGET}")
                continue
            plan = plans[global_name]
            problem = shape_problem(global_name, plan, tuple(param.shape))
            if problem:
                problems.append(problem)
            local[global_name] = param
    for (vp_stage, name), global_name in sorted(expected.items()):
        problems.append(f"the model lacks '{name}' (chunk {vp_stage}), {global_name} in {module.TARGET}")
    if len(dtypes) > 1:
        problems.append(f"model parameters mix dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return Placement(owners, local, tied, dtype, expert_ranks, vocab, key), problems


_StaticPlacement = tuple[
    dict[str, ParamPlan],
    dict[str, Owner],
    dict[str, tuple[int, int]],
    dict[tuple[int, str], str],
    dict[str, tuple[int, ...]],
]


def _static_placement(module: Module, layers: dict[int, tuple[Owner, int]], ctx: ParallelContext) -> _StaticPlacement | str:
    """What `place` knows before it looks at the model: every parameter's plan, owner and
    expert rank, and the (chunk, local name) -> global name of this rank's parameters; or the
    problem that stops it (made once per module and layout: `memo`); and the shard shape each
    parameter must have on this rank, where it splits evenly."""
    plans = {p.megatron_name: p for p in module.PARAMS}
    num_layers = getattr(module, "NUM_LAYERS", None)
    if not isinstance(num_layers, int):
        num_layers = 1 + max((p.layer for p in module.PARAMS if p.layer is not None), default=-1)
    if len(layers) != num_layers:
        return f"the model has {len(layers)} decoder layers, {module.TARGET} has {num_layers}"
    try:
        per_rank = experts_per_rank(num_experts(module), ctx)
    except ValueError as exc:
        return f"{module.TARGET}: {exc}"
    owners = {name: param_owner(plan, layers, ctx) for name, plan in plans.items()}
    expert_ranks = {n: expert_owner(p, per_rank) for n, p in plans.items() if p.expert is not None}
    expected: dict[tuple[int, str], str] = {}
    for name, plan in plans.items():
        owner = owners[name]
        mine = name not in expert_ranks or expert_ranks[name][0] == ctx.ep.rank
        if owner.pp_rank == ctx.pp.rank and mine:
            expected[(owner.vp_stage, local_name(plan, layers, per_rank))] = name
    shapes = {name: local_shape(plan, ctx) for name, plan in plans.items() if _shape_problem(plan, local_shape(plan, ctx), ctx, "") is None}
    return plans, owners, expert_ranks, expected, shapes


def local_shape(plan: ParamPlan, ctx: ParallelContext) -> tuple[int, ...]:
    group = ctx.etp if plan.expert_parallel else ctx.tp
    if plan.split_dim is None:
        return plan.shape
    shape = list(plan.shape)
    shape[plan.split_dim] //= group.size
    return tuple(shape)


def _shape_problem(plan: ParamPlan, actual: tuple[int, ...], ctx: ParallelContext, target: str) -> str | None:
    group = ctx.etp if plan.expert_parallel else ctx.tp
    if plan.split_dim is not None and plan.shape[plan.split_dim] % group.size:
        which = "expert-TP" if plan.expert_parallel else "TP"
        return (
            f"{plan.megatron_name}: dim {plan.split_dim} of {list(plan.shape)} does not split "
            f"over {which} size {group.size}"
        )
    if actual != local_shape(plan, ctx):
        return (
            f"'{plan.megatron_name}': the model's shard is {list(actual)}, {target} expects "
            f"{list(local_shape(plan, ctx))} on this rank"
        )
    return None


def llava_problems(module: Module, tp: int, stages: int) -> list[str]:
    """A LLaVAModel module's refusals: pipeline stages (megatron-core's LLaVAModel keeps the
    vision tower and projector on the first stage only; mapgen places parameters by the
    language model's layers), and TP not dividing the vision tower's heads."""
    dims = getattr(module, "DIMS", None)
    if getattr(module, "MODEL", "gpt") != "llava" or dims is None:
        return []
    found = []
    if stages > 1:
        found.append(
            f"pp x vpp {stages}: {module.TARGET} is a LLaVAModel, supported without pipeline parallelism only "
            "(megatron-core puts its vision tower on the first stage)"
        )
    if dims.vision_num_attention_heads % tp:
        found.append(f"tp {tp} does not divide the {dims.vision_num_attention_heads} vision attention heads of {module.TARGET}")
    return found


def _layout_problems(module: Module, ctx: ParallelContext) -> list[str]:
    """Divisibility the generated functions rely on (query groups over TP)."""
    dims = getattr(module, "DIMS", None)
    if dims is not None and getattr(module, "MODEL", "gpt") == "llava":
        return llava_problems(module, ctx.tp.size, ctx.pp.size * ctx.vpp_size) + (
            [] if dims.num_query_groups % ctx.tp.size == 0 else [
                f"TP size {ctx.tp.size} does not divide the {dims.num_query_groups} query groups "
                f"(KV heads) of {module.TARGET}"
            ]
        )
    if dims is None or dims.num_query_groups % ctx.tp.size == 0:
        return []
    return [
        f"TP size {ctx.tp.size} does not divide the {dims.num_query_groups} query groups "
        f"(KV heads) of {module.TARGET}"
    ]


class ModuleArgumentError(MapgenError, TypeError):
    """A conversion was given something that is not a mapping module, or no parallel context.
    Every rank is given alike and raises alike, before any collective."""


_MODULE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "TARGET": str,
    "PARAMS": (tuple, list),
    "HF_TENSORS": (tuple, list),
    "IMPORTS": dict,
    "EXPORTS": dict,
    "TIED": dict,
}


def module_problems(module: object) -> list[str]:
    """What `module` lacks to be a generated mapping module (TARGET, PARAMS, HF_TENSORS, IMPORTS,
    EXPORTS, TIED of the right types; every parameter with its import and export function; a
    package: FORMAT, TARGET, PARTS and TIED, its parts being read when a view is made). A module
    generated by an older mapgen (no FORMAT) is told to rebuild."""
    if isinstance(module, ModuleType) and "RULES" in module.__dict__ and module.__dict__.get("FORMAT") != FORMAT:
        regenerate = "mapgen build"
        return [
            f"was generated by an older mapgen (its form is {module.__dict__.get('FORMAT', 1)}, this runtime reads "
            f"form {FORMAT}): rebuild it with this mapgen ({regenerate}, or the command in its header)"
        ]
    if is_package(module):
        shared = {"TARGET": str, "PARTS": tuple, "TIED": dict}
        return [
            f"lacks {name}" for name, kind in shared.items() if not isinstance(getattr(module, name, None), kind)
        ]
    found = [
        f"{name} ({'missing' if not hasattr(module, name) else 'a ' + type(getattr(module, name)).__name__})"
        for name, kind in _MODULE_FIELDS.items()
        if not isinstance(getattr(module, name, None), kind)
    ]
    if found:
        return [f"lacks {', '.join(found)}"]
    params = [p for p in getattr(module, "PARAMS") if not isinstance(p, ParamPlan)]
    if params:
        return [f"PARAMS holds {len(params)} entries that are not ParamPlans (a {type(params[0]).__name__})"]
    imports, exports = getattr(module, "IMPORTS"), getattr(module, "EXPORTS")
    unmapped = [p.megatron_name for p in getattr(module, "PARAMS") if p.megatron_name not in imports or p.megatron_name not in exports]
    return [f"no import or export function for {', '.join(unmapped[:5])}"] if unmapped else []


def check_module(module: object, what: str = "Converter") -> None:
    """Raise ModuleArgumentError naming what is missing unless `module` is a mapping module."""
    if problems := module_problems(module):
        shown = getattr(module, "__name__", None) or type(module).__name__
        raise ModuleArgumentError(
            f"{what}: {shown} is not a mapgen mapping module (a generated module such as "
            f"generated/llama3_1_8b.py): it {'; '.join(problems)}"
        )


class Converter:
    """One module's conversion plan for this rank's model chunks, decided once: which chunk
    holds each parameter, and the export buckets. Hold one for repeated exports (RL weight
    sync): after its first call nothing is looked up again.

    A model built with Megatron-LM's vocabulary padding (`make_vocab_size_divisible_by`, 128 in
    Megatron-LM's training scripts) has more embedding and output-layer rows than the HF
    checkpoint: say so here; import fills the pad rows with zeros and export drops them."""

    def __init__(
        self,
        module: Module,
        chunks: list[Any],
        ctx: ParallelContext | None = None,
        *,
        make_vocab_size_divisible_by: int = 1,
    ) -> None:
        check_module(module)
        if ctx is not None and not isinstance(ctx, ParallelContext):
            raise ModuleArgumentError(
                f"Converter: ctx must be a ParallelContext (ParallelContext.from_parallel_state()), "
                f"not a {type(ctx).__name__}"
            )
        self.module = module
        self.chunks = chunks
        self.ctx = ctx or ParallelContext.single()
        self._vocab_divisor = make_vocab_size_divisible_by
        with gcpause.paused():
            # a target package: only the parts this rank holds are imported (`rank_view`)
            self.view = _rank_view(module, chunks, self.ctx)
            self.placement, found = place(self.view, chunks, self.ctx, make_vocab_size_divisible_by)
        self._whole: tuple[Any, Placement] | None = None  # the whole target and its placement, for export
        self._problems = _layout_problems(module, self.ctx) + found
        self._agreed = False
        self._plans: dict[tuple[object, ...], tuple[list[BucketPlan], ExportBound]] = {}
        self._formats: dict[tuple[object, ...], ExportFormat] = {}
        self._local: list[LocalParam] | None = None  # export_local's plan, made on its first call
        # per export format: parameter -> (its data_ptr and shape, its pieces viewing it)
        self._local_views: dict[int, dict[int, tuple[int, torch.Size, list[LocalPiece]]]] = {}
        self.loaded: LoadedFormat | None = None  # how the checkpoint `load` read stores each tensor
        self._checkpoint: HFCheckpoint | None = None
        # the other namings (module prefix, checkpoint prefix) the loaded checkpoint used, which
        # export and save use too (`hf_name`)
        self.naming: tuple[tuple[str, str], ...] = ()
        # the layers whose experts the loaded checkpoint stored stacked (`restack`), which export
        # writes stacked again: (stacked tensor's name, its count of experts)
        self.stacked: Stacking = ()

    def hf_name(self, name: str) -> str:
        """An HF tensor's name as export writes it: the module's, in the naming of the
        checkpoint `load` read (a LLaVA saved by transformers 5 names its vision tower
        `vision_tower.*`, the published one `vision_tower.vision_model.*`)."""
        return named_as(name, self.naming)

    def _agree(self, extra: list[str], what: str, same: Sequence[tuple[str, object]] = ()) -> None:
        """Every rank calls this at the same point; after one agreement the placement is known
        good everywhere, so later calls need no collective unless they bring new checks or
        arguments every rank must pass alike (`same`, see `agree_or_raise`)."""
        if self._agreed and not extra and not same:
            return
        agree_or_raise(self._problems + extra, what, same)
        self._agreed = True

    def load(self, hf_dir: str | Path) -> int:
        """Fill every parameter from the HF checkpoint in `hf_dir`; returns the count.

        Each rank reads only the tensors its own parameters need. Everything is checked first,
        on every rank, and agreed on before any weight is written: the model against the module,
        the checkpoint's names, shapes, dtypes and file sizes against the module's HF table."""
        with gcpause.paused():
            return self._load(hf_dir)

    def _load(self, hf_dir: str | Path) -> int:
        module, placement = self.view, self.placement
        problems: list[str] = []
        checkpoint: HFCheckpoint | None = None
        try:
            checkpoint = open_checkpoint(module, hf_dir)
            problems += _checked(module, checkpoint, placement)
            if not problems:
                problems += copy_problems(module, checkpoint, placement)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            problems.append(str(exc))
        agree_or_raise(self._problems + problems, f"cannot load {hf_dir} into {module.TARGET}")
        self._agreed = True
        assert checkpoint is not None
        # how the checkpoint stores each tensor this rank loads; a gathered export "as the
        # checkpoint" of a package reads the rest of the table when it is made (`_format`)
        view = self.view
        self.loaded = memo.once(view, ("loaded", checkpoint.serial), lambda: _loaded_format(view, checkpoint))
        self._checkpoint = checkpoint
        self.naming = checkpoint.naming
        self.stacked = checkpoint.unstacked
        load = checkpoint.loader()  # an MXFP4 expert is dequantized alone
        # writes into the parameters, nothing made here outlives the call; big runs of the files
        # are read straight into them on a few threads, all done when the block ends
        with torch.inference_mode(), fileread.reading():
            for name, param in placement.local.items():
                _import(module, name, self.ctx, load, param.data, name in placement.vocab)
            for name, param in placement.tied.items():
                source = module.TIED[name]
                _import(module, source, self.ctx, load, param.data, source in placement.vocab)
        return len(placement.local) + len(placement.tied)

    def export(
        self,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        all_stages: bool = True,
        dtype: DtypeArg = None,
        keep_float32: Iterable[str] | None = None,
        fp8: FP8Arg = None,
        mxfp8: QuantArg = None,
        nvfp4: QuantArg = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for the whole model in HF order (at EP > 1, a bucket
        holds one local expert index of every EP rank, so experts come bucket by bucket).

        Where no layout change or cast is needed (TP 1, a replicated parameter), a yielded tensor
        may be a view of the model's own parameter: copy it if you keep it past the next
        optimizer step.

        `dtype`: None writes each tensor as the model holds it; a floating dtype
        (torch.bfloat16, "bfloat16", ...) casts every tensor to it except those the HF model
        keeps in float32 (transformers' `_keep_in_fp32_modules_strict`, DeepSeek-V3's router
        `gate.weight` and `e_score_correction_bias`, and what megatron-core keeps in a float32
        buffer), which stay float32; `keep_float32` names the tensors to keep instead (() casts
        all). "checkpoint" writes each tensor as the checkpoint `load` read stores it (its dtype;
        FP8 block-quantized where it was, in its block size).

        `fp8`: True (DeepSeek-V3's format: e4m3 weights, a float32 `<name>_scale_inv` per
        128 x 128 block, yielded right after its weight), a block size (rows, cols), or a
        config.json `quantization_config` (its `weight_block_size` and `modules_to_not_convert`
        are honoured). It quantizes the weights of linear layers (attention and MLP projections,
        experts), not embeddings, norms, the router or lm_head, as the published checkpoint does.

        `mxfp8`: True, or a compressed-tensors quantization_config (its `ignore` is honoured):
        the same linear weights as MXFP8, e4m3 with a uint8 E8M0 `<name>_scale` per 32 elements
        of a row, as compressed-tensors' `mxfp8-quantized` format stores them. `nvfp4`: True, or a
        ModelOpt quantization_config (its `exclude_modules` / `ignore` are honoured): packed E2M1
        (uint8, two per byte), an e4m3 `<name>_scale` per 16 elements of a row and a float32
        `<name>_scale_2`, as ModelOpt writes W4A16_NVFP4 (`mapgen.runtime.mx`). Each quantized
        weight's last dim must be divisible by the block (refused otherwise); at most one of
        `fp8`, `mxfp8` and `nvfp4`.

        Memory: the export holds at most one bucket (`bucket_bytes`: the gathered shards, the
        HF tensors in the export format and the collectives' buffers of a run of parameters; a
        parameter that alone needs more travels alone) plus one parameter's temporaries and the
        last tensor yielded: `export_bound` gives the figure. Parameters are gathered over TP
        (expert-TP) and EP in coalesced buckets; with `all_stages`, each bucket is broadcast from
        the pipeline stage that owns it, so every rank sees the whole model; without, each stage
        yields what it owns."""
        exported = self._export(bucket_bytes, all_stages, dtype, keep_float32, fp8, mxfp8, nvfp4, self.stacked)
        if not self.naming:
            yield from exported
            return
        for name, tensor in exported:
            yield self.hf_name(name), tensor

    def _export(
        self,
        bucket_bytes: int,
        all_stages: bool,
        dtype: DtypeArg,
        keep_float32: Iterable[str] | None,
        fp8: FP8Arg,
        mxfp8: QuantArg = None,
        nvfp4: QuantArg = None,
        stacked: Stacking = (),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`export` under the module's HF names; the experts of the layers `stacked` names
        written stacked (`restack`), unless quantized (one tensor each, with its scales). The arguments are checked on every rank and
        agreed on before the first collective: one refused, or passed differently by another
        rank, raises on every rank (the refusal's own type on the ranks that refused it)."""
        refused: Exception | None = None
        keep = _kept(keep_float32)
        try:
            if not self._problems:  # a model that does not match the module has no plan: agreed on below
                fmt = self._format(dtype, keep, fp8, mxfp8=mxfp8, nvfp4=nvfp4)
                buckets, _ = self._bucket_plan(bucket_bytes, all_stages, fmt)
        except (ValueError, TypeError) as exc:
            refused = exc
        same = (
            ("bucket_bytes", bucket_bytes), ("all_stages", all_stages), ("dtype", dtype), ("keep_float32", keep),
            ("fp8", fp8), ("mxfp8", mxfp8), ("nvfp4", nvfp4),
        )
        try:
            self._agree([str(refused)] if refused else [], f"cannot export with {self.module.TARGET}", same)
        except RankError:
            if refused is not None:
                raise refused from None
            raise
        copies = hf_copies_of(self.module)
        whole, placement = self._whole_target()
        with torch.no_grad():
            stream = stream_export(whole, buckets, placement, self.ctx, fmt, all_stages)
            for name, tensor in restack(stream, stacked) if stacked and not fmt.fp8 else stream:
                yield name, tensor
                if not copies:
                    continue
                # a quantized original's scales too
                scale = next((s for s in fmt.companions if name.endswith(s) and name.removesuffix(s) in fmt.fp8), "")
                for copy in copies.get(name.removesuffix(scale) if scale else name, ()):
                    yield copy + scale, tensor

    def export_bound(
        self,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        all_stages: bool = True,
        dtype: DtypeArg = None,
        keep_float32: Iterable[str] | None = None,
        fp8: FP8Arg = None,
        mxfp8: QuantArg = None,
        nvfp4: QuantArg = None,
    ) -> ExportBound:
        """The most memory `export` with these arguments holds beyond the model at any moment
        (bytes, `.total`), from its static plan; no collective."""
        fmt = self._format(dtype, keep_float32, fp8, mxfp8=mxfp8, nvfp4=nvfp4)
        return self._bucket_plan(bucket_bytes, all_stages, fmt)[1]

    def export_format(
        self,
        *,
        dtype: DtypeArg = None,
        keep_float32: Iterable[str] | None = None,
        fp8: FP8Arg = None,
        mxfp8: QuantArg = None,
        nvfp4: QuantArg = None,
    ) -> ExportFormat:
        """What `export` writes for each HF tensor with these arguments: its dtype, and which are
        quantized (`.fp8`, in `.scheme`: FP8 blocks, MXFP8 or NVFP4, with the quantization_config
        a saved config.json carries)."""
        return self._format(dtype, keep_float32, fp8, mxfp8=mxfp8, nvfp4=nvfp4)

    def export_local(
        self,
        *,
        dtype: DtypeArg = None,
        keep_float32: Iterable[str] | None = None,
        fp8: FP8Arg = None,
        mxfp8: QuantArg = None,
        nvfp4: QuantArg = None,
    ) -> Iterator[LocalPiece]:
        """Yield this rank's own pieces of the HF tensors, in HF order, without any collective:
        each a `LocalPiece` with the HF tensor's name, the expert's index for a stacked-experts
        tensor, the runs of indices it covers per dimension (`piece.runs`), the values there in
        HF layout (`data`: interleaved kinds such as qkv and gated_mlp are taken apart on this
        rank), whether every rank of its TP (expert-TP) group holds the same piece
        (`replicated`) and whether this rank is the one to take it from (`primary`: not
        replicated, or group rank 0). A consumer scatters them into its own buffers
        (`mapgen.runtime.local.scatter`). Across the ranks of one data-parallel replica, the
        primary pieces cover every HF tensor exactly once. No FP8: a 128 x 128 block may span ranks,
        so any `fp8` but None or False is refused with a message that says what to do instead;
        `dtype` as in `export`. A model that does not match the module raises here, on this rank only.

        A held Converter takes each parameter apart once: where a piece's data is a view of the
        parameter (whole and TP-split parameters exported in the model's own dtype), later calls
        yield the same pieces, which show the weights as they are at each call (a parameter
        given new storage, `param.data = ...`, is taken apart again). Copy a piece's data to
        keep it past the next optimizer step."""
        if not self._agreed and self._problems:
            raise RankError(f"cannot export with {self.module.TARGET} on this rank:\n  " + "\n  ".join(self._problems))
        if fp8 is not None and fp8 is not False:
            raise ExportFormatError(
                f"export_local(fp8={fp8!r}): export_local writes no FP8, since a 128 x 128 block may span ranks;"
                " use export(fp8=...), or quantize the assembled tensors yourself"
            )
        for scheme, value in (("mxfp8", mxfp8), ("nvfp4", nvfp4)):
            if value is not None and value is not False:
                raise ExportFormatError(
                    f"export_local({scheme}={value!r}): export_local writes no {scheme.upper()}, since a block of a "
                    f"row may span ranks (and NVFP4's per-tensor scale needs the whole tensor); use export({scheme}=...), "
                    "or quantize the assembled tensors yourself"
                )
        fmt = self._format(dtype, keep_float32, None, local=True)
        no_fp8_local(fmt)
        if self._local is None:
            self._local = local_plan(self.view, self.placement, self.ctx)
        copies = hf_copies_of(self.module)
        views = self._local_views.setdefault(id(fmt), {})  # fmt lives in self._formats
        with torch.no_grad():
            for index, entry in enumerate(self._local):
                param = self.placement.local[entry.plan.megatron_name]
                held = views.get(index)
                if held is not None and held[0] == param.data_ptr() and held[1] == param.shape:
                    pieces = held[2]
                else:
                    tensor = param.detach()
                    with gcpause.paused():
                        pieces = local_param_pieces(self.view, entry, tensor, fmt)
                    storage = tensor.untyped_storage().data_ptr()
                    if all(p.data.untyped_storage().data_ptr() == storage for p in pieces):
                        views[index] = (param.data_ptr(), param.shape, pieces)
                for piece in pieces:
                    yield self._named(piece, piece.name)
                    for copy in copies.get(piece.name, ()):
                        yield self._named(piece, copy)

    def _named(self, piece: LocalPiece, name: str) -> LocalPiece:
        """`piece` as the HF tensor `name`, in the loaded checkpoint's naming (`hf_name`)."""
        name = self.hf_name(name)
        return piece if name == piece.name else replace(piece, piece=replace(piece.piece, name=name))

    def _whole_target(self) -> tuple[Any, Placement]:
        """The whole target (a package's every part) and where each of its parameters lives: what
        a gathered export walks. The view and its placement where the rank's view is whole."""
        if self._whole is None:
            whole = package.whole(self.module)
            if whole is self.view:
                self._whole = (whole, self.placement)
            else:
                with gcpause.paused():
                    placement, _ = place(whole, self.chunks, self.ctx, self._vocab_divisor)  # agreed on the view
                self._whole = (whole, placement)
        return self._whole

    def _format(
        self,
        dtype: DtypeArg,
        keep_float32: Iterable[str] | None,
        fp8: FP8Arg,
        local: bool = False,
        *,
        mxfp8: QuantArg = None,
        nvfp4: QuantArg = None,
    ) -> ExportFormat:
        """The export format over the whole target, or (`local`) over this rank's view: a name in
        `keep_float32` outside the view is then looked for in the whole target before it is refused."""
        keep = _kept(keep_float32)
        quant = repr(fp8) if mxfp8 is None and nvfp4 is None else repr((fp8, mxfp8, nvfp4))
        key = (repr(dtype), repr(keep), quant, id(self.loaded), local)
        if key not in self._formats:
            module = self.view if local else self._whole_target()[0]
            loaded = self.loaded
            if module is not self.view and loaded is not None and self._checkpoint is not None:
                read = self._checkpoint  # the whole target's tensors, as `load` read them
                loaded = memo.once(module, ("loaded", read.serial), lambda: _loaded_format(module, read))

            def make() -> ExportFormat:
                chosen = keep
                if getattr(module, "partial", False) and isinstance(keep, tuple):
                    own = {t.name for t in module.HF_TENSORS}
                    outside = tuple(n for n in keep if n not in own)
                    if outside:  # other ranks' tensors, or unknown ones: the whole target says which
                        resolve_format(
                            package.whole(self.module), self.placement.dtype, dtype=dtype, keep_float32=outside,
                            fp8=fp8, loaded=loaded, mxfp8=mxfp8, nvfp4=nvfp4,
                        )
                    chosen = tuple(n for n in keep if n in own)
                return resolve_format(
                    module, self.placement.dtype, dtype=dtype, keep_float32=chosen, fp8=fp8, loaded=loaded,
                    mxfp8=mxfp8, nvfp4=nvfp4,
                )

            checkpoint = isinstance(dtype, str) and dtype == "checkpoint"  # depends on what `load` read
            self._formats[key] = make() if checkpoint else memo.once(module, ("format", self.placement.dtype, *key[:3]), make)
        return self._formats[key]

    def _bucket_plan(self, bucket_bytes: int, all_stages: bool, fmt: ExportFormat) -> tuple[list[BucketPlan], ExportBound]:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, not {bucket_bytes!r}")
        key = (bucket_bytes, all_stages, fmt.key)
        if key not in self._plans:
            whole, placement = self._whole_target()

            def make() -> tuple[list[BucketPlan], ExportBound]:
                return plan_buckets(whole, placement, self.ctx, fmt, bucket_bytes, all_stages)

            static = placement.key is not None and fmt.key[0] != "checkpoint"  # the same on any model
            self._plans[key] = memo.once(whole, ("buckets", placement.key, placement.dtype, *key), make) if static else make()
        return self._plans[key]


def _rank_view(module: Module, chunks: Any, ctx: ParallelContext) -> Any:
    """What a Converter walks on this rank: a one-file module as it is; of a target package, the
    parts that hold this rank's layers and experts (`package.rank_view`), or the whole package
    where the chunks do not say which layers they hold (`place` then reports why)."""
    if not isinstance(module, ModuleType) or not package.is_package(module):
        return module
    try:
        models = [_unwrap(c) for c in chunks]
        layers = layer_owners(models[0].config, ctx)
        per_rank = experts_per_rank(module.DIMS.num_moe_experts or 0, ctx) if module.DIMS.num_moe_experts else 0
    except Exception:  # noqa: BLE001 - `place` finds and words the same problem on the whole view
        return package.whole_view(module)
    mine = [layer for layer, (owner, _) in layers.items() if owner.pp_rank == ctx.pp.rank]
    first = ctx.ep.rank * per_rank
    return package.rank_view(module, mine, (first, first + per_rank) if per_rank else (0, 1 << 62))


def _loaded_format(module: Module, checkpoint: HFCheckpoint) -> LoadedFormat:
    """How `checkpoint` stores the module's HF tensors."""
    dtypes: dict[str, torch.dtype] = {}
    quantized: set[str] = set()
    for tensor in module.HF_TENSORS:
        if tensor.name not in checkpoint:
            continue
        stored = DTYPES.get(checkpoint.dtype(tensor.name))
        if checkpoint.dtype(tensor.name) == "MXFP4":
            # MXFP4 goes back as bfloat16, which holds every MXFP4 value exactly (e2m1 codes
            # times powers of two); mapgen writes no MXFP4
            stored = torch.bfloat16
        if stored is not None:
            dtypes[tensor.name] = stored
        if checkpoint.quantized(tensor.name) and checkpoint.dtype(tensor.name) != "MXFP4":
            quantized.add(tensor.name)
    config = checkpoint.config
    quantization = config.get("quantization_config")
    return LoadedFormat(
        dtypes,
        frozenset(quantized),
        checkpoint.block_size if quantized else None,
        dict(quantization) if isinstance(quantization, dict) and quantized else None,
        config_dtype(config),
    )


def _import(module: Module, name: str, ctx: ParallelContext, load: Loader, out: torch.Tensor, vocab: bool) -> None:
    """Parameter `name`'s import into `out`. A vocabulary parameter's shard is this rank's block
    of rows of the padded vocabulary (zeros past the HF rows): its import function, a row split,
    is given that block and a TP group of one."""
    if not vocab:
        module.IMPORTS[name](ctx, load, out=out)
        return
    rows = out.shape[0]
    first = ctx.tp.rank * rows

    def load_block(hf_name: str) -> torch.Tensor:
        return padded_block(load(hf_name), first, rows)

    module.IMPORTS[name](replace(ctx, tp=Group()), load_block, out=out)


def load_hf_checkpoint(
    module: Module,
    chunks: list[Any],
    hf_dir: str | Path,
    ctx: ParallelContext | None = None,
    *,
    make_vocab_size_divisible_by: int = 1,
) -> int:
    """`Converter(module, chunks, ctx, ...).load(hf_dir)`."""
    return Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by).load(hf_dir)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _kept(keep_float32: Iterable[str] | None) -> Iterable[str] | None:
    """`keep_float32` as export, its format and its agreement take it: None, a string (which the
    format refuses), or the names sorted, so every rank and every call see one value."""
    if keep_float32 is None or isinstance(keep_float32, str):
        return keep_float32
    return tuple(sorted(keep_float32, key=str))


def hf_namings(module: Module) -> tuple[tuple[str, str], ...]:
    """The module's HF_NAMINGS as (its prefix, the other naming's prefix) pairs: () for a module
    whose checkpoints name their tensors one way only."""
    return tuple(getattr(module, "HF_NAMINGS", {}).items())


def open_checkpoint(module: Module, folder: str | Path) -> HFCheckpoint:
    """The HF checkpoint in `folder` as `module` reads it: under the module's names whichever of
    its HF_NAMINGS the files use, and stacked experts served one at a time to a module of
    per-expert names (Qwen3.5-MoE's published checkpoint)."""
    unstack = per_expert_names(t.name for t in module.HF_TENSORS)
    return HFCheckpoint(folder, namings=hf_namings(module), unstack=unstack)


def hf_copies_of(module: Module) -> dict[str, tuple[str, ...]]:
    """original HF name -> the HF tensors that repeat it (the module's HF_COPIES, which a
    module without multi-token prediction does not have)."""
    found: dict[str, tuple[str, ...]] = {}
    for copy, original in getattr(module, "HF_COPIES", {}).items():
        found[original] = found.get(original, ()) + (copy,)
    return found


def copy_problems(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """Each HF copy (HF_COPIES) bit for bit equal to its original, checked by the ranks that
    import the original (megatron-core holds one tensor for both, so a copy that differs could
    not be written back): a copy that differs, or is stored in another dtype, is a problem
    naming both tensors and their files."""
    copies = hf_copies_of(module)
    if not copies:
        return []
    plans = {p.megatron_name: p for p in module.PARAMS}
    names = set(placement.local) | {module.TIED[n] for n in placement.tied}
    read = {stacked_slice(h)[0] for n in names for h in plans[n].hf_names}
    problems: list[str] = []
    for original in sorted(read & set(copies)):
        for copy in copies[original]:
            a, b = checkpoint.raw(original), checkpoint.raw(copy)
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                problems.append(
                    f"tensor '{copy}' ({checkpoint.file(copy)}) differs from '{original}' ({checkpoint.file(original)}), "
                    f"which it repeats: megatron-core holds one tensor for both, so {module.TARGET} cannot load them"
                )
    return problems


def checkpoint_problems(module: Module, checkpoint: HFCheckpoint) -> list[str]:
    """The checkpoint against the module's HF table, on any rank: every tensor present with its
    shape, none the module does not map, every file whole (see `HFCheckpoint.integrity_problems`)."""
    problems: list[str] = []
    missing = [t.name for t in module.HF_TENSORS if t.name not in checkpoint]
    problem = no_mtp_problem(module, missing)
    if problem is not None:
        problems.append(problem)
        missing = []
    problems += [f"missing tensor '{name}'" for name in missing]
    for tensor in module.HF_TENSORS:
        if tensor.name not in checkpoint:
            continue
        shape = checkpoint.shape(tensor.name)
        if shape != tensor.shape:
            problems.append(
                f"tensor '{tensor.name}' has shape {list(shape)}, {module.TARGET} expects {list(tensor.shape)}"
                f" ({checkpoint.file(tensor.name)})"
            )
    ignored = tuple(getattr(module, "IGNORED_HF", {}))
    known = {t.name for t in module.HF_TENSORS}
    if getattr(module, "partial", False):
        # a rank's view of a package: every rank checks its own tensors are there (above), and
        # together they cover the target, so a checkpoint with no more tensors than the target
        # maps has none it does not; with more, the whole target's table names them
        if sum(1 for n in checkpoint.names() if not n.startswith(ignored)) <= getattr(module, "HF_COUNT"):
            return problems + checkpoint.integrity_problems()
        known = {t.name for t in package.whole(getattr(module, "package")).HF_TENSORS}
    unknown = sorted(n for n in checkpoint.names() if n not in known and not n.startswith(ignored))
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) in the checkpoint that {module.TARGET} does not map "
            f"(a checkpoint of another model?): {', '.join(unknown[:10])}"
        )
    problems += checkpoint.integrity_problems()
    return problems


def no_mtp_problem(module: Module, missing: list[str]) -> str | None:
    """One problem for a checkpoint that lacks every multi-token-prediction tensor of a module
    with MTP layers (transformers drops them when it loads, so a model it saved has none), and
    nothing else: the config field that builds the module without them. None otherwise."""
    layers = getattr(getattr(module, "DIMS", None), "mtp_num_layers", 0) or 0
    if not layers or not missing:
        return None
    main = {stacked_slice(h)[0] for p in module.PARAMS if not p.megatron_name.startswith("mtp.") for h in p.hf_names}
    mtp = [t.name for t in module.HF_TENSORS if t.name not in main]
    if not mtp or sorted(missing) != sorted(mtp):
        return None
    return (
        f"the checkpoint has none of the {len(mtp)} tensors of {module.TARGET}'s {layers} multi-token-prediction "
        f"(MTP) layer(s), such as '{mtp[0]}': a model saved by transformers drops them. Rebuild the module from a "
        f"config.json with \"num_nextn_predict_layers\": 0 (the module was built with {layers}) to map this checkpoint "
        "without MTP, or load the published checkpoint, which has them"
    )


def _checked(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """`_checkpoint_problems`, found once per process for the same checkpoint headers, file sizes,
    folder, layout and model dtypes (all it depends on): a copy of the list."""
    if placement.key is None:
        return _checkpoint_problems(module, checkpoint, placement)
    dtypes = tuple(t.dtype for t in placement.local.values())
    key = ("checked", checkpoint.serial, checkpoint.sizes, str(checkpoint.folder), placement.key, dtypes)
    return list(memo.once(module, key, lambda: tuple(_checkpoint_problems(module, checkpoint, placement))))


def _checkpoint_problems(module: Module, checkpoint: HFCheckpoint, placement: Placement) -> list[str]:
    """`checkpoint_problems`, and the dtype of each tensor this rank loads against the tensor it
    loads into: the same dtype, or one that converts to it exactly (bfloat16 or float16 into a
    float32 model: a checkpoint published in bfloat16, trained in float32). An FP8
    block-quantized weight is dequantized, so any model dtype; a tensor the HF model keeps in
    float32 (`HFTensorPlan.float32`, transformers' `_keep_in_fp32_modules_strict`) may be
    float32 whatever the model's dtype, as transformers and mapgen's own export write it."""
    problems = checkpoint_problems(module, checkpoint)
    plans = {p.megatron_name: p for p in module.PARAMS}
    into = {stacked_slice(n)[0]: t.dtype for name, t in placement.local.items() for n in plans[name].hf_names}
    for tensor in module.HF_TENSORS:
        expected = into.get(tensor.name)
        if expected is None or tensor.name not in checkpoint or checkpoint.quantized(tensor.name):
            continue
        stored = checkpoint.dtype(tensor.name)
        if stored == "F32" and tensor.float32:
            continue
        if expected == torch.float32 and stored in ("BF16", "F16"):
            continue
        if stored != _SAFETENSORS_DTYPES.get(expected, stored):
            model_dtype = str(expected).removeprefix("torch.")
            problems.append(f"tensor '{tensor.name}' is {stored}, the model is {model_dtype} ({checkpoint.file(tensor.name)})")
    return problems


def export_hf_tensors(
    module: Module,
    chunks: list[Any],
    ctx: ParallelContext | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    all_stages: bool = True,
    make_vocab_size_divisible_by: int = 1,
    dtype: DtypeArg = None,
    keep_float32: Iterable[str] | None = None,
    fp8: FP8Arg = None,
    mxfp8: QuantArg = None,
    nvfp4: QuantArg = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`Converter(module, chunks, ctx, ...).export(...)`: see `Converter.export`."""
    converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    return converter.export(
        bucket_bytes=bucket_bytes, all_stages=all_stages, dtype=dtype, keep_float32=keep_float32, fp8=fp8,
        mxfp8=mxfp8, nvfp4=nvfp4,
    )


def save_hf_checkpoint(
    module: Module,
    chunks: list[Any],
    out_dir: str | Path,
    hf_config: dict[str, Any],
    ctx: ParallelContext | None = None,
    *,
    max_shard_bytes: int = 2 * 2**30,
    writer_rank: int = 0,
    make_vocab_size_divisible_by: int = 1,
    overwrite: bool = False,
    dtype: DtypeArg = None,
    keep_float32: Iterable[str] | None = None,
    fp8: FP8Arg = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    naming: tuple[tuple[str, str], ...] = (),
    mxfp8: QuantArg = None,
    nvfp4: QuantArg = None,
    stacked_experts: Stacking = (),
) -> None:
    """Write an HF checkpoint directory (sharded safetensors, index, config.json) atomically.

    `naming`: the other namings of the module's HF_NAMINGS to write, as (its prefix, the other
    prefix) pairs (a Converter's `naming` after it loaded a checkpoint that uses them; () writes
    the module's own names). `stacked_experts`: the layers whose experts to write stacked
    (`gate_up_proj`, `down_proj`), for a module that maps them one tensor each (a Converter's
    `stacked` after it loaded a checkpoint that stores them so: Qwen3.5-MoE's published one);
    not with fp8, mxfp8 or nvfp4.

    `dtype`, `keep_float32` and `fp8` as in `Converter.export`, but `dtype="checkpoint"` means
    the checkpoint `hf_config` describes: its declared dtype (`dtype` / `torch_dtype`; tensors
    the HF model keeps in float32 stay float32) and, where its `quantization_config` says fp8,
    DeepSeek-V3's FP8 format in its block size. The config.json written says what the files
    hold: the export dtype (where the config names one) and, with FP8, the quantization_config
    (the given one's fields kept); without FP8, an fp8 quantization_config is left out, the
    weights being written dequantized. `mxfp8` and `nvfp4` as in `Converter.export`: config.json
    then carries the compressed-tensors MXFP8 or the ModelOpt W4A16_NVFP4 quantization_config
    (its `ignore` naming every unquantized 2-d weight's module), and an NVFP4 save also writes
    ModelOpt's `hf_quant_config.json`.

    All ranks take part in the export; global rank `writer_rank` writes into a hidden temporary
    folder beside `out_dir` (`.NAME.partial-HOST-PID-XXXX`) and renames it into place only once
    every file is complete. Before any collective the writer checks the target (its parent
    folder exists and takes a new folder, the target does not exist unless `overwrite`, the
    config is a JSON object) and every rank agrees on the outcome; each shard file's write is
    agreed on by every rank as soon as it is written, so any failure of the writer (an OSError,
    safetensors' SafetensorError on a full disk, anything else) stops every rank at the same
    point, none left in a collective, each raising the same report naming the rank and the file;
    the partial folder is removed. A save killed outright (SIGKILL, SIGTERM, a crash) cannot
    clean up: its partial folder is removed by the next save to the same target on the same
    host (`remove_stale_partials`). With `overwrite`, an existing target folder is replaced by
    the new one once that is complete."""
    ctx = ctx or ParallelContext.single()
    check_module(module, "save_hf_checkpoint")
    out = Path(out_dir)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    # the arguments: each checked on every rank, and every rank's agreed on (every rank passes
    # the same) in the one agreement before any collective; a refusal raises ValueError there
    refused: list[str] = []
    if isinstance(writer_rank, bool) or not isinstance(writer_rank, int) or not 0 <= writer_rank < world:
        refused.append(f"writer_rank {writer_rank!r} is not a rank of the {world} processes")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        refused.append(f"max_shard_bytes must be a positive integer, not {max_shard_bytes!r}")
    keep = _kept(keep_float32)
    same = (
        ("writer_rank", writer_rank), ("max_shard_bytes", max_shard_bytes), ("overwrite", overwrite),
        ("bucket_bytes", bucket_bytes), ("dtype", dtype), ("keep_float32", keep),
        ("fp8", fp8), ("naming", naming), ("mxfp8", mxfp8), ("nvfp4", nvfp4), ("stacked_experts", stacked_experts),
    )
    refused += stacking_problems(stacked_experts, (t.name for t in module.HF_TENSORS))
    what = f"cannot save {module.TARGET} to {out}"
    staging: Path | None = None
    problems: list[str] = []
    if rank == writer_rank and not refused:
        try:
            staging = _staging_folder(out, hf_config, overwrite)
        except Exception as exc:  # noqa: BLE001 - agreed on by every rank just below
            problems.append(_describe(exc))
    try:
        converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        fmt: ExportFormat | None = None
        try:
            unknown = set(naming) - set(hf_namings(module))
            if unknown:
                raise ValueError(f"naming {sorted(unknown)} is not among {module.TARGET}'s HF_NAMINGS")
            converter.naming = tuple(naming)
            if isinstance(dtype, str) and dtype == "checkpoint":
                if keep is not None or fp8 is not None or mxfp8 is not None or nvfp4 is not None:
                    raise ValueError(
                        "dtype='checkpoint' takes the config's own dtype and quantization: no fp8, mxfp8, nvfp4 or keep_float32"
                    )
                quantization = hf_config.get("quantization_config") if isinstance(hf_config, dict) else None
                declared = config_dtype(hf_config) if isinstance(hf_config, dict) else None
                fp8 = quantization if isinstance(quantization, dict) and quantization.get("quant_method") == "fp8" else None
                dtype = declared
            if not converter._problems:  # else agreed on below: a model not matching the module has no format
                fmt = converter.export_format(dtype=dtype, keep_float32=keep, fp8=fp8, mxfp8=mxfp8, nvfp4=nvfp4)
                if stacked_experts and fmt.fp8:
                    raise ValueError(f"stacked_experts with {fmt.scheme}: quantized experts are written one tensor each")
        except (ValueError, TypeError) as exc:
            refused.append(str(exc))
        try:  # the target, the model, the layout and the arguments: one agreement
            converter._agree(problems + [f"save_hf_checkpoint: {r}" for r in refused], what, same)
        except RankError:
            if refused:
                raise ValueError(f"save_hf_checkpoint: {refused[0]}") from None
            raise
        assert fmt is not None
        sizes = restacked_sizes(_written_sizes(module, fmt), stacked_experts) if stacked_experts else _written_sizes(module, fmt)
        shards = _shard_plan(sizes, max_shard_bytes, _companions(module, fmt))
        remaining = {f: sum(1 for v in shards.values() if v == f) for f in set(shards.values())}
        pending: dict[str, dict[str, torch.Tensor]] = {f: {} for f in remaining}
        failed: dict[str, str] = {}  # file -> what went wrong writing it (the writer's)
        # every rank sees every tensor in the same order (all_stages), so every rank knows when
        # a file is complete: the writer writes it, then all agree on how that went
        exported = converter._export(bucket_bytes, True, dtype, keep, fp8, mxfp8, nvfp4, stacked_experts)  # the module's names
        copies = set(getattr(module, "HF_COPIES", {}))
        for name, tensor in exported:
            file = shards[name]
            if staging is not None and file not in failed:
                try:  # an HF copy is its original's tensor, which safetensors will not write twice
                    copied = tensor.clone() if _original(name, fmt) in copies else tensor.contiguous()
                    pending[file][converter.hf_name(name)] = copied
                except Exception as exc:  # noqa: BLE001 - agreed on below
                    failed[file] = f"{out / file}: {_describe(exc)}"
            remaining[file] -= 1
            if remaining[file]:
                continue
            tensors = pending.pop(file)
            if staging is not None and file not in failed:
                try:
                    save_file(tensors, str(staging / file), metadata={"format": "pt"})
                except Exception as exc:  # noqa: BLE001 - agreed on below
                    failed[file] = f"writing {out / file} (as {staging / file}): {_describe(exc)}"
            del tensors
            agree_or_raise([failed[file]] if file in failed else [], what)
        final: list[str] = []
        if staging is not None:
            try:
                weight_map = {converter.hf_name(name): file for name, file in shards.items()}
                index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
                written = _written_config(hf_config, fmt, dtype)
                (staging / "config.json").write_text(json.dumps(written, indent=2, allow_nan=False) + "\n")
                modelopt = mx.hf_quant_config(fmt.quantization_config or {})
                if modelopt is not None:  # ModelOpt's own file beside config.json
                    (staging / "hf_quant_config.json").write_text(json.dumps(modelopt, indent=2) + "\n")
                share_tree(staging)  # safetensors writes its files private; a checkpoint is read by others
                _move_into_place(staging, out, overwrite)
                staging = None
            except Exception as exc:  # noqa: BLE001 - agreed on below
                final.append(f"finishing {out}: {_describe(exc)}")
        agree_or_raise(final, what)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


INDEX_FILE = "model.safetensors.index.json"
_PARTIAL = "partial"  # .NAME.partial-HOST-PID-XXXXXXXX: a save in progress (or killed)
_REPLACED = "replaced"  # .NAME.replaced-HOST-PID-XXXXXXXX: the folder an overwrite replaces


def _describe(exc: BaseException) -> str:
    """An exception in a line: its type (SafetensorError, PermissionError, ...) and message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def _hidden(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{host_tag()}-{os.getpid()}-"


def _staging_folder(out: Path, hf_config: object, overwrite: bool) -> Path:
    """The writer's checks of the target, then its new hidden staging folder beside it."""
    if not isinstance(hf_config, dict):
        raise ValueError(f"hf_config must be a dict (config.json's fields), not a {type(hf_config).__name__}")
    try:
        json.dumps(hf_config, allow_nan=False)  # NaN and Infinity are not JSON
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hf_config cannot be written as config.json: {exc}") from None
    parent = out.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"parent folder {parent} does not exist" if not parent.exists() else f"{parent} is not a folder")
    if out.is_symlink() or out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (overwrite=True replaces it)")
        if out.is_symlink() or not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; overwrite replaces folders only")
    remove_stale_partials(out)
    try:
        return temporary_folder(parent, _hidden(out, _PARTIAL))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create a folder in {parent}: {exc.strerror}") from None


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    if not (out.is_symlink() or out.exists()):
        os.rename(staging, out)  # atomic: the complete checkpoint appears at once
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared while saving; the new checkpoint is not moved there")
    aside = temporary_folder(out.parent, _hidden(out, _REPLACED))
    os.rename(out, aside / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside / out.name, out)  # put the old checkpoint back
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_partials(out_dir: str | Path) -> list[Path]:
    """Remove what saves to `out_dir` left behind when killed before they could clean up
    (SIGKILL, SIGTERM, a crash): hidden partial folders `.NAME.partial-HOST-PID-*` beside
    `out_dir` that a process of this host made and that no longer runs (and the copies an
    overwrite had set aside, `.NAME.replaced-HOST-PID-*`, once the new checkpoint stands in
    `out_dir`). A folder of a process that still runs, or of another host, is left alone.
    `save_hf_checkpoint` calls this before it writes; returns what was removed."""
    out = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({_PARTIAL}|{_REPLACED})-(.+)-(\d+)-[^-]*$")
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or match.group(2) != host_tag() or process_alive(int(match.group(3))):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if match.group(1) == _REPLACED and not out.is_dir():
            continue  # killed between the two renames of an overwrite: the old checkpoint is all there is
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def _written_sizes(module: Module, fmt: ExportFormat) -> dict[str, int]:
    """Bytes of every tensor a save writes, in HF order (scale companions after their weight)."""
    sizes: dict[str, int] = {}
    for tensor in module.HF_TENSORS:
        for name, shape, dtype in fmt.outputs(tensor.name, tuple(tensor.shape)):
            sizes[name] = int(torch.Size(shape).numel()) * dtype.itemsize
    return sizes


def _original(name: str, fmt: ExportFormat) -> str:
    """The weight a scale companion belongs to; any other name as it is."""
    for suffix in fmt.companions:
        if name.endswith(suffix) and name.removesuffix(suffix) in fmt.fp8:
            return name.removesuffix(suffix)
    return name


def _companions(module: Module, fmt: ExportFormat) -> frozenset[str]:
    """The scale companions a save writes (each goes in its weight's file)."""
    return frozenset(
        name for tensor in module.HF_TENSORS if tensor.name in fmt.fp8
        for name, _, _ in fmt.outputs(tensor.name, tuple(tensor.shape))[1:]
    )


def _written_config(hf_config: dict[str, Any], fmt: ExportFormat, dtype: DtypeArg) -> dict[str, Any]:
    """config.json as saved: the export dtype where the config declares one, the FP8
    quantization_config with FP8 weights, none claiming FP8 without them."""
    written = dict(hf_config)
    if fmt.quantization_config is not None:
        written["quantization_config"] = fmt.quantization_config
    elif isinstance(written.get("quantization_config"), dict) and written["quantization_config"].get("quant_method") in (
        "fp8",
        "mxfp4",  # MXFP4 is read (dequantized), never written: the tensors saved are not MXFP4
        "compressed-tensors",  # written only with the MXFP8 weights it describes
        "modelopt",  # written only with the NVFP4 weights it describes
    ):
        del written["quantization_config"]
    if dtype is not None and not (isinstance(dtype, str) and dtype == "checkpoint"):
        name = str(as_dtype(dtype, "dtype")).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in written:
                written[key] = name
    return written


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int, companions: frozenset[str] | None = None) -> dict[str, str]:
    """Tensor name -> file, filling files in order up to max_shard_bytes; a scale companion
    (`companions`; default: FP8's `<weight>_scale_inv`) goes in its weight's file."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if companions is not None:
            companion = name in companions
        else:
            companion = name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in sizes
        if groups[-1] and size + nbytes > max_shard_bytes and not companion:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    total = len(groups)
    return {
        name: f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        for i, names in enumerate(groups)
        for name in names
    }
