"""The only stage that touches the disk: write when the content changed, atomically.

The output must be a regular file or a name not yet taken. A symbolic link, FIFO, device,
socket or directory there is refused before anything is opened: writing through a link would
either replace the link with a file (the atomic rename) or write wherever it points (the
process's own stdout pipe, which the old compare-then-write read from and hung on), and reading
a FIFO to compare can block forever. Missing folders above the output are created and reported
(`Written.created`), and removed again if the write fails. A failed write leaves the old file
as it was and no temporary file behind; every failure is a `MapgenError` naming the path. The
temporary file is `.NAME.HOST-PID.XXXX.tmp` beside the output: one a killed build left (its
process gone) is removed by the next build that writes NAME.
"""

from __future__ import annotations

import bisect
import difflib
import glob
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mapgen.common.errors import MapgenError
from mapgen.common.files import host_tag, process_alive


_HUNK = re.compile(r"@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@$")


@dataclass(frozen=True)
class Written:
    """What `write_if_changed` did: wrote the file (or found it unchanged), and the folders it
    created for it, outermost first."""

    changed: bool
    created: tuple[Path, ...] = ()
    removed: tuple[Path, ...] = ()  # temporary files killed builds left beside it

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
        return Written(False, removed=tuple(_remove_leftovers(path)))
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
    return Written(True, tuple(created), tuple(_remove_leftovers(path)))


def _temporary_prefix(name: str) -> str:
    """The start of this process's temporary files for output NAME: `.NAME.HOST-PID.`."""
    return f".{name}.{host_tag()}-{os.getpid()}."


def is_leftover(path: Path, name: str | None = None) -> bool:
    """Whether `path` is a temporary file a killed build left (of output `name`, or of any): a
    `.NAME.HOST-PID.XXXX.tmp` of this host whose process is gone, or one named before mapgen
    named them so (`.NAME.XXXX.tmp`). Another host's, or a running build's, is not."""
    file = path.name
    if not (file.startswith(".") and file.endswith(".tmp")):
        return False
    if name is not None and not file.startswith(f".{name}."):
        return False
    owner = re.search(r"\.([A-Za-z0-9_]+)-(\d+)\.[^.]*\.tmp$", file)
    if owner is None:
        return True
    return owner.group(1) == host_tag() and int(owner.group(2)) != os.getpid() and not process_alive(int(owner.group(2)))


def _remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files killed builds of `path` left beside it; those removed."""
    removed = []
    try:
        candidates = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if is_leftover(p, path.name)]
    except OSError:
        return []
    for leftover in candidates:
        try:
            if stat.S_ISREG(os.lstat(leftover).st_mode):
                leftover.unlink()
                removed.append(leftover)
        except OSError:
            pass
    return removed


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
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
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


def stale_diff(path: Path, content: str, shown: str, limit: int | None = None) -> str:
    """A unified diff from what `path` (named `shown`) holds to `content`; empty if equal. Each
    hunk's header names the top-level definition it is in, as git's does (`@@ ... @@ def f(`).
    With `limit`, at most that many lines, then one saying how many were left out."""
    existing = existing_output(path)
    try:
        current = existing.decode() if existing is not None else ""
    except UnicodeDecodeError:
        current = "(not UTF-8 text)\n"
    if current == content:
        return ""
    new_lines = content.splitlines(keepends=True)
    tops = [i for i, line in enumerate(new_lines) if line[:1].isalpha() or line[:1] == "_"]
    out = []
    for line in difflib.unified_diff(
        current.splitlines(keepends=True),
        new_lines,
        fromfile=f"{shown} (checked in)",
        tofile=f"{shown} (regenerated)",
    ):
        hunk = _HUNK.match(line)
        if hunk is not None:
            first = max(int(hunk.group(1)) - 1, 0)  # the hunk's first line in `content`, 0-based
            above = bisect.bisect_right(tops, first - 1) - 1
            if above >= 0:
                line = f"{line.rstrip()} {new_lines[tops[above]].strip()[:80]}\n"
        out.append(line)
    if limit is not None and len(out) > limit:
        left = len(out) - limit
        out[limit:] = [f"... {left:,} more lines of this diff (`mapgen build`, then `git diff {shown}`, shows them all)\n"]
    return "".join(out)


@dataclass(frozen=True)
class WrittenPackage:
    """What `write_package` did: the files it wrote (changed or new), the stale files it removed
    (parts the target no longer has, a one-file module of the same name beside the folder,
    temporary files a killed build left), and the folders it created."""

    written: tuple[str, ...]
    removed: tuple[Path, ...]
    created: tuple[Path, ...]

    def __bool__(self) -> bool:
        return bool(self.written or self.removed)


def stale_files(folder: Path, files: dict[str, str]) -> list[Path]:
    """What in a package folder is not one of `files`: parts the target no longer has, and the
    temporary files of a killed build (`is_leftover`)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p.suffix == ".py" and p.name not in files) or is_leftover(p))


def write_package(folder: Path, files: dict[str, str]) -> WrittenPackage:
    """Write a target package into `folder`: each file as `write_if_changed` writes it (`__init__.py`
    last, so an import never sees a new `__init__` with old parts), then remove what is stale:
    parts the target no longer has, and a one-file module `folder.py` of the same target."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise MapgenError(f"cannot write the package {folder}: it is {file_kind(os.lstat(folder).st_mode)}, not a folder")
    created = make_folders(folder)
    written: list[str] = []
    removed: list[Path] = []
    order = sorted(files, key=lambda name: name == "__init__.py")
    for name in order:
        outcome = write_if_changed(folder / name, files[name])
        removed += outcome.removed
        if outcome:
            written.append(name)
    single = folder.with_name(folder.name + ".py")
    for path in [*stale_files(folder, files), *([single] if os.path.lexists(single) and check_output(single) else [])]:
        try:
            path.unlink()
        except OSError as exc:
            raise MapgenError(f"cannot remove {path}, which the package {folder} replaces: {exc.strerror}") from None
        removed.append(path)
    return WrittenPackage(tuple(written), tuple(removed), tuple(created))
