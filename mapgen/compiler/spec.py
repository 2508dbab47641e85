"""The family spec: a typed model of `specs/<family>.yaml`, parsed with every error located.

A spec names the HF architecture, translates HF config fields into Megatron model dims
(`mapgen.compiler.expr` expressions), declares under `config_fields` the other config fields it
understands and the value each must have (`mapgen.compiler.config.check_config_fields`), may register
extra Megatron module types for `auto`, and lists rules. A rule pairs one Megatron parameter
pattern with the HF pattern(s) it is made from:

    - megatron: decoder.layers.*.self_attention.linear_qkv.weight
      hf: model.layers.*.self_attn.{q,k,v}_proj.weight
      kind: qkv

`mapgen.compiler.kinds` defines what each kind does in both directions. A rule may give an `id:`
(a stable name that generated code cites it by); its Megatron pattern is its id otherwise.

A spec states the megatron-core model classes it builds (`models: [gpt, hybrid]`, or one name:
`models: llava`), the first by default (`mapgen build --model` defaults from it; a class it
does not list is refused); a spec without `models` builds any class, GPTModel by default.
"""

from __future__ import annotations

import difflib

from dataclasses import dataclass
from typing import Any

from mapgen.compiler import yamlsource
from mapgen.common.dims import DIM_FIELDS, REQUIRED_DIMS
from mapgen.common.errors import ErrorSink, Location
from mapgen.common.layout import MODEL_CLASSES
from mapgen.compiler.expr import Expr, ExprSyntaxError
from mapgen.compiler.ir import Rule
from mapgen.common.limits import MAX_IGNORE_HF, MAX_RULES
from mapgen.compiler.pattern import Pattern
from mapgen.compiler.spec_rules import parse_rule
from mapgen.compiler.spec_values import nonempty_string, parse_expr, plain, unknown_keys
from mapgen.compiler.yamlsource import Node


PARALLELISM_TYPES = ("column", "row", "replicated")
TOP_KEYS = (
    "family", "hf_architecture", "dims", "module_types", "rules", "ignore_hf", "config_fields", "mtp", "models", "hf_namings",
    "unsupported",
)
MTP_KEYS = ("hf_layer", "hf_tensors", "why")
MTP_OPTIONAL_KEYS = ("hf_decoder_prefix", "hf_decoder_like")
MTP_TENSOR_KEYS = ("name", "shape", "copy_of")
IGNORE_KEYS = ("prefix", "why")
CONFIG_FIELD_KEYS = ("value", "why")
ANY_VALUE = "any"  # a config_fields value: the field may hold anything


@dataclass(frozen=True)
class DimExpr:
    name: str
    expr: Expr | None  # None: a literal given directly in YAML
    literal: Any
    loc: Location


@dataclass(frozen=True)
class IgnoreHF:
    """Checkpoint tensors under a name prefix that the mapping leaves alone, and why."""

    prefix: Expr
    why: str
    loc: Location


@dataclass(frozen=True)
class ConfigField:
    """A config field the spec understands without a dims expression reading it. `value` is
    what the field must equal where a config sets it (an expression over the config); None
    means any value will do (the field does not change the model the spec builds)."""

    path: str  # dotted for a field inside a nested object: rope_parameters.type
    value: Expr | None
    why: str
    loc: Location


@dataclass(frozen=True)
class MTPTensor:
    """A tensor each multi-token-prediction layer of the checkpoint holds that transformers does
    not build: `name` has one `*`, the layer's number as MTP rules see it (see `MTP`), or none
    (a tensor the checkpoint holds once: a model with one MTP layer); either its `shape`
    (expressions over the config), or `copy_of`, the main model's tensor it repeats (its shape,
    and its bytes)."""

    name: Pattern
    shape: tuple[Expr, ...] | None
    copy_of: str | None
    loc: Location


