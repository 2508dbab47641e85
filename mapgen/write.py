"""The only stage that touches the disk: write when the content changed, atomically."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path


def write_if_changed(path: Path, content: str) -> bool:
    """Write `content` to `path` unless it already holds exactly that; True if written."""
    data = content.encode()
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; a module is not
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return True


def stale_diff(path: Path, content: str, shown: str) -> str:
    """A unified diff from what `path` (named `shown`) holds to `content`; empty if equal."""
    current = path.read_text() if path.exists() else ""
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
