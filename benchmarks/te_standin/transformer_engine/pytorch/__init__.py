"""Stand-in for ``transformer_engine.pytorch``: names only, no implementation.

Why it exists
-------------
Megatron-Bridge 0.3.1 imports TransformerEngine unconditionally on the path
``megatron.bridge -> models.conversion.auto_bridge -> model_bridge -> peft_bridge ->
peft.canonical_lora -> peft.lora_layers`` (and ``peft.lora``), which do
``import transformer_engine.pytorch as te`` at module level.  TransformerEngine needs CUDA and
cannot be installed on a CPU-only machine, so ``import megatron.bridge`` fails without it.
Bridge's weight conversion itself (the mapping registry, param mappings, HF<->Megatron
transforms and their collectives) never calls TE; the benchmark builds megatron-core's GPTModel
with the *local* layer spec (``get_gpt_layer_local_spec``), whose modules are plain torch.

What it provides (module level, evaluated while Bridge's modules are imported)
------------------------------------------------------------------------------
- ``Linear``, ``LayerNormLinear``: ``torch.nn.Module`` subclasses.  Bridge subclasses
  ``te.Linear`` (``TELinearAdapter``) and tests ``isinstance(m, (te.Linear, te.LayerNormLinear))``
  / ``m.__class__ == te.Linear``; with the local spec no module is one of these, so those tests
  are False, as they would be with real TE and a local-spec model.
- ``ops.Sequential`` and the other ``ops.*`` names Bridge's LoRA code references (``Linear``,
  ``LayerNorm``, ``RMSNorm``, ``Quantize``, ``MakeExtraOutput``, ``Dropout``, ``ConstantScale``,
  ``AddExtraInput``): ``ops.Sequential`` appears in return annotations evaluated at import.
- ``fp8_autocast``: referenced by LoRA's fused forward only.

Every class raises ``RuntimeError`` when instantiated, so any code path that really needed TE
fails loudly instead of silently computing something else.  Nothing else exists: submodules
that megatron-core probes for (``transformer_engine.pytorch.fp8``, ``.attention.rope``,
``.optimizers``, ...) are absent, so such probes raise ImportError as without TE.

How it is used
--------------
``benchmarks/bridge_runner.py`` first imports megatron-core's modules (model, layer specs,
tensor-parallel layers, ...) *without* this folder on ``sys.path``, so megatron-core's own
``try: import transformer_engine`` probes see that TE is absent and pick their torch
implementations (e.g. ``TransformerBlock``'s final norm).  Only then does it put this folder on
``sys.path`` and import ``megatron.bridge``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__version__ = "0.0.0+standin"


class _Unavailable(torch.nn.Module):
    """Base of every stand-in class: constructing one is an error (there is no TE here)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"transformer_engine stand-in: {type(self).__qualname__} is not available "
            "(TransformerEngine is not installed; only the local layer spec is supported)"
        )


class Linear(_Unavailable):
    pass


class LayerNormLinear(_Unavailable):
    pass


@contextlib.contextmanager
def fp8_autocast(*args: Any, **kwargs: Any):
    raise RuntimeError("transformer_engine stand-in: fp8_autocast is not available")
    yield  # pragma: no cover


from transformer_engine.pytorch import ops  # noqa: E402,F401  (after _Unavailable: ops uses it)
