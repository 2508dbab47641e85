"""What a Converter derives from the generated module and the layout alone, made once per process.

A generated module does not change once imported, and the layout (group sizes and this rank's
place in them) is a few integers, so where every parameter lives, the export's bucket plan and its
formats are the same for every Converter made on that module and layout: a fresh Converter (an
RL framework's per-step export, `load_hf_checkpoint`) looks them up instead of recomputing them.
Nothing read from a model's weights goes into a key or a value here. What `load` checks of a
checkpoint against the module is kept too, keyed by all it depends on: what the checkpoint's
index, headers and config.json say (`HFCheckpoint.serial`, the same only for the same bytes),
its files' sizes and folder, the layout and the model's dtypes. An entry holds the module's
tables it was made from and is used only while the module still has those very objects (a test
or a tool that swaps a module's PARAMS gets a fresh plan).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from mapgen.runtime.context import ParallelContext

T = TypeVar("T")

# entries kept per module: layouts x export formats x bucket sizes a process uses (a few)
PER_MODULE = 64

_TABLES: weakref.WeakKeyDictionary[Any, dict[Hashable, tuple[tuple[object, ...], Any]]] = weakref.WeakKeyDictionary()
# the module's tables a plan is made from
_SOURCES = ("PARAMS", "HF_TENSORS", "TIED", "RULES", "HF_COPIES", "IGNORED_HF", "DIMS")


def _sources(module: object) -> tuple[object, ...]:
    return tuple(getattr(module, name, None) for name in _SOURCES)


def layout_key(ctx: ParallelContext) -> tuple[int, ...]:
    """The layout as a key: every group's size and this rank's index in it."""
    return (
        ctx.tp.rank, ctx.tp.size, ctx.pp.rank, ctx.pp.size, ctx.ep.rank, ctx.ep.size,
        ctx.etp.rank, ctx.etp.size, ctx.vpp_size,
    )


def once(module: object, key: Hashable, make: Callable[[], T]) -> T:
    """`make()`, computed once per (module, key) while the module lives; the oldest of a
    module's entries goes past PER_MODULE. A module that cannot be weakly referenced gets no
    memo. Callers treat the value as read-only."""
    try:
        table = _TABLES.get(module)
        if table is None:
            table = _TABLES[module] = {}
    except TypeError:
        return make()
    sources = _sources(module)
    entry = table.get(key)
    if entry is not None and all(a is b for a, b in zip(entry[0], sources)):
        return entry[1]  # type: ignore[no-any-return]
    value = make()
    if key not in table and len(table) >= PER_MODULE:
        del table[next(iter(table))]
    table[key] = (sources, value)
    return value
