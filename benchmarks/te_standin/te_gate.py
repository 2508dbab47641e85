"""Make the ``transformer_engine`` stand-in visible to Megatron-Bridge but not to megatron-core.

Why: megatron-core probes for TransformerEngine at import time in many modules
(``try: import transformer_engine ... HAVE_TE = True``) and changes behaviour when it finds it:
e.g. ``megatron.core.transformer.transformer_block`` then takes ``TENorm`` for the final layer
norm, and other modules import names that only real TE has.  Bridge, on the other hand, imports
``transformer_engine.pytorch`` unconditionally (see the stand-in's docstring).  A stand-in that
megatron-core could see would therefore change the megatron-core model under test.  Which
megatron-core modules Bridge pulls in (and so in which order relative to its own TE import) is
not something to maintain by hand, so the gate works per module instead:

- every ``megatron.core.*`` module is executed with ``transformer_engine*`` hidden: its entries
  are taken out of ``sys.modules`` for the duration and a finder at the front of
  ``sys.meta_path`` answers ``ModuleNotFoundError`` for them, so megatron-core's import-time
  probes see exactly what they see on a machine without TE;
- everything else (Bridge's modules) imports the stand-in normally from ``sys.path``.

Function-level ``import transformer_engine`` inside megatron-core that runs *later* (e.g. CUDA
graph or FP8 helpers) would see the stand-in; none of them runs on the conversion path, and the
stand-in's classes raise if constructed.  ``install()`` also puts the stand-in folder on
``sys.path``.  ``megatron_core_te_flags()`` lists the megatron-core modules whose ``HAVE_TE`` is
true (it must be empty; the runner checks).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

STANDIN_DIR = Path(__file__).resolve().parent
_TE = "transformer_engine"
_hidden_depth = 0


def _is_te(name: str) -> bool:
    return name == _TE or name.startswith(_TE + ".")


class _HidingLoader(importlib.abc.Loader):
    """Runs the real loader of a megatron.core module with ``transformer_engine*`` hidden."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self._real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._real.create_module(spec)

    def exec_module(self, module: Any) -> None:
        global _hidden_depth
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_te(name)}
        _hidden_depth += 1
        try:
            self._real.exec_module(module)
        finally:
            _hidden_depth -= 1
            sys.modules.update(saved)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._real, name)


class _Gate(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if _is_te(fullname):
            if _hidden_depth:
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return None  # the stand-in, found on sys.path by the normal finders
        if fullname.startswith("megatron.core.") or fullname == "megatron.core":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _HidingLoader(spec.loader)
            return spec
        return None


def install() -> None:
    """Install the gate (idempotent); call before anything imports megatron."""
    if any(isinstance(finder, _Gate) for finder in sys.meta_path):
        return
    already = [name for name in sys.modules if name.startswith("megatron.core")]
    if already:
        raise RuntimeError(f"te_gate.install() must run before megatron.core is imported: {already[:3]}")
    sys.meta_path.insert(0, _Gate())
    if str(STANDIN_DIR) not in sys.path:
        sys.path.insert(0, str(STANDIN_DIR))


# Modules whose HAVE_TE is True in megatron-core 0.16.1 even with no TE anywhere: their probe
# imports megatron.core.extensions.transformer_engine, which falls back to a MagicMock and
# never raises.
_TRUE_WITHOUT_TE = {"megatron.core.transformer.multi_latent_attention"}


def megatron_core_te_flags() -> list[str]:
    """megatron.core modules that believe TE is installed beyond those that do so without any
    TE (see _TRUE_WITHOUT_TE); must be empty."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("megatron.core")
        and name not in _TRUE_WITHOUT_TE
        and getattr(module, "HAVE_TE", False) is True
    )
