"""A Megatron-LM checkpoint as files: the tracker, the iteration folder and megatron-core's torch_dist
metadata read before any process starts (`read_megatron_checkpoint`), data files checked for
damage (`damaged_files`), and megatron-core's checkpoint failures said in a line
(`checkpoint_failure`). `mapgen convert` reads and writes this layout:

    CKPT_DIR/latest_checkpointed_iteration.txt   "release" (or the iteration, "10")
    CKPT_DIR/release/                            (or iter_0000010/) megatron-core's torch_dist
        .metadata  __0_0.distcp ...  common.pt  metadata.json
    CKPT_DIR/config.json  CKPT_DIR/mapgen.json   the HF config, the module's TARGET and DIMS
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapgen.common.errors import MapgenError
from mapgen.runtime.save import describe_error
from mapgen.runtime.vocab import VOCAB_PARAMS

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's tracker file
RELEASE = "release"
RECORD = "mapgen.json"  # the module's TARGET and DIMS, the layout and dtype written with
CONFIG = "config.json"
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")  # model tensors, not optimizer ones


def iteration_folder(iteration: int | None) -> str:
    """Megatron-LM's folder of an iteration: `release`, or `iter_0000010`."""
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


# --- the Megatron checkpoint as files: read before any process starts, and by every rank ---


@dataclass(frozen=True)
class MegatronCheckpoint:
    root: Path
    folder: Path  # release/ or iter_NNNNNNN/
    iteration: int | None
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (global shape, dtype)
    objects: frozenset[str]  # the byte entries: sharded objects' unique keys (`_extra_state`s)
    record: dict[str, Any] | None  # mapgen.json, where mapgen wrote the checkpoint
    config: dict[str, Any] | None  # config.json beside it

    def model_tensors(self) -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(_MODEL_KEY_PREFIXES))

    @property
    def vocab_rows(self) -> int | None:
        for key in VOCAB_PARAMS:
            if key in self.tensors:
                return self.tensors[key][0][0]
        return None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of most of the model's float tensors (the router's float32 bias aside)."""
        stored = Counter(
            dtype for key, (_, dtype) in self.tensors.items()
            if key.startswith(_MODEL_KEY_PREFIXES) and dtype.is_floating_point
        )
        return stored.most_common(1)[0][0] if stored else torch.float32


def read_megatron_checkpoint(root: str | Path) -> MegatronCheckpoint:
    """The checkpoint Megatron-LM's `--load root` would load: the tracker file, the folder it
    names, megatron-core's metadata of a torch_dist checkpoint. Raises MapgenError saying what
    is missing or wrong."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    base = Path(root)
    if not base.exists():
        raise MapgenError(f"{base}: no such folder")
    if not base.is_dir():
        raise MapgenError(f"{base}: not a folder (give the folder Megatron-LM's --load takes)")
    tracker = base / TRACKER
    if not tracker.is_file():
        raise MapgenError(
            f"{base}: no {TRACKER}, so this is not a Megatron-LM checkpoint folder (Megatron-LM's "
            "--load reads the iteration from it; give the folder that holds it, not release/ or iter_*/)"
        )
    try:
        text = tracker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise MapgenError(f"{tracker}: cannot read: {exc}") from None
    if text == RELEASE:
        iteration = None
    elif text.isdigit():
        iteration = int(text)
    else:
        raise MapgenError(f"{tracker}: holds {text[:40]!r}, neither 'release' nor an iteration number")
    folder = base / iteration_folder(iteration)
    if not folder.is_dir():
        raise MapgenError(f"{tracker} names {iteration_folder(iteration)}, but {folder} is not a folder")
    try:
        backend = json.loads((folder / "metadata.json").read_text(encoding="utf-8")).get("sharded_backend")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise MapgenError(f"{folder}: not a megatron-core distributed checkpoint (metadata.json: {exc})") from None
    if backend != "torch_dist":
        raise MapgenError(f"{folder}: a {backend!r} checkpoint; mapgen convert reads torch_dist checkpoints")
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - torch's reader on a damaged .metadata
        raise MapgenError(f"{folder}/.metadata: cannot read megatron-core's tensor metadata: {describe_error(exc)}") from None
    if damaged := damaged_files(folder, metadata):
        raise MapgenError(f"{folder}: a damaged checkpoint: " + "; ".join(damaged))
    common = folder / "common.pt"  # megatron-core 0.19 may keep the common state in the data files
    if not os.path.lexists(common) and not any(str(k).startswith("common_state") for k in metadata.state_dict_metadata):
        raise MapgenError(f"{common}: missing (megatron-core's common state: the iteration, the checkpoint version)")
    try:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        dist_checkpointing.load_common_state_dict(str(folder))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch.load of a damaged or foreign file
        named = damaged_files(folder, metadata, contents=True)
        raise MapgenError(
            f"{common if os.path.lexists(common) else folder}: cannot read megatron-core's common state: "
            f"{checkpoint_failure(exc)}" + "".join(f"\n  {line}" for line in named)
        ) from None
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    objects: set[str] = set()
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            tensors[key] = (tuple(entry.size), entry.properties.dtype)
        elif isinstance(entry, BytesStorageMetadata):
            objects.add(key)
    return MegatronCheckpoint(
        base, folder, iteration, tensors, frozenset(objects), _json_file(base / RECORD), _json_file(base / CONFIG)
    )


