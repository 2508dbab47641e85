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
from dataclasses import dataclass, field
from typing import Any

from mapgen import yamlsource
from mapgen.dims import DIM_FIELDS, ModelDims, coerce
from mapgen.errors import ErrorSink, Location, SpecError
from mapgen.expr import Expr, MissingField
from mapgen.spec import Spec

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
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    if not isinstance(fields, dict):
        raise SpecError([f"{path}:1:1: a config.json must hold a JSON object"])
    architectures = fields.get("architectures") or ()
    return HFConfig(path, fields, tuple(str(a) for a in architectures), _field_locations(path, text))


def _field_locations(path: str, text: str) -> dict[str, Location]:
    """Where each key stands, from the YAML reader (JSON is YAML); {} if it cannot tell."""
    try:
        root = yamlsource.load(path, text)
    except SpecError:
        return {}
    found: dict[str, Location] = {}

    def visit(node: yamlsource.Node, prefix: str) -> None:
        if isinstance(node.value, dict):
            for key, child in node.value.items():
                found[prefix + key] = node.key_loc(key)
                visit(child, f"{prefix}{key}.")

    visit(root, "")
    return found


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
        try:
            required = entry.value.evaluate(config.fields)
        except MissingField as missing:
            errors.add(entry.loc, f"config_fields.{entry.path}: config {config.path} lacks field '{missing.field}'")
            continue
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            errors.add(entry.loc, f"config_fields.{entry.path}: cannot evaluate '{entry.value}': {exc}")
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
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def translate(spec: Spec, config: HFConfig) -> ModelDims:
    """Evaluate every dim of the spec over the config; all problems are reported together."""
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
    for dim in spec.dims:
        where[dim.name] = dim.loc
        try:
            raw = dim.literal if dim.expr is None else dim.expr.evaluate(config.fields)
        except MissingField as missing:
            errors.add(
                dim.loc,
                f"dims.{dim.name}: config {config.path} lacks field '{missing.field}'",
            )
            continue
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            errors.add(dim.loc, f"dims.{dim.name}: cannot evaluate '{dim.expr}': {exc}")
            continue
        try:
            values[dim.name] = coerce(dim.name, raw)
        except TypeError as exc:
            errors.add(dim.loc, f"dims.{dim.name} {exc} (from config {config.path})")
    errors.raise_if_any()
    dims = ModelDims(**values)
    for name, message in dims.problems():
        errors.add(where.get(name, Location(spec.path, 1, 1)), f"dims.{name} {message}")
    errors.raise_if_any()
    return dims


def evaluate_in_context(
    expr: Expr, dims: ModelDims, config: HFConfig
) -> Any:
    """Rule-level expressions see the HF config fields with the Megatron dims over them."""
    scope = dict(config.fields)
    scope.update(dict(dims.as_literal_items()))
    return expr.evaluate(scope)
