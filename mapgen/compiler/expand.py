"""Match every Megatron parameter to exactly one spec rule and decide everything about it.

This is the cross-entity pass: coverage both ways, `auto` resolution, and shape checks of every
transform against the two inventories. All problems are collected and reported together.
"""

from __future__ import annotations

import re
from collections import defaultdict

from mapgen.compiler.hfconfig import HFConfig, evaluate_in_context, evaluate_reported
from mapgen.common.dims import ModelDims
from mapgen.common.errors import ErrorSink, Location
from mapgen.compiler.inventory import HFTensor, MegatronParam
from mapgen.compiler.ir import HFSource, Mapping, Rule
from mapgen.common.layout import QKVGeometry
from mapgen.compiler.autosplit import MODULE_TYPES
from mapgen.common.layout import slice_name, stacked_slice
from mapgen.compiler.spec import Spec

def _source(hf_by_name: dict[str, HFTensor], role: str, name: str) -> HFSource | None:
    """The HF tensor `name`, or for `X[i]` slice i of the stacked-experts tensor X; None if the
    architecture has no such tensor."""
    tensor = hf_by_name.get(name)
    if tensor is not None:
        return HFSource(role, name, tensor.shape)
    base, index = stacked_slice(name)
    stacked = hf_by_name.get(base) if index is not None else None
    if index is None or stacked is None or not stacked.shape or index >= stacked.shape[0]:
        return None
    return HFSource(role, base, stacked.shape[1:], index)


def _unconsumed(tensor: HFTensor, consumers: dict[str, list[str]]) -> bool:
    """No rule reads the tensor, whole or (a stacked-experts tensor) every one of its slices."""
    if tensor.name in consumers:
        return False
    slices = [slice_name(tensor.name, i) for i in range(tensor.shape[0])] if tensor.shape else []
    return not slices or not all(s in consumers for s in slices)


_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(transformer_layer\.)?")


def rules_name(te_name: str, mtp_hf_layer: int | None, mtp_number: int | None = None) -> str:
    """The name spec rules match a parameter by: its te name, but for a multi-token-prediction
    parameter (`mtp.layers.I.X`) the number `mtp_number + I` in place of I (`mtp_number`:
    `mtp_hf_layer` unless given; the spec's `mtp:` says which), and its transformer layer's
    parameters as decoder layer `mtp_hf_layer + I`'s
    (`mtp.layers.I.transformer_layer.X` -> `decoder.layers.<mtp_hf_layer + I>.X`)."""
    found = _MTP.match(te_name) if mtp_hf_layer is not None else None
    if found is None:
        return te_name
    assert mtp_hf_layer is not None
    index = int(found.group(1))
    if found.group(2):
        return f"decoder.layers.{mtp_hf_layer + index}." + te_name[found.end():]
    return f"mtp.layers.{(mtp_hf_layer if mtp_number is None else mtp_number) + index}." + te_name[found.end():]