def damaged_files(folder: Path, metadata: Any, contents: bool = False) -> list[str]:
    """The data files (`.distcp`) megatron-core's `.metadata` (torch's Metadata) places items in,
    each missing, not a file or shorter than the bytes it is said to hold; with `contents`, also
    each with a tensor item that does not start as torch.save writes one, or any item that starts
    with zeros (zeroed or overwritten data: read where a load failed, to name the file). At most
    6, each naming its file."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {k for k, v in getattr(metadata, "state_dict_metadata", {}).items() if isinstance(v, TensorStorageMetadata)}
    ends: dict[str, int] = {}
    starts: dict[str, list[tuple[int, bool]]] = {}  # file -> (offset, a tensor's) of each item
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        path, offset, length = getattr(info, "relative_path", None), getattr(info, "offset", None), getattr(info, "length", None)
        if isinstance(path, str) and isinstance(offset, int) and isinstance(length, int):
            ends[path] = max(ends.get(path, 0), offset + length)
            starts.setdefault(path, []).append((offset, getattr(index, "fqn", None) in tensors))
    found: list[str] = []
    spoilt: list[str] = []
    whole = False  # some item starts as torch.save writes: the format the contents are checked by
    for name, end in sorted(ends.items()):
        file = folder / name
        if not file.is_file():
            found.append(f"{file}: {'missing' if not os.path.lexists(file) else 'not a file'} (.metadata places tensors in it)")
            continue
        size = file.stat().st_size
        if size < end:
            found.append(f"{file}: cut short: {size:,} bytes, .metadata places data up to byte {end:,}")
        elif contents and starts.get(name):
            bad, zeros, good = _item_starts(file, starts[name])
            whole = whole or good
            if bad is not None:
                (found if zeros else spoilt).append(f"{file}: no data at byte {bad:,} ({'zeroed' if zeros else 'overwritten'}?)")
    return (found + (spoilt if whole else []))[:6]


_ZIP = b"PK\x03\x04"  # torch.save's archive: how each tensor item of a .distcp begins


def _item_starts(file: Path, items: list[tuple[int, bool]]) -> tuple[int | None, bool, bool]:
    """The first item of `file` that is spoilt (one that begins with zeros, or a tensor's that
    does not begin as torch.save's archive), whether it begins with zeros, and whether any item
    begins as the archive."""
    bad, zeros, good = None, False, False
    try:
        with file.open("rb") as stream:
            for offset, tensor in sorted(items):
                stream.seek(offset)
                start = stream.read(4)
                if start == _ZIP:
                    good = True
                elif bad is None and (tensor or start == bytes(4)):
                    bad, zeros = offset, start == bytes(4)
    except OSError:
        return None, False, False
    return bad, zeros, good


def first_line(exc: BaseException) -> str:
    """An exception's type and the first line of its message (torch.load's run to pages)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):  # torch.load's message is about weights_only
        return f"{type(exc).__name__}: not what torch.save writes (damaged, or another kind of file)"
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checkpoint_failure(exc: BaseException) -> str:
    """A failure of megatron-core's distributed checkpointing in a line. torch's
    CheckpointException (a BaseException, raised on every rank alike) carries each failing
    rank's exception: each is named."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException):
        return describe_error(exc) if isinstance(exc, OSError) else first_line(exc)
    said: dict[str, list[int]] = {}
    for rank, failure in sorted(exc.failures.items()):
        inner = failure[0] if isinstance(failure, tuple) and failure else failure
        text = (describe_error(inner) if isinstance(inner, OSError) else first_line(inner)) if isinstance(inner, BaseException) else str(inner)
        said.setdefault(text, []).append(rank)
    if not said:  # a rank told of another's failure
        return "CheckpointException: failed on another rank"
    return "; ".join(f"{text} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" for text, ranks in said.items())


def storage_metadata(folder: Path) -> Any:
    """The `.metadata` (torch's Metadata: items and their places in the files), or None where it
    cannot be read."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    try:
        return FileSystemReader(str(folder)).read_metadata()
    except Exception:  # noqa: BLE001 - read before, so this is a file changed since
        return None


def _json_file(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MapgenError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MapgenError(f"{path}: must hold a JSON object")
    return value