@dataclass(frozen=True)
class MTP:
    """How the checkpoint stores megatron-core's multi-token-prediction layers (dims'
    `mtp_num_layers` of them). MTP layer i's transformer layer is matched by the decoder rules as
    decoder layer `hf_layer + i` (`decoder.layers.<hf_layer + i>.X`), whose HF tensors are, by
    default, transformers' decoder layer of that number (which the architecture itself does not
    build), plus `hf_tensors`; rules for the MTP layer's own parameters (`mtp.layers.N.X`) see
    N = hf_layer + i.

    `hf_decoder_prefix` (a name with one `*`, the MTP layer's index i from 0): the checkpoint
    keeps MTP layer i's decoder-layer tensors under that prefix instead (Qwen3-Next's
    `mtp.layers.*.`): what the decoder rules name `model.layers.<hf_layer + i>.X` is read as
    `<prefix of i>X`, and MTP rules see N = i, megatron-core's own number.
    `hf_decoder_like` (an expression): the main model's decoder layer whose tensors (names past
    the layer's prefix, shapes) the MTP layer's decoder layer has, for a checkpoint whose MTP
    layer is not the decoder layer transformers would build with that number."""

    hf_layer: Expr
    hf_tensors: tuple[MTPTensor, ...]
    why: str
    loc: Location
    hf_decoder_prefix: Pattern | None = None
    hf_decoder_like: Expr | None = None


@dataclass(frozen=True)
class StatedModels:
    """The megatron-core model classes a spec builds (its `models:`), the first by default."""

    names: tuple[str, ...]
    loc: Location

    @property
    def default(self) -> str:
        return self.names[0]

    def __str__(self) -> str:
        return " or ".join(self.names)


@dataclass(frozen=True)
class Spec:
    path: str
    family: str
    hf_architecture: str
    dims: tuple[DimExpr, ...]
    module_types: tuple[tuple[str, str], ...]
    rules: tuple[Rule, ...]
    ignore_hf: tuple[IgnoreHF, ...] = ()
    config_fields: tuple[ConfigField, ...] = ()
    mtp: MTP | None = None
    models: StatedModels | None = None  # None: the spec states none (any class, gpt by default)
    # (prefix, other prefix): another naming of the tensors under `prefix` that checkpoints of
    # the architecture use (`hf_namings: {"vision_tower.vision_model.": "vision_tower."}`)
    hf_namings: tuple[tuple[str, str], ...] = ()
    # the architecture cannot be built for megatron-core: `mapgen build` refuses it, naming why
    unsupported: Unsupported | None = None


@dataclass(frozen=True)
class Unsupported:
    """`unsupported: {needs: ..., tensors: [...]}`: what megatron-core lacks to build the
    architecture (`needs`), and the HF tensors of the module that needs it (`tensors`, as a
    decoder layer names them). The spec's rules map everything else."""

    needs: str
    tensors: tuple[str, ...]
    loc: Location

    def message(self, hf_architecture: str) -> str:
        return (
            f"{self.loc}: {hf_architecture} cannot be built for megatron-core: its {', '.join(self.tensors)} "
            f"need {self.needs}. mapgen refuses it rather than convert its weights into a model that computes "
            "other logits (the spec's rules map every other tensor)"
        )


def parse_spec(path: str, text: str) -> Spec:
    root = yamlsource.load(path, text)
    errors = ErrorSink()
    if not isinstance(root.value, dict):
        errors.add(root.loc, "a spec must be a mapping with keys " + ", ".join(TOP_KEYS))
        errors.raise_if_any()
    assert isinstance(root.value, dict)
    top = root.value
    unknown_keys(root, TOP_KEYS, "spec", errors)
    for key in ("family", "hf_architecture", "dims", "rules"):
        if key not in top:
            errors.add(root.loc, f"missing required key '{key}'")
    family = nonempty_string(top.get("family"), "family", errors)
    hf_architecture = nonempty_string(top.get("hf_architecture"), "hf_architecture", errors)
    if hf_architecture and not hf_architecture.isidentifier():
        errors.add(top["hf_architecture"].loc, f"'hf_architecture' must be a transformers class name, got {hf_architecture[:80]!r}")
        hf_architecture = ""
    dims = _parse_dims(top.get("dims"), errors)
    module_types = _parse_module_types(top.get("module_types"), errors)
    rules: list[Rule] = []
    rules_node = top.get("rules")
    if rules_node is not None:
        if not isinstance(rules_node.value, list):
            errors.add(rules_node.loc, "'rules' must be a list of rules")
        elif len(rules_node.value) > MAX_RULES:
            errors.add(rules_node.loc, f"{len(rules_node.value):,} rules: a spec may have at most {MAX_RULES:,} (see mapgen/common/limits.py)")
        else:
            seen: dict[str, Rule] = {}
            for rule_node in rules_node.value:
                rule = parse_rule(rule_node, errors)
                if rule is None:
                    continue
                if rule.id in seen:
                    errors.add(
                        rule.loc,
                        f"rule id '{rule.id}' is taken by the rule at line {seen[rule.id].loc.line}; "
                        "give one of them an id: of its own",
                    )
                    continue
                seen[rule.id] = rule
                rules.append(rule)
    ignore_hf = _parse_ignore_hf(top.get("ignore_hf"), errors)
    config_fields = _parse_config_fields(top.get("config_fields"), errors)
    mtp = _parse_mtp(top.get("mtp"), errors)
    models = _parse_models(top.get("models"), errors)
    hf_namings = _parse_hf_namings(top.get("hf_namings"), errors)
    unsupported = _parse_unsupported(top.get("unsupported"), errors)
    errors.raise_if_any()
    return Spec(
        path, family, hf_architecture, dims, module_types, tuple(rules), ignore_hf, config_fields, mtp, models, hf_namings,
        unsupported,
    )


