"""Files and folders mapgen writes for others to read: made under the process's umask, as
`save_pretrained` and `torch.save` make theirs, not private as `tempfile` makes its own; and
the host and process a temporary one's name carries, so the next run removes a killed one's."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    current = os.umask(0)
    os.umask(current)
    return current


def temporary_folder(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new hidden folder in `parent` (`tempfile.mkdtemp`), with the mode a new folder gets
    under the umask: it is renamed into place as the output, which others read."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(folder, 0o777 & ~umask())
    return folder


def share_tree(folder: Path) -> None:
    """Every folder and file under `folder` (itself included) given the mode a new one gets
    under the umask (libraries that write through private temporary files leave 0600)."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def module_label(path: str | Path) -> str:
    """A generated module's name from its path: a package's folder (its `__init__.py` given, or
    the folder), a one-file module's stem."""
    where = Path(path)
    if where.name == "__init__.py":
        return where.parent.name
    return where.name if where.is_dir() else where.stem


def host_tag() -> str:
    """This host's name as a temporary file's or folder's name carries it: letters, digits and
    underscores only (so a name's parts split on '.' and '-')."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (another user's counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True
