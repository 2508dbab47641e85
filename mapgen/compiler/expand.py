"""Match every Megatron parameter to exactly one spec rule and decide everything about it.

This is the cross-entity pass: coverage both ways, `auto` resolution, and shape checks of every
transform against the two inventories. All problems are collected and reported together.
"""

from __future__ import annotations

import math
from collections import defaultdict

from mapgen.compiler.config import HFConfig, evaluate_in_context, evaluate_reported
from mapgen.common.dims import ModelDims
from mapgen.common.errors import ErrorSink, Location
from mapgen.compiler.inventory import HFTensor, MegatronParam
from mapgen.compiler.ir import Mapping, QKVGeometry
from mapgen.common.layout import stacked_slice
from mapgen.compiler.spec import Rule, Spec

# Megatron module classes whose TP treatment `auto` knows without looking further
# (Megatron-Bridge's AutoMapping registry). A spec's `module_types` adds to and overrides these.
MODULE_TYPES: dict[str, str] = {
    **{
        name: "column"
        for name in (
            "ColumnParallelLinear",
            "TEColumnParallelLinear",
            "TELayerNormColumnParallelLinear",
            "TEColumnParallelGroupedLinear",
            "VocabParallelEmbedding",
            "DotProductAttention",
            "TEDotProductAttention",
        )
    },
    **{
        name: "row"
        for name in ("RowParallelLinear", "TERowParallelLinear", "TERowParallelGroupedLinear")
    },
    **{
        name: "replicated"
        for name in (
            "TENorm",
            "FusedLayerNorm",
            "WrappedTorchNorm",
            "LayerNorm",
            "RMSNorm",
            "L2Norm",
            "IdentityOp",
            "TopKRouter",
        )
    },
}

_COLUMN_KINDS = ("qkv", "kv", "concat_qkv", "vision_qkv", "gated_mlp")
_AUTO_KINDS = ("auto", "reshape", "zero_centered_rmsnorm")


def resolve_auto(param: MegatronParam, module_types: dict[str, str]) -> str | None:
    """column / row / replicated for `param`, by the owning module; None when undecidable.

    Order: a layer-norm-fused column linear (its norm weight/bias replicated, the rest column);
    the module-type registry; megatron-core's own partition of the parameter; any `*Norm*`
    module replicated; TELinear by its parallel_mode.
    """
    kind = param.module_kind
    if "LayerNormColumnParallelLinear" in kind:
        leaf = param.name.rsplit(".", 1)[-1]
        return "replicated" if leaf in ("layer_norm_weight", "layer_norm_bias") else "column"
    if kind in module_types:
        return module_types[kind]
    if param.partition_dim == 0:
        return "column"
    if param.partition_dim == 1:
        return "row"
    if "Norm" in kind:
        return "replicated"
    if kind == "TELinear":
        return {"column": "column", "row": "row"}.get(param.parallel_mode or "", "replicated")
    return None


def _slice(hf_by_name: dict[str, HFTensor], name: str) -> HFTensor | None:
    """`name[i]`: slice i of a stacked-experts tensor, as a tensor of its own."""
    base, index = stacked_slice(name)
    stacked = hf_by_name.get(base) if index is not None else None
    if index is None or stacked is None or index >= stacked.shape[0]:
        return None
    return HFTensor(name, stacked.shape[1:])


def _unconsumed(tensor: HFTensor, consumers: dict[str, list[str]]) -> bool:
    if tensor.name in consumers:
        return False
    if not tensor.shape or f"{tensor.name}[0]" not in consumers:
        return True
    slices = [f"{tensor.name}[{i}]" for i in range(tensor.shape[0])] if tensor.shape else []
    return not slices or not all(s in consumers for s in slices)