def _parse_unsupported(node: Node | None, errors: ErrorSink) -> Unsupported | None:
    """`unsupported: {needs: TEXT, tensors: [NAME, ...]}`."""
    if node is None:
        return None
    value = node.value
    needs = value.get("needs") if isinstance(value, dict) else None
    tensors = value.get("tensors") if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or set(value) != {"needs", "tensors"}
        or needs is None
        or not isinstance(needs.value, str)
        or not needs.value.strip()
        or tensors is None
        or not isinstance(tensors.value, list)
        or not tensors.value
        or not all(isinstance(t.value, str) and t.value for t in tensors.value)
    ):
        errors.add(node.loc, "'unsupported' must be {needs: what megatron-core lacks, tensors: [the HF tensors that need it]}")
        return None
    return Unsupported(" ".join(needs.value.split()), tuple(str(t.value) for t in tensors.value), node.loc)


def _parse_hf_namings(node: Node | None, errors: ErrorSink) -> tuple[tuple[str, str], ...]:
    """`hf_namings: {prefix: other prefix, ...}`: distinct non-empty names ending in '.', neither
    a prefix of another entry's prefix."""
    if node is None:
        return ()
    if not isinstance(node.value, dict) or not node.value:
        errors.add(node.loc, "'hf_namings' must map an HF name prefix to the prefix another naming uses, e.g. "
                   '{"vision_tower.vision_model.": "vision_tower."}')
        return ()
    found: list[tuple[str, str]] = []
    for ours, other in node.value.items():
        theirs = other.value
        if not (isinstance(theirs, str) and ours.endswith(".") and theirs.endswith(".") and ours != theirs):
            errors.add(other.loc, f"hf_namings: {ours!r} -> {plain(other)!r}: both must be different name prefixes ending in '.'")
            continue
        found.append((ours, theirs))
    prefixes = [ours for ours, _ in found]
    for ours in prefixes:
        if any(o != ours and o.startswith(ours) for o in prefixes):
            errors.add(node.value[ours].loc, f"hf_namings: {ours!r} is a prefix of another entry's: give each tensor one naming")
    return tuple(found)


def stated_models(path: str, text: str) -> StatedModels | None:
    """The `models:` of the spec `text` alone (what the target list needs of each spec),
    refused as `parse_spec` refuses it."""
    root = yamlsource.load(path, text)
    errors = ErrorSink()
    models = _parse_models(root.value.get("models"), errors) if isinstance(root.value, dict) else None
    errors.raise_if_any()
    return models


def _parse_models(node: Node | None, errors: ErrorSink) -> StatedModels | None:
    """`models: [gpt, hybrid]` or `models: llava`: distinct names of MODEL_CLASSES."""
    if node is None:
        return None
    items = node.value if isinstance(node.value, list) else [node]
    names = [item.value for item in items]
    if not names or not all(isinstance(n, str) and n in MODEL_CLASSES for n in names) or len(set(names)) != len(names):
        errors.add(
            node.loc,
            f"'models' must be one or a list of distinct megatron-core model classes from {', '.join(MODEL_CLASSES)} "
            f"(the first is built by default), got {repr(plain(node))[:80]}",
        )
        return None
    return StatedModels(tuple(str(n) for n in names), node.loc)


