"""A spec's rule parsed: its patterns, its kind and the keys only that kind takes, each refusal located.

A rule pairs one Megatron parameter pattern with the HF pattern(s) it is made from (see
`mapgen.compiler.spec`); what a rule may say depends on its kind (`mapgen.compiler.kinds`):
its HF roles, `permute_dims`, `interleaved`, `fused_hf`, `heads` and `head_dim`.
"""

from __future__ import annotations

from mapgen.common.errors import ErrorSink, Location
from mapgen.common.limits import MAX_DOUBLE_STARS, MAX_PATTERN_CHARS
from mapgen.compiler.ir import Kind, Rule
from mapgen.compiler.kinds import KINDS
from mapgen.compiler.pattern import Pattern, expand_braces
from mapgen.compiler.spec_values import parse_expr, unknown_keys
from mapgen.compiler.yamlsource import Node

RULE_KEYS = ("megatron", "hf", "kind", "id", "permute_dims", "when", "heads", "head_dim", "fused_hf", "interleaved")


def parse_rule(node: Node, errors: ErrorSink) -> Rule | None:
    if not isinstance(node.value, dict):
        errors.add(node.loc, "a rule must be a mapping with keys megatron, hf, kind")
        return None
    unknown_keys(node, RULE_KEYS, "rule", errors)
    fields = node.value
    ok = True
    for key in ("megatron", "hf", "kind"):
        if key not in fields:
            errors.add(node.loc, f"rule is missing required key '{key}'")
            ok = False
    if not ok:
        return None
    kind_node = fields["kind"]
    if not isinstance(kind_node.value, str) or kind_node.value not in KINDS:
        errors.add(kind_node.loc, f"unknown kind {kind_node.value!r}; expected one of {', '.join(KINDS)}")
        return None
    kind = KINDS[kind_node.value]
    megatron_node = fields["megatron"]
    if not isinstance(megatron_node.value, str) or not megatron_node.value:
        errors.add(megatron_node.loc, "'megatron' must be a parameter name pattern")
        return None
    if not _pattern_ok(megatron_node.value, megatron_node.loc, errors):
        return None
    megatron = Pattern(megatron_node.value)
    hf = _parse_hf(fields["hf"], kind, megatron, errors)
    permute_dims = _parse_permute_dims(fields.get("permute_dims"), kind, errors)
    when = parse_expr(fields.get("when"), "when", errors)
    heads = parse_expr(fields.get("heads"), "heads", errors)
    head_dim = parse_expr(fields.get("head_dim"), "head_dim", errors)
    fused_hf = _parse_fused_hf(fields.get("fused_hf"), kind, megatron, errors)
    given_id = _parse_id(fields.get("id"), errors)
    interleaved = _parse_interleaved(fields.get("interleaved"), kind, errors)
    for key in ("heads", "head_dim"):
        if key in kind.extra_keys and key not in fields:
            errors.add(node.loc, f"kind '{kind.name}' needs '{key}' (the encoder's)")
        elif key in fields and key not in kind.extra_keys:
            takers = [k.name for k in KINDS.values() if key in k.extra_keys]
            errors.add(node.key_loc(key), f"'{key}' applies only to kind {' or '.join(repr(k) for k in takers)}")
    if hf is None:
        return None
    return Rule(megatron, hf, kind, megatron_node.loc, permute_dims, when, heads, head_dim, fused_hf, given_id, interleaved)


def _parse_interleaved(node: Node | None, kind: Kind, errors: ErrorSink) -> bool:
    """`interleaved: true`: the kind's fused HF tensor alternates its parts row by row."""
    if node is None:
        return False
    if not isinstance(node.value, bool):
        errors.add(node.loc, f"'interleaved' must be true or false, got {node.value!r}")
        return False
    if node.value and not kind.interleavable:
        takers = " or ".join(repr(k.name) for k in KINDS.values() if k.interleavable)
        errors.add(node.loc, f"'interleaved' applies only to kind {takers}, not '{kind}'")
        return False
    return bool(node.value)


def _parse_id(node: Node | None, errors: ErrorSink) -> str | None:
    """A rule's `id:`: a printable name without quotes or backslashes (it goes into docstrings)."""
    if node is None:
        return None
    value = node.value
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_PATTERN_CHARS
        or not value.isprintable()
        or any(c in value for c in "\"'")
    ):
        errors.add(node.loc, f"'id' must be a short printable name without quotes or backslashes, got {str(value)[:80]!r}")
        return None
    return value


