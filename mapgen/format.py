"""black, in one pinned mode, so the same IR always gives the same bytes."""

from __future__ import annotations

import black
from black.mode import Mode, TargetVersion

MODE = Mode(
    target_versions={TargetVersion.PY311},
    line_length=100,
    string_normalization=True,
    magic_trailing_comma=True,
)


def format_source(source: str) -> str:
    return black.format_str(source, mode=MODE)
