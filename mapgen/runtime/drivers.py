"""The Converter: an HF checkpoint into this rank's Megatron model chunks (`load`), the chunks
out as HF tensors (`export`, gathered; `export_local`, without a collective), decided once per
module, chunks and layout.

A generated module is the plan; these only walk it. Where each parameter lives is `placing.py`'s,
what a checkpoint must be `checkpoint_checks.py`'s, the buckets `buckets.py`'s and their
collectives `sync.py`'s; writing a checkpoint folder is `save.py`'s. The only collectives are the
agreements before any weight moves and the tensor gathers and broadcasts themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mapgen.common import gcpause
from mapgen.runtime import fileread, memo, package
from mapgen.runtime.buckets import BucketPlan, ExportBound, plan_buckets
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.hf_names import named_as
from mapgen.runtime.checkpoint_checks import load_problems, loaded_format, copy_problems, hf_copies_of, open_checkpoint
from mapgen.runtime.collectives import RankError, agree_or_raise
from mapgen.runtime.context import Group, ParallelContext
from mapgen.runtime.formats import (
    DtypeArg,
    ExportFormat,
    ExportFormatError,
    FP8Arg,
    LoadedFormat,
    QuantArg,
    resolve_format,
)
from mapgen.runtime.local import LocalParam, LocalPiece, local_param_pieces, local_plan, no_fp8_local
from mapgen.runtime.module_check import ModuleArgumentError, check_module
from mapgen.runtime.placement import Module, Placement
from mapgen.runtime.placing import chunks_view, module_layout_problems, place
from mapgen.runtime.plan import Loader
from mapgen.runtime.restack import Stacking, restack, restack_bound
from mapgen.runtime.sync import stream_export
from mapgen.runtime.vocab import padded_block

DEFAULT_BUCKET_BYTES = 32 * 2**20  # at real widths on gloo, 32 MiB buckets export faster than 256 (docs/benchmarks.md)


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
            self.view = chunks_view(module, chunks, self.ctx)
            self.placement, found = place(self.view, chunks, self.ctx, make_vocab_size_divisible_by)
        self._whole: tuple[Any, Placement] | None = None  # the whole target and its placement, for export
        self._problems = module_layout_problems(module, self.ctx) + found
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
            problems += load_problems(module, checkpoint, placement)
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
        self.loaded = memo.once(view, ("loaded", checkpoint.serial), lambda: loaded_format(view, checkpoint))
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
        keep = kept_float32(keep_float32)
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
        (bytes, `.total`), from its static plan; no collective. After loading a checkpoint that
        stores experts stacked (`stacked`), `.stacking` counts the stacked tensors of the largest
        such layer, which export assembles before it yields them."""
        fmt = self._format(dtype, keep_float32, fp8, mxfp8=mxfp8, nvfp4=nvfp4)
        bound = self._bucket_plan(bucket_bytes, all_stages, fmt)[1]
        if not self.stacked or fmt.fp8:  # a quantized export writes experts one tensor each
            return bound
        whole = self._whole_target()[0]
        sizes = {t.name: math.prod(t.shape) * fmt.dtypes[t.name].itemsize for t in whole.HF_TENSORS if t.name in fmt.dtypes}
        return replace(bound, stacking=bound.stacking + restack_bound(sizes, self.stacked))

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
        keep = kept_float32(keep_float32)
        quant = repr(fp8) if mxfp8 is None and nvfp4 is None else repr((fp8, mxfp8, nvfp4))
        key = (repr(dtype), repr(keep), quant, id(self.loaded), local)
        if key not in self._formats:
            module = self.view if local else self._whole_target()[0]
            loaded = self.loaded
            if module is not self.view and loaded is not None and self._checkpoint is not None:
                read = self._checkpoint  # the whole target's tensors, as `load` read them
                loaded = memo.once(module, ("loaded", read.serial), lambda: loaded_format(module, read))

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


def kept_float32(keep_float32: Iterable[str] | None) -> Iterable[str] | None:
    """`keep_float32` as export, its format and its agreement take it: None, a string (which the
    format refuses), or the names sorted, so every rank and every call see one value."""
    if keep_float32 is None or isinstance(keep_float32, str):
        return keep_float32
    return tuple(sorted(keep_float32, key=str))


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


