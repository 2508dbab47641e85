"""A model's multi-token-prediction layers in its checkpoint, where the spec's `mtp:` puts them.

`MTPLayers` says where they are; `with_mtp_tensors` adds their tensors to the HF inventory."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mapgen.common.dims import ModelDims
from mapgen.common.errors import ErrorSink, Location, SpecError
from mapgen.compiler.hfconfig import HFConfig, evaluate_in_context, evaluate_reported
from mapgen.compiler.hf_tensors import HF_LAYER
from mapgen.compiler.inventory import HFTensor
from mapgen.compiler.pattern import Pattern
from mapgen.compiler.spec import Spec


@dataclass(frozen=True)
class MTPLayers:
    """Where the checkpoint keeps a model's multi-token-prediction layers (the spec's `mtp:`)."""

    count: int  # dims.mtp_num_layers
    hf_layer: int  # the decoder rules see MTP layer i's transformer layer as decoder layer hf_layer + i
    own_number: int  # MTP rules see MTP layer i's own parameters as mtp.layers.<own_number + i>
    prefix: Pattern | None  # the checkpoint's prefix of MTP layer i's decoder-layer tensors
    like: int | None  # the main decoder layer whose tensors the MTP layer's decoder layer has

    def transformers_layers(self) -> tuple[int, ...]:
        """The decoder layers past the config's that transformers builds for the HF inventory:
        the MTP layers' own, unless they are like a main layer."""
        return tuple(self.hf_layer + i for i in range(self.count)) if self.like is None else ()

    def checkpoint_prefix(self, base: str, index: int) -> str:
        """Where the checkpoint keeps MTP layer `index`'s decoder-layer tensors; `base` is the
        main decoder layers' prefix (`model.layers.`)."""
        return self.prefix.fill((str(index),)) if self.prefix is not None else f"{base}{self.hf_layer + index}."


def mtp_layers(spec: Spec, config: HFConfig, dims: ModelDims) -> MTPLayers | None:
    """The model's MTP layers by the spec's `mtp:`; None for a model without MTP."""
    hf_layer = _mtp_hf_layer(spec, config, dims)
    if hf_layer is None:
        return None
    assert spec.mtp is not None
    like: int | None = None
    if spec.mtp.hf_decoder_like is not None:
        errors = ErrorSink()
        expr = spec.mtp.hf_decoder_like
        ok, value = evaluate_reported(
            lambda: evaluate_in_context(expr, dims, config), errors, spec.mtp.loc, "mtp.hf_decoder_like", expr, config
        )
        errors.raise_if_any()
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < dims.num_layers:
            raise SpecError([f"{spec.mtp.loc}: mtp.hf_decoder_like gives {value!r}, not a decoder layer number below {dims.num_layers}"])
        like = value
    if dims.mtp_num_layers > 1 and (once := [str(e.name) for e in spec.mtp.hf_tensors if not e.name.wildcards]):
        raise SpecError(
            [
                f"{spec.mtp.loc}: the config has {dims.mtp_num_layers} multi-token-prediction layers, but "
                f"mtp.hf_tensors {', '.join(once)} (no '*') exist once: the checkpoint layout is for one MTP layer"
            ]
        )
    own = 0 if spec.mtp.hf_decoder_prefix is not None else hf_layer
    return MTPLayers(dims.mtp_num_layers, hf_layer, own, spec.mtp.hf_decoder_prefix, like)


def _mtp_hf_layer(spec: Spec, config: HFConfig, dims: ModelDims) -> int | None:
    """The HF layer number of the first multi-token-prediction layer (the spec's
    `mtp.hf_layer`), None for a model without MTP; a model with MTP layers needs the spec to
    say how its checkpoint stores them."""
    if not dims.mtp_num_layers:
        return None
    if spec.mtp is None:
        raise SpecError(
            [
                f"{Location(spec.path, 1, 1)}: the config has {dims.mtp_num_layers} multi-token-prediction "
                "layer(s) (dims.mtp_num_layers) but the spec has no 'mtp:' section saying how the "
                "checkpoint stores them"
            ]
        )
    errors = ErrorSink()
    expr = spec.mtp.hf_layer
    ok, value = evaluate_reported(
        lambda: evaluate_in_context(expr, dims, config), errors, spec.mtp.loc, "mtp.hf_layer", expr, config
    )
    errors.raise_if_any()
    if isinstance(value, bool) or not isinstance(value, int) or value < dims.num_layers:
        raise SpecError([f"{spec.mtp.loc}: mtp.hf_layer gives {value!r}, not a layer number from num_layers ({dims.num_layers}) on"])
    return value