def _renamed(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """`name` with the first of `prefixes`' (old, new) pairs whose old prefix it has replaced."""
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def expand(
    spec: Spec,
    config: HFConfig,
    dims: ModelDims,
    layout: str,
    megatron: tuple[MegatronParam, ...],
    hf: tuple[HFTensor, ...],
    fused_experts: bool = False,
    mtp_hf_layer: int | None = None,
    copies: frozenset[str] = frozenset(),
    mtp_number: int | None = None,
    hf_prefixes: tuple[tuple[str, str], ...] = (),
) -> tuple[Mapping, ...]:
    """Every Megatron parameter's mapping; with `fused_experts`, rules that say where a
    checkpoint stacks the experts (`fused_hf`) read that tensor's slices instead. Parameters
    of the multi-token-prediction block are matched by `rules_name`; HF tensors in `copies`
    repeat another HF tensor and are read by no rule. `hf_prefixes`: (rules' prefix,
    checkpoint's prefix) pairs: an HF name a rule gives with the first is read with the second
    (an MTP layer's decoder-layer tensors where the checkpoint keeps them apart)."""
    errors = ErrorSink()
    module_types = {**MODULE_TYPES, **dict(spec.module_types)}
    active = [rule for rule in spec.rules if _is_active(rule, dims, config, errors)]
    hf_by_name = {t.name: t for t in hf}
    matched_by_rule: dict[Rule, int] = defaultdict(int)
    consumers: dict[str, list[str]] = defaultdict(list)
    unmapped: list[str] = []
    mappings: list[Mapping] = []
    geometries: dict[Rule, QKVGeometry | None] = {}
    for param in megatron:
        hits = [
            (rule, caps)
            for rule in active
            if (caps := rule.megatron.match(rules_name(param.te_name, mtp_hf_layer, mtp_number))) is not None
        ]
        for rule, _ in hits:
            matched_by_rule[rule] += 1
        if not hits:
            unmapped.append(param.name)
            continue
        if len(hits) > 1:
            first, first_captures = hits[0]
            for _, pattern in first.hf:
                consumers[_renamed(pattern.fill(first_captures), hf_prefixes)].append(param.name)
            for rule, _ in hits[1:]:
                errors.add(
                    rule.loc,
                    f"rule '{rule}' matches Megatron parameter '{param.name}', which rule "
                    f"'{first}' (line {first.loc.line}) already matches",
                )
            continue
        rule, captures = hits[0]
        sources: list[HFSource] = []
        patterns = rule.hf
        if fused_experts and rule.fused_hf is not None:
            patterns = tuple((role, rule.fused_hf) for role in rule.kind.stacked_roles)
        for role, pattern in patterns:
            hf_name = _renamed(pattern.fill(captures), hf_prefixes)
            consumers[hf_name].append(param.name)
            source = _source(hf_by_name, role, hf_name)
            if source is None:
                errors.add(
                    rule.loc,
                    f"'{param.name}' needs HF tensor '{hf_name}', which {spec.hf_architecture} "
                    f"does not have for this config",
                )
            else:
                sources.append(source)
        if len(sources) != len(patterns):
            continue
        if rule not in geometries:  # once per rule: it may evaluate the rule's expressions
            geometries[rule] = rule.kind.geometry(rule, dims, config, errors)
        if rule.kind.merges_heads and geometries[rule] is None:
            continue  # its error is reported
        mapping = _decide(rule, param, tuple(sources), module_types, geometries[rule], errors)
        if mapping is not None:
            mappings.append(mapping)

    for rule in active:
        if matched_by_rule[rule] == 0:
            errors.add(
                rule.loc,
                f"rule '{rule}' matches no Megatron parameter of this model ({layout} layout)",
            )
    where = Location(spec.path, 1, 1)
    if unmapped:
        errors.add(
            where,
            f"{len(unmapped)} Megatron parameter(s) ({layout} layout) match no rule: "
            + ", ".join(unmapped),
        )
    for name, users in consumers.items():
        if len(users) > 1 and _source(hf_by_name, "", name):
            errors.add(where, f"HF tensor '{name}' is consumed {len(users)} times: by " + ", ".join(users))
    unused = [t.name for t in hf if t.name not in copies and _unconsumed(t, consumers)]
    if unused:
        errors.add(
            where,
            f"{len(unused)} HF tensor(s) of {spec.hf_architecture} are consumed by no rule: "
            + ", ".join(unused),
        )
    errors.raise_if_any()
    return tuple(mappings)


def _is_active(rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink) -> bool:
    if rule.when is None:
        return True
    when = rule.when
    ok, value = evaluate_reported(lambda: evaluate_in_context(when, dims, config), errors, rule.loc, "when", when, config)
    return ok and bool(value)


def _decide(
    rule: Rule,
    param: MegatronParam,
    sources: tuple[HFSource, ...],
    module_types: dict[str, str],
    geometry: QKVGeometry | None,
    errors: ErrorSink,
) -> Mapping | None:
    split = rule.kind.split(param, module_types)
    if split is None:
        errors.add(
            rule.loc,
            f"cannot decide how '{param.name}' is split over TP: its module "
            f"{param.module_kind} is not a known type; register it under module_types "
            "as column, row or replicated, or give the rule an explicit kind",
        )
        return None
    mapping = Mapping(
        megatron_name=param.name,
        shape=param.shape,
        dtype=param.dtype,
        module_kind=param.module_kind,
        layer=param.layer,
        expert=param.expert,
        kind=rule.kind,
        split=split,
        hf=sources,
        rule=rule,
        permute_dims=rule.permute_dims,
        qkv=geometry,
    )
    problem = _split_problem(mapping, param) or rule.kind.shape_problem(mapping)
    if problem:
        errors.add(rule.loc, f"'{param.name}' ({rule.kind}): {problem}")
        return None
    return mapping


def _split_problem(mapping: Mapping, param: MegatronParam) -> str | None:
    """The rule's TP split must be the one megatron-core gives the parameter."""
    if mapping.split_dim != param.partition_dim:
        theirs = "no TP partition" if param.partition_dim is None else f"partition dim {param.partition_dim}"
        ours = "none" if mapping.split_dim is None else f"dim {mapping.split_dim}"
        return (
            f"resolves to {mapping.split} (splits {ours}), but megatron-core gives "
            f"{param.module_kind}'s parameter {theirs}"
        )
    return None
