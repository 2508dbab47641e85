"""Hand weights to an inference engine: the trained model's HF tensors in the form vLLM's and
SGLang's `model.load_weights(weights: Iterable[tuple[str, torch.Tensor]])` take.

Two ways, for the two ways an RL job moves weights:

* `engine_weights(converter, feed=...)`: the whole model as (HF name, full tensor), gathered by
  the training job's own collectives (`Converter.export`) and handed, on the ranks that talk to
  the engine, straight to its `load_weights`. Every training rank takes part.
* `PieceReceiver`: each training rank sends its own pieces (`Converter.export_local`: no
  collective) over the consumer's own transport; the receiver assembles them into full HF
  tensors, or directly into one engine rank's tensor-parallel shard, counting every element
  written so that it knows exactly what is still missing.

`vllm_shard_dim` gives the dims vLLM's and SGLang's tensor-parallel layers split the usual
Llama-style HF tensors along, for a `PieceReceiver` or a test engine.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch

from mapgen.common.errors import MapgenError
from mapgen.runtime.drivers import Converter
from mapgen.runtime.shardmap import HFPiece
from mapgen.runtime.local import LocalPiece

__all__ = [
    "EngineWeights",
    "EngineWeightsError",
    "PieceReceiver",
    "PieceReceiverError",
    "ShardDims",
    "engine_weights",
    "vllm_shard_dim",
]


class EngineWeightsError(MapgenError, RuntimeError):
    """An `EngineWeights` export left unfinished on this rank, or used after it was closed."""


class PieceReceiverError(MapgenError, ValueError):
    """A piece that does not fit the receiver, a shard the receiver cannot make, or tensors
    asked for before every element of them was written."""


# --- the whole model, gathered, into an engine's load_weights ---------------------------------


_State = Literal["ready", "running", "finished", "failed", "closed"]


class EngineWeights:
    """What `engine_weights` returns: a one-pass iterator of (HF name, full tensor) on a feeding
    rank, an iterator that yields nothing (but runs every collective) on the others. See
    `engine_weights` for the rule every rank must follow.

    `handed`: tensors handed to the consumer on this rank; `drained`: tensors the export made
    that were not handed out (all of them where `feed` is False, the rest of the export where a
    feeding rank's consumer stopped early); `last`: the name of the last tensor the export made
    here. `finished`: the export ran to its end on this rank (every one of its collectives)."""

    def __init__(self, export: Iterator[tuple[str, torch.Tensor]], *, feed: bool) -> None:
        self.feed = feed
        self.handed = 0
        self.drained = 0
        self.last: str | None = None
        self._last_handed: str | None = None
        self._export = export
        self._state: _State = "ready"

    @property
    def started(self) -> bool:
        return self._state != "ready"

    @property
    def finished(self) -> bool:
        return self._state == "finished"

    def __iter__(self) -> EngineWeights:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        self._check_open()
        if self._state in ("finished", "failed"):
            raise StopIteration
        if not self.feed:  # runs every collective, hands out nothing
            self.drain()
            raise StopIteration
        self._state = "running"
        try:
            name, tensor = next(self._export)
        except StopIteration:
            self._state = "finished"
            raise
        except BaseException:
            self._state = "failed"  # the export itself raised (a refused format, a failed collective)
            raise
        self.handed += 1
        self.last = self._last_handed = name
        return name, tensor

    def drain(self) -> int:
        """Run the rest of the export to its end without handing anything out; returns how many
        tensors that was (0 once finished). On a feeding rank whose consumer stopped early, this
        lets the other ranks finish the export's collectives; the engine lacks those tensors."""
        self._check_open()
        if self._state in ("finished", "failed"):
            return 0
        self._state = "running"
        count = 0
        try:
            for name, tensor in self._export:
                count += 1
                self.last = name
                del tensor
        except BaseException:
            self._state = "failed"
            raise
        finally:
            self.drained += count
        self._state = "finished"
        return count

    def close(self) -> None:
        """End the export on this rank: nothing to do once it finished, and nothing runs if it
        never started here. An export stopped part way is refused with EngineWeightsError
        naming the problem (the other ranks are waiting in one of its collectives) and left
        open, so that `drain()` can still finish it."""
        if self._state == "running":
            raise EngineWeightsError(self._unfinished())
        if self._state == "ready":
            self._state = "closed"
            close = getattr(self._export, "close", None)  # a generator's
            if close is not None:
                close()

    def __enter__(self) -> EngineWeights:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Leaving the `with` block finishes the export on this rank whatever happened inside
        (`drain`), so the other ranks are not left waiting in its collectives; then, on a
        feeding rank whose consumer did not take every tensor, the block's own exception goes
        on with a note saying so, or EngineWeightsError is raised if there was none."""
        if self._state not in ("ready", "running"):
            return
        handed, last = self.handed, self._last_handed
        drained = self.drain()
        if not self.feed or not drained:
            return
        what = (
            f"mapgen.engine_weights: the engine stopped after taking {handed} tensor(s)"
            + (f" (the last {last!r})" if last else "")
            + f"; the {drained} left were drained so that the other ranks finished the export, "
            "and the engine does not have them"
        )
        if error is not None:
            error.add_note(what)
            return
        raise EngineWeightsError(what)

    def _check_open(self) -> None:
        if self._state == "closed":
            raise EngineWeightsError("mapgen.engine_weights: this export was closed; start a new one (engine_weights again, on every rank)")

    def _unfinished(self) -> str:
        return (
            f"mapgen.engine_weights: close() on an export stopped after {self.handed + self.drained} tensor(s) "
            f"(the last {self.last!r}), before its end: the other ranks of the training job are waiting in one "
            "of its collectives (a tensor-parallel or expert-parallel gather, or the pipeline broadcast of the "
            "next bucket) and will wait until the process group's timeout. Every rank must consume the export "
            "to the end; it is left open: call .drain() on this rank to finish it (the engine then lacks the "
            "rest), or end the job"
        )


def engine_weights(conv: Converter, *, feed: bool, **export_kwargs: Any) -> EngineWeights:
    """The whole model as (HF name, full tensor), in exactly the form vLLM's and SGLang's
    `model.load_weights(weights: Iterable[tuple[str, torch.Tensor]])` take.

    The rule: **every rank of the training job calls this at the same point and consumes the
    result to the end.** The export's collectives (the tensor- and expert-parallel gathers,
    the broadcast of each bucket from the pipeline stage that owns it) run while it is
    iterated. On the ranks that talk to the engine (`feed=True`) pass it to the engine's
    `load_weights`; on the others (`feed=False`) call `.drain()`, or iterate it: it yields
    nothing there but still runs every collective. A `with` block does the draining for you::

        with mapgen.engine_weights(conv, feed=is_engine_rank, dtype=torch.bfloat16) as weights:
            if is_engine_rank:
                engine_model.load_weights(weights)  # vLLM's / SGLang's model: copies each tensor in
            else:
                weights.drain()  # the same collectives, hands out nothing

    `export_kwargs` go to `Converter.export` (`dtype`, `keep_float32`, `fp8`, `mxfp8`, `nvfp4`,
    `bucket_bytes`, `all_stages`): pass the engine's dtype so that its copy needs no cast;
    `fp8=True` yields each quantized weight followed by its `<name>_scale_inv`, as an FP8
    DeepSeek-V3 checkpoint's files hold them; `mxfp8=True` each weight (e4m3) followed by its
    uint8 `<name>_scale`, as a compressed-tensors MXFP8 checkpoint holds them; `nvfp4=True`
    each weight (packed E2M1, uint8) followed by its `<name>_scale` and `<name>_scale_2`, as a
    ModelOpt NVFP4 checkpoint holds them (the engine must have been started in that format). With `all_stages=False` a rank sees only its own pipeline
    stage's tensors (for an engine fed from every stage). At EP > 1 experts come bucket by
    bucket, not strictly in HF order; load_weights takes any order.

    **The engine must copy what it keeps, and never write into a tensor it is given.** A
    yielded tensor may be a view of the model's own parameter (at TP 1, exported in the model's
    dtype, most are): the next optimizer step changes it in place. Others view the export's bucket buffers, whose memory a kept reference holds. vLLM's
    and SGLang's `load_weights` copy each tensor into the engine's own parameters (their
    `weight_loader`s: `param.data.copy_(...)`) and keep none: nothing more is needed for them.

    **If the consumer stops early** (load_weights raises on a name it does not know, or breaks
    out), this rank stops inside the export while the other ranks wait in its next collective:
    without care they hang until the process group's timeout. Inside a `with` block, leaving the
    block drains the rest on this rank, so the other ranks finish the export; the consumer's
    exception then goes on with a note saying how many tensors the engine took, and if there
    was no exception EngineWeightsError says the engine stopped early. Without `with`, call
    `.drain()` in a `finally`; `.close()` on an export stopped part way raises EngineWeightsError
    naming the problem and leaves the export open for `.drain()`. Nothing tells the other
    ranks that this one's engine failed: they finish the export normally, and what to do next
    is the caller's (mapgen adds no protocol beyond the export's own collectives). An error of
    the export itself (a refused format, a failed collective) is raised on the rank where it
    happened and ends the export there; arguments the export refuses are refused on every rank
    alike before any tensor moves."""
    if not isinstance(conv, Converter):
        raise TypeError(f"engine_weights: conv must be a mapgen Converter (mapgen.converter(module, chunks)), not a {type(conv).__name__}")
    if not isinstance(feed, bool):
        raise TypeError(f"engine_weights: feed must be True (this rank feeds the engine) or False, not {feed!r}")
    return EngineWeights(conv.export(**export_kwargs), feed=feed)


# --- pieces into full tensors or an engine rank's TP shard ------------------------------------


# per HF name: the dim the engine splits it along over its tensor-parallel ranks (None: every
# engine rank holds it whole), or an explicit (dim, start, stop): this engine rank's range
Shard = int | tuple[int, int, int] | None
ShardDims = Mapping[str, Shard] | Callable[[str], Shard]

_COLUMN = re.compile(r"(?:^|\.)(?:q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?:weight|bias)$")
_ROW = re.compile(r"(?:^|\.)(?:o_proj|down_proj)\.weight$")
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head)\.weight$")


def vllm_shard_dim(name: str) -> int | None:
    """The dim vLLM's and SGLang's tensor-parallel layers split an HF tensor of a Llama-style
    model (Llama, Mistral, Qwen2/3, Qwen3-MoE with per-expert tensors) along: q/k/v, gate/up
    projections (weights and biases, experts' too) along dim 0 (column-parallel), o_proj and
    down_proj weights along dim 1 (row-parallel; their biases are whole), the embedding and
    lm_head along dim 0 (vocabulary-parallel); None (whole on every rank) for the rest: norms,
    the MoE router, q_norm / k_norm.

    Not covered, say them yourself: fused HF tensors (Phi-3's qkv_proj and gate_up_proj: the
    engine takes each part's shard, not a contiguous block of the whole), stacked-experts
    tensors and expert parallelism (the engine's fused-MoE loader decides), a vocabulary the
    engine pads to a size its TP does not evenly split (vLLM pads to a multiple of 64: give
    that rank's rows as (0, start, stop)), and k/v at an engine TP above the number of KV heads
    (vLLM then replicates heads rather than splitting them)."""
    if _COLUMN.search(name) or _VOCAB.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


@dataclass
class _Target:
    """One HF tensor as this receiver holds it: its full shape, the region of it that this
    engine rank's buffer covers, the buffer and which of its elements have been written."""

    full: tuple[int, ...]
    dim: int | None
    region: tuple[int, int]  # [start, stop) along `dim` (the whole dim when dim is None)
    shape: tuple[int, ...]  # the buffer's
    dtype: torch.dtype | None
    buffer: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # written elements, while some are not
    written: int = 0  # distinct elements of the buffer written

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class PieceReceiver:
    """Assembles `Converter.export_local()` pieces (`LocalPiece`s, from any number of training
    ranks, in any order, over whatever transport the consumer uses) into full HF tensors, or
    into one engine rank's tensor-parallel shard of each.

        receiver = mapgen.PieceReceiver(module, dtype=torch.bfloat16, device="cuda")
        for piece in pieces:        # LocalPieces of every training rank, by your own transport
            receiver.add(piece)
        engine_model.load_weights(receiver.tensors().items())  # full HF tensors: the engine cuts its shard

    `shapes`: the HF tensors to fill, name -> full shape, a generated module (its
    HF_TENSORS), or a Converter (its module's, named as its `export_local` names them: in the
    naming of the checkpoint it loaded). `dtype`: of the buffers (one for all, or per name); None takes each tensor's
    first piece's dtype. A piece of another dtype is cast as it is written (pieces come in
    `export_local(dtype=...)`'s dtypes: ask for the engine's). `device`: of the buffers.

    `tp_size` > 1: the buffers are this engine rank's (`tp_rank`) shard of each tensor:
    `shard_dims` gives, per HF name (a mapping, which must name every tensor, or a callable),
    the dim the engine splits it along (the full size must divide by tp_size), None for a
    tensor every engine rank holds whole, or (dim, start, stop) for this rank's range itself
    (uneven shards, such as a padded vocabulary's last rank). Dims are those of the full HF
    tensor: for a stacked-experts tensor dim 0 is the expert (splitting it gives each engine
    rank whole experts). A piece outside this rank's shard is skipped; one partly inside
    writes its overlap. Shards are for copying straight into the engine rank's own parameters
    (each engine rank then receives and holds only its share): vLLM's and SGLang's
    `load_weights` take full tensors and cut their rank's shard themselves, so feed those a
    receiver of full tensors (tp_size 1).

    Counting is exact: a boolean mask per tensor records which elements have been written, so a
    piece written twice does not count twice (the last write wins); a tensor is complete when
    every element of its buffer has been written, and its mask is then freed. Pieces whose
    `primary` is False (the copies of a replicated parameter that ranks other than rank 0 of
    its TP group yield) are ignored unless `replicas=True`; with data parallelism, send one
    replica's pieces (another's are the same values: writing them is harmless but wasted). A
    piece of a tensor not in `shapes` raises, unless `skip_unknown=True` (an engine rank that
    holds some layers only)."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]] | Any,
        *,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        shard_dims: ShardDims | None = None,
        replicas: bool = False,
        skip_unknown: bool = False,
    ) -> None:
        full = _full_shapes(shapes)
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise PieceReceiverError(f"PieceReceiver: tp_size must be a positive integer, not {tp_size!r}")
        if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise PieceReceiverError(f"PieceReceiver: tp_rank must be an integer in [0, {tp_size}), not {tp_rank!r}")
        if tp_size > 1 and shard_dims is None:
            raise PieceReceiverError(
                "PieceReceiver: tp_size > 1 needs shard_dims, the dim the engine splits each HF tensor along "
                "(e.g. mapgen.engine.vllm_shard_dim)"
            )
        if dtype is not None and not isinstance(dtype, (torch.dtype, Mapping)):
            raise PieceReceiverError(f"PieceReceiver: dtype must be a torch.dtype, a mapping name -> dtype, or None, not {dtype!r}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.replicas, self.skip_unknown = replicas, skip_unknown
        problems: list[str] = []
        self._targets: dict[str, _Target] = {}
        for name, shape in full.items():
            spec = _shard_of(shard_dims, name, problems) if shard_dims is not None else None
            made = _target(name, shape, spec, tp_rank, tp_size, problems)
            if made is None:
                continue
            if isinstance(dtype, Mapping):
                if name not in dtype:
                    problems.append(f"{name}: dtype has no entry for it")
                    continue
                made.dtype = dtype[name]
            else:
                made.dtype = dtype
            self._targets[name] = made
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise PieceReceiverError("PieceReceiver: cannot make these tensors' buffers:\n  " + "\n  ".join(shown))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's buffer shape (this engine rank's shard), in `shapes`' order."""
        return {name: t.shape for name, t in self._targets.items()}

    def add(self, piece: LocalPiece | HFPiece, data: torch.Tensor | None = None) -> int:
        """Write a piece's values into its tensor's buffer: a `LocalPiece`, or an `HFPiece` with
        its `data` (a transport that sends coordinates and values apart). Returns how many
        elements of the buffer it wrote (0: skipped, as not primary or outside this shard)."""
        if isinstance(piece, LocalPiece):
            if data is not None:
                raise TypeError("PieceReceiver.add: a LocalPiece carries its data; pass data only with an HFPiece")
            if not piece.primary and not self.replicas:
                return 0
            coordinates, values = piece.piece, piece.data
        elif isinstance(piece, HFPiece):
            if data is None:
                raise TypeError(f"PieceReceiver.add: an HFPiece ({piece.label}) needs its data")
            coordinates, values = piece, data
        else:
            raise TypeError(f"PieceReceiver.add takes a LocalPiece (or an HFPiece and its data), not a {type(piece).__name__}")
        target = self._targets.get(coordinates.name)
        if target is None:
            if self.skip_unknown:
                return 0
            raise PieceReceiverError(
                f"PieceReceiver: a piece of {coordinates.name!r}, which is not among the tensors it fills "
                "(skip_unknown=True to skip such pieces)"
            )
        _check_piece(coordinates, values, target)
        if coordinates.expert is not None:
            values = values.unsqueeze(0)  # the stacked tensor's expert dim
        spans: list[list[tuple[slice, slice]]] = []  # per dim of the full tensor: (buffer, data) slices
        for dim, runs in enumerate(coordinates.full_runs()):
            start, stop = target.region if dim == target.dim else (0, target.full[dim])
            found = []
            offset = 0
            for first, end in runs:
                low, high = max(first, start), min(end, stop)
                if low < high:
                    found.append((slice(low - start, high - start), slice(offset + low - first, offset + high - first)))
                offset += end - first
            if not found:
                return 0  # outside this rank's shard
            spans.append(found)
        buffer = self._buffer(target, values.dtype)
        complete = target.written == target.numel
        if not complete and target.mask is None:
            target.mask = torch.zeros(target.shape, dtype=torch.bool)
        wrote = 0
        with torch.no_grad():
            for box in itertools.product(*spans):
                into = tuple(b for b, _ in box)
                buffer[into].copy_(values[tuple(d for _, d in box)])
                size = math.prod(s.stop - s.start for s in into)
                wrote += size
                if target.mask is not None:
                    seen = target.mask[into]
                    target.written += size - int(seen.sum())
                    seen.fill_(True)
        if target.written == target.numel:
            target.mask = None  # complete: no more counting needed
        return wrote

    def complete(self) -> list[str]:
        """The tensors every element of whose buffer has been written, in `shapes`' order."""
        return [name for name, t in self._targets.items() if t.written == t.numel]

    def missing(self) -> dict[str, int]:
        """Tensor -> how many elements of its buffer are not yet written, for every tensor that
        is not complete (empty when all are)."""
        return {name: t.numel - t.written for name, t in self._targets.items() if t.written < t.numel}

    @property
    def done(self) -> bool:
        """Every tensor complete."""
        return all(t.written == t.numel for t in self._targets.values())

    def tensors(self, *, partial: bool = False) -> dict[str, torch.Tensor]:
        """Name -> buffer (the receiver's own tensors, not copies), in `shapes`' order.

        Raises PieceReceiverError naming the incomplete tensors and how much of each is missing,
        unless `partial`: then every tensor some piece has written to, complete or not (an
        element not yet written is zero, or after `reset` holds its previous value)."""
        missing = self.missing()
        if missing and not partial:
            lines = [
                f"{name}: {count} of {self._targets[name].numel} elements not written"
                + (" (none written)" if count == self._targets[name].numel else "")
                for name, count in itertools.islice(missing.items(), 20)
            ]
            if len(missing) > 20:
                lines.append(f"... and {len(missing) - 20} more")
            raise PieceReceiverError(
                f"PieceReceiver: {len(missing)} of {len(self._targets)} tensors are incomplete (add the pieces of every "
                "training rank of one data-parallel replica, or tensors(partial=True)):\n  " + "\n  ".join(lines)
            )
        return {name: t.buffer for name, t in self._targets.items() if t.buffer is not None}

    def reset(self) -> None:
        """Count every element as not written again (the next sync), keeping the buffers: they
        are written in place, so tensors handed out before change with them."""
        for target in self._targets.values():
            target.written = 0
            target.mask = None

    def _buffer(self, target: _Target, dtype: torch.dtype) -> torch.Tensor:
        if target.buffer is None:
            target.buffer = torch.zeros(target.shape, dtype=target.dtype or dtype, device=self.device)
        return target.buffer


def _full_shapes(shapes: Mapping[str, Sequence[int]] | Any) -> dict[str, tuple[int, ...]]:
    rename = getattr(shapes, "hf_name", None)
    if rename is not None and hasattr(shapes, "module"):  # a Converter: its names as export_local gives them
        return {rename(name): shape for name, shape in _full_shapes(shapes.module).items()}
    tables = getattr(shapes, "HF_TENSORS", None)
    if tables is not None:  # a generated module (a target package's whole table)
        return {t.name: tuple(int(s) for s in t.shape) for t in tables}
    if not isinstance(shapes, Mapping):
        raise PieceReceiverError(
            f"PieceReceiver: shapes must be a mapping HF name -> shape or a generated module, not a {type(shapes).__name__}"
        )
    found: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        dims = tuple(shape)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in dims):
            raise PieceReceiverError(f"PieceReceiver: {name}: a shape is non-negative integers, not {shape!r}")
        found[name] = dims
    return found


def _shard_of(shard_dims: ShardDims, name: str, problems: list[str]) -> Shard:
    if isinstance(shard_dims, Mapping):
        if name not in shard_dims:
            problems.append(f"{name}: shard_dims has no entry for it (None: every engine rank holds it whole)")
            return None
        return shard_dims[name]
    return shard_dims(name)


def _target(
    name: str, full: tuple[int, ...], spec: Shard, rank: int, size: int, problems: list[str]
) -> _Target | None:
    if spec is None or (size == 1 and not isinstance(spec, tuple)):
        return _Target(full, None, (0, full[0] if full else 1), full, None)
    if isinstance(spec, tuple):
        if len(spec) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            problems.append(f"{name}: a shard is a dim, None or (dim, start, stop), not {spec!r}")
            return None
        dim, start, stop = spec
    elif isinstance(spec, int) and not isinstance(spec, bool):
        dim, start, stop = spec, -1, -1
    else:
        problems.append(f"{name}: a shard is a dim, None or (dim, start, stop), not {spec!r}")
        return None
    if not -len(full) <= dim < len(full):
        problems.append(f"{name}: dim {dim} is outside its shape {full}")
        return None
    dim %= len(full)
    if start < 0:  # an even split
        if full[dim] % size:
            problems.append(
                f"{name}: {full[dim]} along dim {dim}, which tp_size {size} does not divide (give this rank's "
                "range as (dim, start, stop))"
            )
            return None
        step = full[dim] // size
        start, stop = rank * step, (rank + 1) * step
    elif not 0 <= start <= stop <= full[dim]:
        problems.append(f"{name}: range [{start}, {stop}) is outside dim {dim} of size {full[dim]}")
        return None
    shape = full[:dim] + (stop - start,) + full[dim + 1 :]
    return _Target(full, dim, (start, stop), shape, None)


def _check_piece(piece: HFPiece, data: torch.Tensor, target: _Target) -> None:
    expected = target.full if piece.expert is None else target.full[1:]
    problem = None
    if piece.expert is not None and not (target.full and 0 <= piece.expert < target.full[0]):
        problem = f"expert {piece.expert} of a tensor of shape {target.full}"
    elif tuple(piece.shape) != expected:
        problem = f"the piece says the tensor{' slice' if piece.expert is not None else ''} has shape {tuple(piece.shape)}, the receiver {expected}"
    elif len(piece.runs) != len(expected) or any(
        not 0 <= first < end <= size for runs, size in zip(piece.runs, expected) for first, end in runs
    ):
        problem = f"runs {piece.runs} do not lie in shape {expected}"
    else:
        lengths = tuple(sum(end - first for first, end in runs) for runs in piece.runs)
        if tuple(data.shape) != lengths:
            problem = f"data of shape {tuple(data.shape)} for runs covering {lengths}"
    if problem is not None:
        raise PieceReceiverError(f"PieceReceiver: a piece of {piece.label} does not fit: {problem}")
