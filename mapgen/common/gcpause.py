"""Python's cyclic garbage collector paused while mapgen's own work runs.

The build: parsing a large generated module makes millions of objects and no garbage; in a
process holding transformers and megatron-core, each collection those allocations trigger walks
every object there (the parse took 3x as long), and while the syntax tree lives, later
collections walk it again (formatting took 3x as long). The build pauses it from the parse until
the tree is dropped.

The runtime: a conversion makes thousands of short-lived tensors and views that are freed by reference
counting as soon as they go out of use; none forms a cycle. But while a bucket's worth of them is
alive at once, their count trips the collector's youngest-generation threshold, and each
collection moves the survivors on to the older generations, until a full collection (every
object of the process: a training process holds millions) runs in the middle of an export. A
held Converter's weight sync then stalls for a full collection every few calls (measured: 250 ms
every 10 or so exports of a 64-layer model in a process of 420k objects). With the collector
paused while mapgen's own work runs, and resumed before a tensor is handed to the caller, what
mapgen allocates is freed as before and no collection runs inside it; the caller's garbage is
collected as usual between calls. A process that turned the collector off keeps it off."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """The collector off inside, restored to what it was on the way out (also on an error)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
