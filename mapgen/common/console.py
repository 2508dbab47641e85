"""A quiet console: what megatron-core, transformers, torch and gloo print on their own is not
for mapgen's users. Libraries' warnings and info logs are silenced in every mapgen process
(the CLI, its build workers and spawned ranks); gloo's "Rank 0 is connected to 0 peer ranks"
lines, which torch's gloo backend writes straight to the process's stdout from C++, are kept
out while process groups are made. What mapgen says instead: a long command's phases
(`Phases`), as a spinner on a terminal and one line per phase elsewhere."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# torchao: transformers imports it where it is installed, and it warns of each CUDA kernel
# library it cannot load on a machine without the GPU it was built for
LIBRARIES = ("megatron", "transformers", "torch", "torchao")


def quiet_libraries() -> None:
    """Errors only from the libraries mapgen drives (their deprecation notices, optional-package
    warnings and progress bars say nothing about the user's weights)."""
    warnings.filterwarnings("ignore", module=r"(megatron|transformers|torch)(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, message="resource_tracker")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # torch's import resets its "torch" logger to WARNING (torch._logging), undoing the level set
    # above, and then logs "No CUDA runtime is found, using CUDA_HOME=..." (a CUDA build of torch
    # without a GPU) as megatron-core imports torch.utils.cpp_extension: TORCH_LOGS keeps it at ERROR
    os.environ.setdefault("TORCH_LOGS", "-torch")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _flush_native() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush: nothing buffered there
        pass


@contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """File descriptor 1 goes to /dev/null for a while (C++ code ignores sys.stdout)."""
    sys.stdout.flush()
    _flush_native()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        _flush_native()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class Phases:
    """A long command's phases on stderr (`title`: "verify"). On a terminal, one transient line
    with a spinner, the current phase and its time (rich); elsewhere a line `title: phase` per
    phase and nothing else; nothing when not `enabled` (a rank of torchrun but the first).
    `follow(path)` also takes phases from the lines other processes append to `path`."""

    def __init__(self, title: str, enabled: bool = True, console: Any = None) -> None:
        from rich.console import Console

        self.title = title
        self.enabled = enabled
        self.console = console if console is not None else Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress: Any = None
        self._task: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._followers: list[threading.Thread] = []
        self.seen: list[str] = []  # every phase, in order

    def __enter__(self) -> Phases:
        if self.enabled and self.console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=self.console, transient=True,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, phase: str) -> None:
        """`phase` has begun."""
        with self._lock:
            self.seen.append(phase)
            if not self.enabled:
                return
            if self._progress is None:
                self.console.print(f"{self.title}: {phase}", markup=False)
            elif self._task is None:
                self._task = self._progress.add_task(f"{self.title}: {phase}", total=None)
            else:
                self._progress.reset(self._task, description=f"{self.title}: {phase}")

    def note(self, text: str) -> None:
        """A line that stays (above the spinner on a terminal)."""
        if self.enabled:
            (self._progress.console if self._progress is not None else self.console).print(text, markup=False)

    def follow(self, path: Path, interval_s: float = 0.2) -> None:
        """Each line appended to `path` (by other processes) is a phase, until `close`."""

        def tail() -> None:
            offset = 0
            while True:
                stopping = self._stop.wait(interval_s)
                try:
                    with open(path, "rb") as file:
                        file.seek(offset)
                        data = file.read()
                except FileNotFoundError:
                    data = b""
                complete = data[: data.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.decode("utf-8", "replace").splitlines():
                    if line.strip():
                        self(line.strip())
                if stopping:
                    return

        thread = threading.Thread(target=tail, name="mapgen-phases", daemon=True)
        thread.start()
        self._followers.append(thread)

    def close(self) -> None:
        """Read what the followed files still hold, then take the spinner down."""
        self._stop.set()
        for thread in self._followers:
            thread.join(timeout=5)
        self._followers.clear()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
