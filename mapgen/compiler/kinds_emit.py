"""The pieces of a kind's emitted code: the loads of its HF tensors, an export's named outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mapgen.compiler.ir import HFSource, Mapping


def load(source: HFSource) -> str:
    """The load of an HF tensor; a stacked-experts slice is a view of the stacked tensor."""
    if source.expert_slice is None:
        return f"load({source.name!r})"
    return f"load({source.name!r})[{source.expert_slice}]"


def loads(m: Mapping) -> str:
    return ", ".join(load(s) for s in m.hf)


def one_output(m: Mapping, value: str) -> str:
    return f"{{{m.hf[0].label!r}: {value}}}"


def outputs(m: Mapping, values: str) -> str:
    return f"rt.named({values}, {', '.join(repr(s.label) for s in m.hf)})"


def described(m: Mapping) -> str:
    return ", ".join(f"{s.label} {list(s.shape)}" for s in m.hf)