def _parse_fused_hf(node: Node | None, kind: Kind, megatron: Pattern, errors: ErrorSink) -> Pattern | None:
    if node is None:
        return None
    text = node.value
    if not isinstance(text, str) or not text.endswith("[*]"):
        errors.add(node.loc, "fused_hf must be a name pattern ending in [*] (the expert's slice)")
        return None
    if not _pattern_ok(text, node.loc, errors):
        return None
    if not kind.stacked_roles:
        errors.add(node.loc, f"fused_hf does not apply to kind '{kind.name}'")
        return None
    pattern = Pattern(text)
    if len(pattern.wildcards) != len(megatron.wildcards):
        errors.add(node.loc, f"fused_hf '{text}' has {len(pattern.wildcards)} wildcards, megatron '{megatron}' has {len(megatron.wildcards)}")
        return None
    return pattern


def _parse_hf(
    node: Node, kind: Kind, megatron: Pattern, errors: ErrorSink
) -> tuple[tuple[str, Pattern], ...] | None:
    roles = kind.roles
    if isinstance(node.value, str) and node.value.endswith("[*]") and len(kind.stacked_roles) == 1:
        # a family whose checkpoints always stack the experts names the stacked tensor's slice
        roles = kind.stacked_roles
    texts: list[tuple[str, str]] = []
    if isinstance(node.value, dict):
        roles = next((r for r in kind.role_sets if set(r) == set(node.value)), roles)
        if set(node.value) != set(roles) or len(roles) == 1:
            errors.add(
                node.loc,
                f"kind '{kind}' takes hf as " + (
                    "one pattern" if len(roles) == 1 else f"a mapping with keys {', '.join(roles)}"
                ),
            )
            return None
        for role in roles:
            value = node.value[role].value
            if not isinstance(value, str):
                errors.add(node.value[role].loc, f"hf.{role} must be a name pattern")
                return None
            texts.append((role, value))
    elif isinstance(node.value, str):
        if not _pattern_ok(node.value, node.loc, errors):
            return None
        try:
            expanded = expand_braces(node.value)
        except ValueError as exc:
            errors.add(node.loc, str(exc))
            return None
        if expanded is None:
            expanded = [node.value]
        roles = next((r for r in kind.role_sets if len(r) == len(expanded)), roles)
        if len(expanded) != len(roles):
            errors.add(
                node.loc,
                f"kind '{kind}' takes "
                + " or ".join(f"{len(r)} HF tensor(s) ({', '.join(r)})" for r in kind.role_sets)
                + f", the pattern names {len(expanded)}",
            )
            return None
        texts = list(zip(roles, expanded))
    else:
        errors.add(node.loc, "'hf' must be a name pattern or a mapping of role to pattern")
        return None
    if not all(_pattern_ok(text, node.loc, errors) for _, text in texts):
        return None
    patterns = tuple((role, Pattern(text)) for role, text in texts)
    for role, pattern in patterns:
        if pattern.wildcards != megatron.wildcards:
            errors.add(
                node.loc,
                f"wildcard mismatch: megatron '{megatron}' has {_describe(megatron.wildcards)}, "
                f"{'hf' if role == 'hf' else 'hf.' + role} '{pattern}' has "
                f"{_describe(pattern.wildcards)}",
            )
            return None
    return patterns


def _pattern_ok(text: str, where: Location, errors: ErrorSink) -> bool:
    """A name pattern within the limits: matching it against every name must stay cheap."""
    if len(text) > MAX_PATTERN_CHARS:
        errors.add(where, f"name pattern of {len(text):,} characters: at most {MAX_PATTERN_CHARS} are allowed")
        return False
    if text.count("**") > MAX_DOUBLE_STARS:
        errors.add(where, f"name pattern '{text}' has {text.count('**')} '**' wildcards: at most {MAX_DOUBLE_STARS} are allowed")
        return False
    return True


def _describe(wildcards: tuple[str, ...]) -> str:
    return "no wildcard" if not wildcards else " ".join(wildcards)


def _parse_permute_dims(node: Node | None, kind: Kind, errors: ErrorSink) -> tuple[int, ...] | None:
    if node is None:
        return None
    if not kind.permutable:
        takers = " or ".join(repr(k.name) for k in KINDS.values() if k.permutable)
        errors.add(node.loc, f"'permute_dims' applies only to kind {takers}, not '{kind}'")
        return None
    values = node.value
    dims = (
        [item.value for item in values]
        if isinstance(values, list)
        else None
    )
    if (
        dims is None
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
        or sorted(dims) != list(range(len(dims)))  # type: ignore[type-var]
    ):
        errors.add(node.loc, "'permute_dims' must be a permutation of 0..n-1, e.g. [1, 0]")
        return None
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]
