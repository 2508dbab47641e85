"""The only stage that touches the disk: write when the content changed, atomically.

The output must be a regular file or a name not yet taken. A symbolic link, FIFO, device,
socket or directory there is refused before anything is opened: writing through a link would
either replace the link with a file (the atomic rename) or write wherever it points (the
process's own stdout pipe, which the old compare-then-write read from and hung on), and reading
a FIFO to compare can block forever. Missing folders above the output are created and reported
(`Written.created`), and removed again if the write fails. A failed write leaves the old file
as it was and no temporary file behind; every failure is a `MapgenError` naming the path.
"""

from __future__ import annotations

import difflib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mapgen.common.errors import MapgenError


@dataclass(frozen=True)
class Written:
    """What `write_if_changed` did: wrote the file (or found it unchanged), and the folders it
    created for it, outermost first."""

    changed: bool
    created: tuple[Path, ...] = ()

    def __bool__(self) -> bool:
        return self.changed


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def check_output(path: Path) -> bool:
    """Whether `path` exists; raises unless it is a regular file or nothing (see the module doc)."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise MapgenError(f"cannot write {path}: {exc.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        _refuse(path, status.st_mode)
    return True


def existing_output(path: Path) -> bytes | None:
    """What the output file holds now; None if there is none (or it cannot be read: it is
    then replaced). Anything but a regular file there is refused."""
    if not check_output(path):
        return None
    try:  # not through a link, and without waiting on a FIFO put there since
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            _refuse(path, mode)
        try:
            return handle.read()
        except OSError:
            return None


def _refuse(path: Path, mode: int) -> None:
    try:
        target = f" (to {os.readlink(path)})" if stat.S_ISLNK(mode) else ""
    except OSError:
        target = ""
    raise MapgenError(
        f"cannot write {path}: it is {file_kind(mode)}{target}, not a regular file; mapgen writes its output "
        "only as a regular file, replaced atomically (give another path, or the link's target)"
    )


def write_if_changed(path: Path, content: str) -> Written:
    """Write `content` to `path` unless it already holds exactly that (see the module doc)."""
    data = content.encode()
    if existing_output(path) == data:
        return Written(False)
    created = make_folders(path.parent)
    try:
        _replace(path, data)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return Written(True, tuple(created))


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and any missing folder above it; the ones created, outermost first."""
    missing: list[Path] = []
    current = folder
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    if os.path.lexists(current) and not current.is_dir():
        raise MapgenError(f"cannot write into {folder}: {current} is not a folder")
    created: list[Path] = []
    try:
        for one in reversed(missing):
            one.mkdir()
            created.append(one)
    except OSError as exc:
        for one in reversed(created):
            one.rmdir()
        raise MapgenError(f"cannot create folder {exc.filename or folder}: {exc.strerror}") from None
    return created


def _replace(path: Path, data: bytes) -> None:
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise MapgenError(f"cannot write {path}: {exc.strerror} (creating a file in {path.parent})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; a module is not
        os.replace(temporary, path)
    except BaseException as exc:
        os.unlink(temporary)
        if isinstance(exc, OSError):
            raise MapgenError(f"cannot write {path}: {exc.strerror}") from None
        raise


def stale_diff(path: Path, content: str, shown: str) -> str:
    """A unified diff from what `path` (named `shown`) holds to `content`; empty if equal."""
    existing = existing_output(path)
    try:
        current = existing.decode() if existing is not None else ""
    except UnicodeDecodeError:
        current = "(not UTF-8 text)\n"
    if current == content:
        return ""
    return "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            content.splitlines(keepends=True),
            fromfile=f"{shown} (checked in)",
            tofile=f"{shown} (regenerated)",
        )
    )
