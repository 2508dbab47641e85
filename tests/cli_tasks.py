"""Tasks for tests/test_cli_conventions.py that run in spawned processes (importable by name
there, as `spawn` pickles them): a conversion whose process dies."""

from __future__ import annotations

import os
from typing import Any


def dying_conversion(job: Any) -> Any:
    """Stands in for `mapgen.convert_rank.run_convert`: the process exits at once, with code 3."""
    os._exit(3)