def with_mtp_tensors(
    spec: Spec, config: HFConfig, dims: ModelDims, hf: tuple[HFTensor, ...], mtp: MTPLayers | None
) -> tuple[tuple[HFTensor, ...], dict[str, str], tuple[tuple[str, str], ...]]:
    """The HF inventory with each MTP layer's tensors, {copy: original} for those that repeat a
    main-model tensor, and (rules' prefix, checkpoint's prefix) of each MTP layer whose
    decoder-layer tensors the checkpoint keeps under `mtp.hf_decoder_prefix`.

    By default MTP layer i's decoder-layer tensors are transformers' decoder layer hf_layer + i
    (in `hf`), and its `mtp.hf_tensors` follow that layer's own tensors. With
    `hf_decoder_like` they are the named main layer's tensors under the MTP layer's prefix; with
    either that or `hf_decoder_prefix`, each MTP layer's tensors come after the main model's."""
    if mtp is None:
        return hf, {}, ()
    assert spec.mtp is not None
    errors = ErrorSink()
    by_name = {t.name: t for t in hf}
    layers = [(m, t) for t in hf if (m := HF_LAYER.match(t.name)) is not None]
    base = layers[0][0].group(1) if layers else "model.layers."
    extra: dict[int, list[HFTensor]] = {}
    copies: dict[str, str] = {}
    for index in range(mtp.count):
        number = mtp.own_number + index
        for entry in spec.mtp.hf_tensors:
            name = entry.name.fill((str(number),)) if entry.name.wildcards else str(entry.name)
            if entry.copy_of is not None:
                original = by_name.get(entry.copy_of)
                if original is None:
                    errors.add(entry.loc, f"mtp.hf_tensors: '{name}' is a copy of '{entry.copy_of}', which {spec.hf_architecture} does not have")
                    continue
                extra.setdefault(index, []).append(replace(original, name=name))
                copies[name] = entry.copy_of
                continue
            assert entry.shape is not None
            shape: list[int] = []
            for expr in entry.shape:
                ok, value = evaluate_reported(
                    lambda: evaluate_in_context(expr, dims, config), errors, entry.loc, "mtp.hf_tensors.shape", expr, config
                )
                if ok and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    errors.add(entry.loc, f"mtp.hf_tensors: a dimension of '{name}' is {value!r}, not a positive integer")
                    ok = False
                if ok:
                    shape.append(value)
            if len(shape) == len(entry.shape):
                extra.setdefault(index, []).append(HFTensor(name, tuple(shape)))
    duplicated = [t.name for ts in extra.values() for t in ts if t.name in by_name]
    for name in duplicated:
        errors.add(spec.mtp.loc, f"mtp.hf_tensors: '{name}' is a tensor transformers already builds")
    if mtp.like is not None and not any(int(m.group(2)) == mtp.like for m, _ in layers):
        errors.add(spec.mtp.loc, f"mtp.hf_decoder_like: {spec.hf_architecture} has no tensors of decoder layer {mtp.like}")
    errors.raise_if_any()
    prefixes = tuple(
        (f"{base}{mtp.hf_layer + i}.", mtp.checkpoint_prefix(base, i)) for i in range(mtp.count) if mtp.prefix is not None
    )
    if mtp.like is None and mtp.prefix is None:  # each MTP layer's tensors after its decoder layer's
        found: list[HFTensor] = []
        hf_number = {mtp.hf_layer + i: i for i in range(mtp.count)}
        last: dict[int, int] = {}  # HF tensor index -> the MTP layer whose tensors it ends
        for position, tensor in enumerate(hf):
            layer = HF_LAYER.match(tensor.name)
            if layer is not None and int(layer.group(2)) in hf_number:
                index = hf_number[int(layer.group(2))]
                last = {i: n for i, n in last.items() if n != index}
                last[position] = index
        for position, tensor in enumerate(hf):
            found.append(tensor)
            if position in last:
                found.extend(extra.pop(last[position], []))
        for tensors in extra.values():  # a layer transformers has no tensors for: at the end
            found.extend(tensors)
        return tuple(found), copies, prefixes
    own_layers = {mtp.hf_layer + i for i in range(mtp.count)}
    main = [t for t in hf if (m := HF_LAYER.match(t.name)) is None or int(m.group(2)) not in own_layers]
    blocks: list[HFTensor] = []
    for index in range(mtp.count):
        rules_prefix = f"{base}{mtp.hf_layer + index}."
        template = [
            (m, t) for m, t in layers if int(m.group(2)) == (mtp.like if mtp.like is not None else mtp.hf_layer + index)
        ]
        prefix = mtp.checkpoint_prefix(base, index) if mtp.prefix is not None else rules_prefix
        blocks.extend(replace(t, name=prefix + t.name[m.end():]) for m, t in template)
        blocks.extend(extra.get(index, []))
    return tuple(main + blocks), copies, prefixes