def expand(
    spec: Spec,
    config: HFConfig,
    dims: ModelDims,
    layout: str,
    megatron: tuple[MegatronParam, ...],
    hf: tuple[HFTensor, ...],
    fused_experts: bool = False,
) -> tuple[Mapping, ...]:
    """Every Megatron parameter's mapping; with `fused_experts`, rules that say where a
    checkpoint stacks the experts (`fused_hf`) read that tensor's slices instead."""
    errors = ErrorSink()
    module_types = {**MODULE_TYPES, **dict(spec.module_types)}
    active = [rule for rule in spec.rules if _is_active(rule, dims, config, errors)]
    hf_by_name = {t.name: t for t in hf}
    matched_by_rule: dict[Rule, int] = defaultdict(int)
    consumers: dict[str, list[str]] = defaultdict(list)
    unmapped: list[str] = []
    mappings: list[Mapping] = []
    for param in megatron:
        hits = [
            (rule, caps)
            for rule in active
            if (caps := rule.megatron.match(param.te_name)) is not None
        ]
        for rule, _ in hits:
            matched_by_rule[rule] += 1
        if not hits:
            unmapped.append(param.name)
            continue
        if len(hits) > 1:
            first, first_captures = hits[0]
            for _, pattern in first.hf:
                consumers[pattern.fill(first_captures)].append(param.name)
            for rule, _ in hits[1:]:
                errors.add(
                    rule.loc,
                    f"rule '{rule}' matches Megatron parameter '{param.name}', which rule "
                    f"'{first}' (line {first.loc.line}) already matches",
                )
            continue
        rule, captures = hits[0]
        sources: list[tuple[str, HFTensor]] = []
        patterns = rule.hf
        if fused_experts and rule.fused_hf is not None:
            patterns = (("gate_up" if rule.kind == "gated_mlp" else "hf", rule.fused_hf),)
        for role, pattern in patterns:
            hf_name = pattern.fill(captures)
            consumers[hf_name].append(param.name)
            tensor = hf_by_name.get(hf_name) or _slice(hf_by_name, hf_name)
            if tensor is None:
                errors.add(
                    rule.loc,
                    f"'{param.name}' needs HF tensor '{hf_name}', which {spec.hf_architecture} "
                    f"does not have for this config",
                )
            else:
                sources.append((role, tensor))
        if len(sources) != len(patterns):
            continue
        mapping = _decide(rule, param, tuple(sources), dims, config, module_types, errors)
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
        if len(users) > 1 and (name in hf_by_name or _slice(hf_by_name, name)):
            errors.add(where, f"HF tensor '{name}' is consumed {len(users)} times: by " + ", ".join(users))
    unused = [t.name for t in hf if _unconsumed(t, consumers)]
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
    sources: tuple[tuple[str, HFTensor], ...],
    dims: ModelDims,
    config: HFConfig,
    module_types: dict[str, str],
    errors: ErrorSink,
) -> Mapping | None:
    if rule.kind in _AUTO_KINDS:
        split = resolve_auto(param, module_types)
        if split is None:
            errors.add(
                rule.loc,
                f"cannot decide how '{param.name}' is split over TP: its module "
                f"{param.module_kind} is not a known type; register it under module_types "
                "as column, row or replicated, or give the rule an explicit kind",
            )
            return None
    elif rule.kind in _COLUMN_KINDS:
        split = "column"
    elif rule.kind == "direct":
        split = "replicated"
    else:
        split = rule.kind
    qkv = _qkv_geometry(rule, dims, config, errors)
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
        rule_pattern=str(rule.megatron),
        rule_loc=rule.loc,
        permute_dims=rule.permute_dims,
        qkv=qkv,
    )
    problem = _split_problem(mapping, param) or _shape_problem(mapping)
    if problem:
        errors.add(rule.loc, f"'{param.name}' ({rule.kind}): {problem}")
        return None
    return mapping


def _qkv_geometry(
    rule: Rule, dims: ModelDims, config: HFConfig, errors: ErrorSink
) -> QKVGeometry | None:
    if rule.kind in ("qkv", "kv", "concat_qkv"):
        return QKVGeometry(
            dims.num_attention_heads,
            dims.num_query_groups,
            dims.kv_channels,
            gate=dims.attention_output_gate and rule.kind == "qkv",
        )
    if rule.kind != "vision_qkv":
        return None
    heads_expr, head_dim_expr = rule.heads, rule.head_dim
    assert heads_expr is not None and head_dim_expr is not None
    ok, heads = evaluate_reported(
        lambda: int(evaluate_in_context(heads_expr, dims, config)), errors, rule.loc, "vision_qkv", heads_expr, config
    )
    ok2, head_dim = evaluate_reported(
        lambda: int(evaluate_in_context(head_dim_expr, dims, config)), errors, rule.loc, "vision_qkv", head_dim_expr, config
    )
    return QKVGeometry(heads, heads, head_dim) if ok and ok2 else None


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


def _shape_problem(m: Mapping) -> str | None:
    shapes = {role: t.shape for role, t in m.hf}
    described = ", ".join(f"{t.name} {list(t.shape)}" for _, t in m.hf)
    target = list(m.shape)
    if m.kind in ("qkv", "kv", "concat_qkv", "vision_qkv"):
        assert m.qkv is not None
        g = m.qkv
        if g.heads % g.groups:
            return f"{g.groups} query groups do not divide {g.heads} heads"
        q_rows = g.heads * g.head_dim * (2 if g.gate else 1)
        kv_rows = g.groups * g.head_dim
        tail = list(m.shape[1:])
        if m.kind in ("qkv", "kv"):
            want = {"q": [q_rows, *tail], "k": [kv_rows, *tail], "v": [kv_rows, *tail]}
            for role, shape in shapes.items():
                if list(shape) != want[role]:
                    return f"HF {role} {list(shape)} is not {want[role]} ({g.heads} heads, {g.groups} groups, head_dim {g.head_dim})"
            rows = sum(want[role][0] for role in shapes)
        else:
            rows = q_rows + 2 * kv_rows
            if list(shapes["hf"]) != [rows, *tail]:
                return f"HF {described} is not [{rows}, {', '.join(map(str, tail))}] ({g.heads} heads, {g.groups} groups, head_dim {g.head_dim})"
        if [rows, *tail] != target:
            return f"merged rows {[rows, *tail]} do not match the Megatron shape {target}"
        return None
    if m.kind == "gated_mlp" and "gate_up" in shapes:  # a stacked-experts slice: [gate; up]
        return None if list(shapes["gate_up"]) == target else f"[gate; up] {described} is not the Megatron shape {target}"
    if m.kind == "gated_mlp":
        if shapes["gate"] != shapes["up"]:
            return f"gate and up differ: {described}"
        merged = [2 * shapes["gate"][0], *shapes["gate"][1:]]
        return None if merged == target else f"[gate; up] {merged} is not the Megatron shape {target}"
    (source,) = shapes.values()
    if m.kind == "reshape":
        if math.prod(source) != math.prod(m.shape):
            return f"cannot reshape {described} to {target}"
        return None
    if m.permute_dims is not None:
        if len(m.permute_dims) != len(source):
            return f"permute_dims {list(m.permute_dims)} does not fit {described}"
        source = tuple(source[d] for d in m.permute_dims)
    if list(source) != target:
        return f"HF {described} does not match the Megatron shape {target}"
    return None
