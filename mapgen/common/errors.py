"""Errors that carry the location of the input at fault."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Location:
    """A place in an input file: `path:line:col`, 1-based like editors and compilers."""

    path: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


class MapgenError(Exception):
    """Any error mapgen reports to its user; the message is complete and needs no traceback."""


class NeedsNewerMegatronCore(MapgenError):
    """The installed megatron-core cannot build this model (a feature a later release has): the
    target list's build and check skip such a target on this stack and say why."""


class SpecError(MapgenError):
    """One or more problems with a spec or config, each already formatted `path:line:col: msg`."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = sorted(set(messages), key=_location_sort_key)
        super().__init__("\n".join(self.messages))


def _location_sort_key(message: str) -> tuple[str, int, int, str]:
    parts = message.split(":", 3)
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return (parts[0], int(parts[1]), int(parts[2]), parts[3])
    return (message, 0, 0, "")


class ErrorSink:
    """Collects every problem found in one pass so the user sees them all at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, where: Location | str, message: str) -> None:
        self.messages.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise SpecError(self.messages)
