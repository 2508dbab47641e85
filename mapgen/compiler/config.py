"""HF config.json -> Megatron model dims, by the family spec's `dims` expressions.

Every field of the config must be understood by the spec, or the build refuses it
(`check_config_fields`): a field is understood when an expression of the spec reads it (dims,
a rule's `when`, `heads`, `head_dim`, an `ignore_hf` prefix), when the spec's `config_fields`
declares it (then the value it must have, or `any`), or when it is one of
`NON_ARCHITECTURE_FIELDS`, which no model depends on. A field holding an object is understood
whole where the spec reads or declares it whole, and field by field where the spec reads or
declares some of its fields (`rope_scaling.factor`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mapgen.compiler import yamlsource
from mapgen.common.dims import DIM_FIELDS, ModelDims, coerce
from mapgen.common.errors import ErrorSink, Location, SpecError
from mapgen.compiler.expr import Expr, MissingField
from mapgen.common.limits import MAX_NESTING
from mapgen.compiler.spec import Spec

# Config fields that describe no part of the model a spec builds, accepted from any config.
NON_ARCHITECTURE_FIELDS = frozenset(
    {
        # what the file is, and who wrote it
        "architectures", "model_type", "transformers_version", "_name_or_path", "_commit_hash",
        "auto_map",
        # how the checkpoint stores its weights: the dtype (a spec's params_dtype reads it for
        # the model it builds) and quantization (the checkpoint reader's business: FP8 blocks
        # are dequantized on import; another scheme's tensors fail the checkpoint check on load)
        "torch_dtype", "dtype", "quantization_config",
        # tokenizer, and the KV cache of generation
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "tokenizer_class", "use_cache",
        # training only: initialisation, dropout, auxiliary losses, extra outputs
        "initializer_range", "attention_dropout", "hidden_dropout", "router_aux_loss_coef",
        "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
    }
)


@dataclass(frozen=True)
class HFConfig:
    path: str
    fields: dict[str, Any]
    architectures: tuple[str, ...]
    # where each field stands in the file, nested fields dotted; empty where unknown
    locations: dict[str, Location] = field(default_factory=dict)

    def where(self, path: str) -> Location:
        return self.locations.get(path, Location(self.path, 1, 1))


def read_hf_config(path: str, text: str) -> HFConfig:
    """A config.json, refused unless it is a JSON object of at most MAX_NESTING levels, with no
    key twice, no NaN or infinite number, a list of strings for `architectures` and a string
    for `model_type`."""
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, value in pairs:
            if key in found:
                duplicates.append(key)
            found[key] = value
        return found

    try:
        fields = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise SpecError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except RecursionError:
        raise SpecError([f"{path}:1:1: invalid config: values nest deeper than {MAX_NESTING} levels"]) from None
    except ValueError as exc:  # an integer of more digits than Python reads (4,300)
        raise SpecError([f"{path}:1:1: invalid JSON: {exc}"]) from None
    if not isinstance(fields, dict):
        raise SpecError([f"{path}:1:1: a config.json must hold a JSON object"])
    depth = _nesting(fields)
    if depth > MAX_NESTING:
        raise SpecError([f"{path}:1:1: invalid config: values nest {depth} levels deep, at most {MAX_NESTING} are allowed"])
    locations, problems = _field_locations(path, text)
    config = HFConfig(path, fields, (), locations)
    errors = ErrorSink()
    if duplicates:  # the YAML reader (JSON is YAML) locates them
        located = [p for p in problems if "duplicate key" in p]
        errors.messages += located or [f"{path}:1:1: duplicate key '{key}'" for key in sorted(set(duplicates))]
    for field_path, value in _non_finite(fields, ""):
        errors.add(
            config.where(field_path),
            f"config field '{field_path}' is {value}, not a finite number (JSON has no NaN or Infinity)",
        )
    architectures = fields.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        errors.add(config.where("architectures"), f"config field 'architectures' must be a list of class names, got {_json(architectures)}")
        architectures = None
    model_type = fields.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        errors.add(config.where("model_type"), f"config field 'model_type' must be a string, got {_json(model_type)}")
    errors.raise_if_any()
    return HFConfig(path, fields, tuple(architectures or ()), locations)


def _nesting(value: Any) -> int:
    """How deeply JSON values nest (iteratively: the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _non_finite(value: Any, path: str) -> list[tuple[str, str]]:
    """(field path, 'NaN' / 'Infinity' / '-Infinity') for each number that is not finite; a
    number in a list is named by the list's field."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))]
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _non_finite(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for inner in value:
            found += _non_finite(inner, path)
    return found


def _field_locations(path: str, text: str) -> tuple[dict[str, Location], list[str]]:
    """Where each key stands, from the YAML reader (JSON is YAML); {} and the reader's
    complaints if it cannot tell."""
    try:
        root = yamlsource.load(path, text)
    except SpecError as exc:
        return {}, exc.messages
    found: dict[str, Location] = {}

    def visit(node: yamlsource.Node, prefix: str) -> None:
        if isinstance(node.value, dict):
            for key, child in node.value.items():
                found[prefix + key] = node.key_loc(key)
                visit(child, f"{prefix}{key}.")

    visit(root, "")
    return found, []


def spec_reads(spec: Spec) -> frozenset[str]:
    """The config fields the spec's expressions read. A rule's or ignore_hf's expression sees
    the Megatron dims over the config fields, so a dim's name there is no config field."""
    found: set[str] = set()
    for dim in spec.dims:
        if dim.expr is not None:
            found |= dim.expr.fields()
    in_context = [e for r in spec.rules for e in (r.when, r.heads, r.head_dim) if e is not None]
    in_context += [entry.prefix for entry in spec.ignore_hf]
    for expr in in_context:
        found |= {f for f in expr.fields() if f.split(".", 1)[0] not in DIM_FIELDS}
    return frozenset(found)


def check_config_fields(spec: Spec, config: HFConfig, errors: ErrorSink) -> None:
    """Refuse every config field the spec does not understand, and every declared field whose
    value is not the one the spec builds for (see the module doc)."""
    declared = {f.path: f for f in spec.config_fields}
    known = spec_reads(spec) | set(declared)

    def visit(path: str, value: Any) -> None:
        parts = path.split(".")
        if any(".".join(parts[: i + 1]) in known for i in range(len(parts))):
            return
        if not any(k.startswith(path + ".") for k in known):
            errors.add(
                config.where(path),
                f"config field '{path}' is unknown to spec {spec.path}: no expression of the spec "
                "reads it and its config_fields do not declare it, so the model built would "
                "ignore it",
            )
        elif isinstance(value, dict):  # the spec knows some of its fields: check each
            for key, inner in value.items():
                visit(f"{path}.{key}", inner)

    for name, value in config.fields.items():
        if name not in NON_ARCHITECTURE_FIELDS:
            visit(name, value)
    for entry in spec.config_fields:
        present, value = _lookup(config.fields, entry.path)
        if entry.value is None or not present:
            continue
        value_expr = entry.value
        ok, required = evaluate_reported(
            lambda: value_expr.evaluate(config.fields), errors, entry.loc, f"config_fields.{entry.path}", value_expr, config
        )
        if not ok:
            continue
        if not _same(value, required):
            because = f": {entry.why}" if entry.why else ""
            errors.add(
                config.where(entry.path),
                f"config field '{entry.path}' is {_json(value)}, but spec {spec.path} builds only "
                f"{entry.path} = {_json(required)} (config_fields, line {entry.loc.line}){because}",
            )


def _lookup(fields: dict[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = fields
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, [0] equals (0,)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _json(value: Any) -> str:
    text = json.dumps(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 200 else text[:197] + "..."


def translate(spec: Spec, config: HFConfig) -> ModelDims:
    """Evaluate every dim of the spec over the config; all problems are reported together. A
    dim whose value is wrong is blamed on the config field it was read from, where the config
    holds it, when it was read from exactly one."""
    errors = ErrorSink()
    if config.architectures and spec.hf_architecture not in config.architectures:
        errors.add(
            Location(config.path, 1, 1),
            f"config is for {', '.join(config.architectures)}, but spec {spec.path} maps "
            f"{spec.hf_architecture}",
        )
    check_config_fields(spec, config, errors)
    values: dict[str, Any] = {}
    where: dict[str, Location] = {}
    read: dict[str, list[str]] = {}
    for dim in spec.dims:
        where[dim.name] = dim.loc
        reads: list[str] = []
        read[dim.name] = reads
        expr = dim.expr
        ok, raw = (True, dim.literal) if expr is None else evaluate_reported(
            lambda: expr.evaluate(config.fields, reads), errors, dim.loc, f"dims.{dim.name}", expr, config
        )
        if not ok:
            continue
        try:
            values[dim.name] = coerce(dim.name, raw)
        except TypeError as exc:
            _blame(errors, config, dim.name, str(exc), where[dim.name], reads, f" (from config {config.path})")
    errors.raise_if_any()
    dims = ModelDims(**values)
    for name, message in dims.problems():
        _blame(errors, config, name, message, where.get(name, Location(spec.path, 1, 1)), read.get(name, []))
    errors.raise_if_any()
    return dims


def _blame(
    errors: ErrorSink, config: HFConfig, dim: str, message: str, dim_loc: Location, reads: list[str], tail: str = ""
) -> None:
    """Report a wrong dim at the one config field it was read from, else at the spec's dim."""
    fields = {f for f in reads if f.split(".", 1)[0] in config.fields}
    fields = {f for f in fields if not any(other.startswith(f + ".") for other in fields)}
    if len(fields) == 1:
        (field_path,) = fields
        present, value = _lookup(config.fields, field_path)
        if present and field_path in config.locations:
            errors.add(
                config.where(field_path),
                f"config field '{field_path}' is {_json(value)}: dims.{dim} {message} "
                f"(spec {dim_loc.path}, line {dim_loc.line})",
            )
            return
    errors.add(dim_loc, f"dims.{dim} {message}{tail}")


def evaluate_reported(
    evaluate: Callable[[], Any], errors: ErrorSink, loc: Location, label: str, expr: object, config: HFConfig
) -> tuple[bool, Any]:
    """Evaluate one spec expression (`evaluate` runs it); a config field it lacks, or a failed
    evaluation, is reported at the expression's place as `label: ...` and gives (False, None)."""
    try:
        return True, evaluate()
    except MissingField as missing:
        errors.add(loc, f"{label}: config {config.path} lacks field '{missing.field}'")
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        errors.add(loc, f"{label}: cannot evaluate '{expr}': {exc}")
    return False, None


def evaluate_in_context(
    expr: Expr, dims: ModelDims, config: HFConfig
) -> Any:
    """Rule-level expressions see the HF config fields with the Megatron dims over them."""
    scope = dict(config.fields)
    scope.update({name: getattr(dims, name) for name in DIM_FIELDS})  # every dim, written or not
    return expr.evaluate(scope)