def _parse_mtp(node: Node | None, errors: ErrorSink) -> MTP | None:
    """`mtp: {hf_layer: <expression>, hf_tensors: [{name, shape | copy_of}, ...], why: "...",
    hf_decoder_prefix: <name with one *> (optional), hf_decoder_like: <expression> (optional)}`."""
    if node is None:
        return None
    keys = set(node.value) if isinstance(node.value, dict) else set()
    if not isinstance(node.value, dict) or not set(MTP_KEYS) <= keys <= set(MTP_KEYS + MTP_OPTIONAL_KEYS):
        errors.add(
            node.loc,
            "'mtp' must be a mapping with the keys " + ", ".join(MTP_KEYS)
            + " and optionally " + ", ".join(MTP_OPTIONAL_KEYS),
        )
        return None
    hf_layer = parse_expr(node.value["hf_layer"], "mtp.hf_layer", errors)
    why = nonempty_string(node.value["why"], "mtp.why", errors)
    prefix: Pattern | None = None
    if "hf_decoder_prefix" in node.value:
        text = nonempty_string(node.value["hf_decoder_prefix"], "mtp.hf_decoder_prefix", errors)
        if text and (Pattern(text).wildcards != ("*",) or not text.endswith(".")):
            errors.add(
                node.value["hf_decoder_prefix"].loc,
                f"mtp.hf_decoder_prefix '{text}' must have exactly one '*' (the MTP layer's index) and end with '.'",
            )
        elif text:
            prefix = Pattern(text)
    like = parse_expr(node.value["hf_decoder_like"], "mtp.hf_decoder_like", errors) if "hf_decoder_like" in node.value else None
    tensors_node = node.value["hf_tensors"]
    tensors: list[MTPTensor] = []
    if not isinstance(tensors_node.value, list):
        errors.add(tensors_node.loc, "'mtp.hf_tensors' must be a list of {name, shape} or {name, copy_of}")
        return None
    for item in tensors_node.value:
        fields = item.value
        if not isinstance(fields, dict) or "name" not in fields or len(fields) != 2 or not set(fields) <= set(MTP_TENSOR_KEYS):
            errors.add(item.loc, "each 'mtp.hf_tensors' entry needs a name and either a shape or copy_of")
            continue
        name = nonempty_string(fields["name"], "mtp.hf_tensors.name", errors)
        if name and Pattern(name).wildcards not in (("*",), ()):
            errors.add(
                fields["name"].loc,
                f"mtp.hf_tensors name '{name}' must have one '*' (the MTP layer's number), or none (a tensor held once)",
            )
            continue
        shape: tuple[Expr, ...] | None = None
        copy_of: str | None = None
        if "copy_of" in fields:
            copy_of = nonempty_string(fields["copy_of"], "mtp.hf_tensors.copy_of", errors)
        else:
            dims_node = fields["shape"]
            if not isinstance(dims_node.value, list) or not dims_node.value:
                errors.add(dims_node.loc, "mtp.hf_tensors shape must be a list of expressions")
                continue
            parsed = [parse_expr(d, "mtp.hf_tensors.shape", errors) for d in dims_node.value]
            if any(p is None for p in parsed):
                continue
            shape = tuple(p for p in parsed if p is not None)
        if name and (shape is not None or copy_of):
            tensors.append(MTPTensor(Pattern(name), shape, copy_of, item.loc))
    if hf_layer is None or not why:
        return None
    return MTP(hf_layer, tuple(tensors), why, node.loc, prefix, like)


