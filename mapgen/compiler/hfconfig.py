"""An HF config.json as the compiler reads it: each field located, spec expressions evaluated over it.

`read_hf_config` refuses a file that is no JSON object, nests too deep, repeats a key or holds a
number JSON cannot (NaN, Infinity); every field keeps its place in the file, so that an error
about it names its line. `evaluate_reported` and `evaluate_in_context` evaluate one spec
expression over the config (and the Megatron dims), reporting a field it lacks at the
expression's place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mapgen.compiler import yamlsource
from mapgen.common.dims import DIM_FIELDS, ModelDims
from mapgen.common.errors import ErrorSink, Location, SpecError
from mapgen.compiler.expr import Expr, MissingField
from mapgen.common.limits import MAX_NESTING


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
        errors.add(config.where("architectures"), f"config field 'architectures' must be a list of class names, got {json_text(architectures)}")
        architectures = None
    model_type = fields.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        errors.add(config.where("model_type"), f"config field 'model_type' must be a string, got {json_text(model_type)}")
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


def json_text(value: Any) -> str:
    text = json.dumps(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 200 else text[:197] + "..."


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
