"""HF config.json -> Megatron model dims, by the family spec's `dims` expressions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mapgen.dims import ModelDims, coerce
from mapgen.errors import ErrorSink, Location, SpecError
from mapgen.expr import Expr, MissingField
from mapgen.spec import Spec


@dataclass(frozen=True)
class HFConfig:
    path: str
    fields: dict[str, Any]
    architectures: tuple[str, ...]


def read_hf_config(path: str, text: str) -> HFConfig:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    if not isinstance(fields, dict):
        raise SpecError([f"{path}:1:1: a config.json must hold a JSON object"])
    architectures = fields.get("architectures") or ()
    return HFConfig(path, fields, tuple(str(a) for a in architectures))


def translate(spec: Spec, config: HFConfig) -> ModelDims:
    """Evaluate every dim of the spec over the config; all problems are reported together."""
    errors = ErrorSink()
    if config.architectures and spec.hf_architecture not in config.architectures:
        errors.add(
            Location(config.path, 1, 1),
            f"config is for {', '.join(config.architectures)}, but spec {spec.path} maps "
            f"{spec.hf_architecture}",
        )
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