def _parse_config_fields(node: Node | None, errors: ErrorSink) -> tuple[ConfigField, ...]:
    """`field: any`, `field: <expression or literal>` or `field: {value: ..., why: "..."}`."""
    if node is None:
        return ()
    if not isinstance(node.value, dict):
        errors.add(node.loc, "'config_fields' must map config field names to 'any', a value, or {value, why}")
        return ()
    found: list[ConfigField] = []
    for path, item in node.value.items():
        where = node.key_loc(path)
        if not all(part.isidentifier() for part in path.split(".")):
            errors.add(where, f"config_fields: '{path}' is not a field name (nested fields: a.b)")
            continue
        value_node, why = item, ""
        if isinstance(item.value, dict):
            if set(item.value) != set(CONFIG_FIELD_KEYS):
                errors.add(item.loc, f"config_fields.{path} as a mapping needs exactly the keys value and why")
                continue
            value_node = item.value["value"]
            why = nonempty_string(item.value["why"], f"config_fields.{path}.why", errors)
        if value_node.value == ANY_VALUE:
            found.append(ConfigField(path, None, why, where))
            continue
        source = value_node.value
        if isinstance(source, bool) or source is None:
            source = {True: "true", False: "false", None: "null"}[source]
        elif isinstance(source, (int, float)):
            source = repr(source)
        if not isinstance(source, str):
            errors.add(value_node.loc, f"config_fields.{path} must be 'any', an expression or a literal")
            continue
        try:
            found.append(ConfigField(path, Expr.parse(source), why, where))
        except ExprSyntaxError as exc:
            errors.add(value_node.loc, f"config_fields.{path}: {exc}")
    return tuple(found)


def _parse_ignore_hf(node: Node | None, errors: ErrorSink) -> tuple[IgnoreHF, ...]:
    if node is None:
        return ()
    if not isinstance(node.value, list):
        errors.add(node.loc, "'ignore_hf' must be a list of {prefix, why}")
        return ()
    if len(node.value) > MAX_IGNORE_HF:
        errors.add(node.loc, f"{len(node.value):,} ignore_hf entries: a spec may have at most {MAX_IGNORE_HF:,} (see mapgen/common/limits.py)")
        return ()
    found: list[IgnoreHF] = []
    for item in node.value:
        if not isinstance(item.value, dict) or set(item.value) != set(IGNORE_KEYS):
            errors.add(item.loc, "each 'ignore_hf' entry needs exactly the keys prefix (an expression) and why")
            continue
        prefix = parse_expr(item.value["prefix"], "ignore_hf.prefix", errors)
        why = nonempty_string(item.value["why"], "ignore_hf.why", errors)
        if prefix is not None and why:
            found.append(IgnoreHF(prefix, why, item.loc))
    return tuple(found)


def _parse_dims(node: Node | None, errors: ErrorSink) -> tuple[DimExpr, ...]:
    if node is None:
        return ()
    if not isinstance(node.value, dict):
        errors.add(node.loc, "'dims' must map Megatron dim names to expressions over HF config fields")
        return ()
    dims: list[DimExpr] = []
    for name, value in node.value.items():
        where = node.key_loc(name)
        if name not in DIM_FIELDS:
            close = difflib.get_close_matches(name, DIM_FIELDS, n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "see mapgen/common/dims.py for the dims"
            errors.add(where, f"unknown dim '{name}'; {hint}")
            continue
        if isinstance(value.value, str):
            try:
                dims.append(DimExpr(name, Expr.parse(value.value), None, value.loc))
            except ExprSyntaxError as exc:
                errors.add(value.loc, f"dims.{name}: {exc}")
        elif isinstance(value.value, (bool, int, float)) or value.value is None:
            dims.append(DimExpr(name, None, value.value, value.loc))
        else:
            errors.add(value.loc, f"dims.{name}: must be an expression or a literal")
    given = {d.name for d in dims} | set(node.value)
    for name in REQUIRED_DIMS:
        if name not in given:
            errors.add(node.loc, f"dims: missing required dim '{name}'")
    return tuple(dims)


def _parse_module_types(node: Node | None, errors: ErrorSink) -> tuple[tuple[str, str], ...]:
    if node is None:
        return ()
    if not isinstance(node.value, dict):
        errors.add(node.loc, "'module_types' must map module class names to column, row or replicated")
        return ()
    found: list[tuple[str, str]] = []
    for name, value in node.value.items():
        if value.value not in PARALLELISM_TYPES:
            errors.add(
                value.loc,
                f"module type '{name}': parallelism must be one of {', '.join(PARALLELISM_TYPES)}, "
                f"got {value.value!r}",
            )
        else:
            found.append((name, str(value.value)))
    return tuple(sorted(found))
