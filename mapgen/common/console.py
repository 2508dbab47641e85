"""A quiet console: what megatron-core, transformers, torch and gloo print on their own is not
for mapgen's users. Libraries' warnings and info logs are silenced in every mapgen process
(the CLI, its build workers and spawned ranks); gloo's "Rank 0 is connected to 0 peer ranks"
lines, which torch's gloo backend writes straight to the process's stdout from C++, are kept
out while process groups are made."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARIES = ("megatron", "transformers", "torch")


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
