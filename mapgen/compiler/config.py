"""HF config.json -> Megatron model dims, by the family spec's `dims` expressions.

Every field of the config must be understood by the spec, or the build refuses it
(`check_config_fields`): a field is understood when an expression of the spec reads it (dims,
a rule's `when`, `heads`, `head_dim`, an `ignore_hf` prefix), when the spec's `config_fields`
declares it (then the value it must have, or `any`), or when it is one of
`NON_ARCHITECTURE_FIELDS`, which no model depends on. A field holding an object is understood
whole where the spec reads or declares it whole, and field by field where the spec reads or
declares some of its fields (`rope_scaling.factor`).

The line between architecture and metadata: a field the spec does not understand is refused
when transformers defines it (`transformers_defines`: the config class of the spec's
architecture, or of the sub-config holding it, has it as an `__init__` parameter, an
`attribute_map` alias or a public attribute of its default instance; or any transformers config
class takes it as an `__init__` parameter or alias: `sliding_window` is Mistral's, so it is
architecture in a Llama config too). A field no transformers config class defines is tool
metadata (`unsloth_version`, `attn_implementation`, `transformers.js_config`): accepted, and
listed for the build's one note line. A field inside a plain object (`rope_scaling.factor`)
is part of that object's meaning: architecture. `ignored` fields (`mapgen build
--ignore-config-field NAME`) are accepted whatever they are, unless the spec reads them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from mapgen.common.dims import DIM_FIELDS, ModelDims, coerce
from mapgen.common.errors import ErrorSink, Location
from mapgen.compiler.hfconfig import HFConfig, evaluate_reported, json_text
from mapgen.compiler.nested import text_view
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


UNKNOWN_FIELD = "is unknown to spec"  # in the refusal of an architecture field the spec does not read

FieldPath = tuple[str, ...]  # a config field by its keys: ("text_config", "sliding_window")


def check_config_fields(
    spec: Spec, config: HFConfig, errors: ErrorSink, ignored: frozenset[str] = frozenset()
) -> list[FieldPath]:
    """Refuse every architecture field the spec does not understand, and every declared field
    whose value is not the one the spec builds for (see the module doc); the metadata fields
    accepted, in the config's order. `ignored`: dotted field paths accepted whatever they are."""
    declared = {f.path: f for f in spec.config_fields}
    known = spec_reads(spec) | set(declared)
    for name in sorted(ignored):
        overlap = sorted(k for k in known if k == name or k.startswith(name + ".") or name.startswith(k + "."))
        if overlap:
            errors.add(
                config.where(name),
                f"--ignore-config-field {name}: spec {spec.path} reads or declares config field "
                f"{', '.join(repr(k) for k in overlap)}, which is never ignored",
            )
    metadata: list[FieldPath] = []
    classes = _ConfigClasses(spec.hf_architecture)

    def visit(keys: FieldPath, value: Any) -> None:
        path = ".".join(keys)
        prefixes = [".".join(keys[: i + 1]) for i in range(len(keys))]
        if any(p in known or p in ignored for p in prefixes):
            return
        if any(k.startswith(path + ".") for k in known):
            if isinstance(value, dict):  # the spec knows some of its fields: check each
                for key, inner in value.items():
                    visit((*keys, key), inner)
            return
        if not classes.defines(keys, config.fields):
            metadata.append(keys)
            return
        errors.add(
            config.where(path),
            f"config field '{path}' {UNKNOWN_FIELD} {spec.path}: no expression of the spec "
            "reads it and its config_fields do not declare it, so the model built would "
            "ignore it",
        )

    for name, value in config.fields.items():
        if name not in NON_ARCHITECTURE_FIELDS:
            visit((name,), value)
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
                f"config field '{entry.path}' is {json_text(value)}, but spec {spec.path} builds only "
                f"{entry.path} = {json_text(required)} (config_fields, line {entry.loc.line}){because}",
            )
    return metadata


def without_fields(fields: dict[str, Any], paths: list[FieldPath]) -> dict[str, Any]:
    """A copy of the config's fields without `paths` (what transformers is given: a metadata
    field such as `attn_implementation` would choose its attention kernels)."""
    kept = dict(fields)
    for keys in paths:
        holder = kept
        for key in keys[:-1]:
            inner = holder.get(key)
            if not isinstance(inner, dict):
                break
            copied = dict(inner)  # the caller's nested objects are left as they are
            holder[key] = copied
            holder = copied
        else:
            holder.pop(keys[-1], None)
    return kept


class _ConfigClasses:
    """Which config fields transformers defines, for the spec's architecture (see the module
    doc). transformers is imported only when a field is asked about, and every config class
    only when the architecture's own classes do not define it."""

    def __init__(self, architecture: str) -> None:
        self.architecture = architecture

    def defines(self, keys: FieldPath, fields: dict[str, Any]) -> bool:
        """Whether transformers defines the field at `keys` (a field inside a plain object,
        not a sub-config, is taken as defined)."""
        holder_class = _architecture_config_class(self.architecture)
        holder: Any = fields
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
            holder_class = _sub_config_class(holder_class, key, holder)
            if holder_class is None:  # a plain object: each of its fields is part of its meaning
                return True
        name = keys[-1]
        return (holder_class is not None and name in _class_fields(holder_class)) or name in _all_config_fields()


def _architecture_config_class(architecture: str) -> type | None:
    """The transformers config class that the model class `architecture` is built from."""
    import transformers

    try:
        model_class = getattr(transformers, architecture, None)
    except Exception:  # a lazily imported class whose module fails to import
        return None
    config_class = getattr(model_class, "config_class", None)
    return config_class if isinstance(config_class, type) else None


def _sub_config_class(holder_class: type | None, key: str, value: Any) -> type | None:
    """The config class of the sub-config `key` of `holder_class` (LLaVA's text_config: the
    class its `model_type` names, else the one the holder's default instance has); None when
    the field is no sub-config."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if holder_class is None or not isinstance(value, dict):
        return None
    sub_configs = getattr(holder_class, "sub_configs", None)
    if not isinstance(sub_configs, dict) or key not in sub_configs:
        return None
    model_type = value.get("model_type")
    if isinstance(model_type, str):
        try:
            found = CONFIG_MAPPING[model_type]
        except (KeyError, ValueError, ImportError):
            found = None
        if isinstance(found, type):
            return found
    declared = sub_configs[key]
    if isinstance(declared, type) and issubclass(declared, PretrainedConfig) and declared is not PretrainedConfig:
        return declared
    default = getattr(_default_instance(holder_class), key, None)
    return type(default) if isinstance(default, PretrainedConfig) else None


@functools.lru_cache(maxsize=None)
def _default_instance(config_class: type) -> Any:
    try:
        return config_class()
    except Exception:  # a class that needs arguments
        return None


def _declared_names(config_class: type) -> set[str]:
    """A config class's `__init__` parameters and `attribute_map` aliases."""
    names: set[str] = set()
    try:
        parameters = list(inspect.signature(config_class).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        parameters = []
    names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    aliases = getattr(config_class, "attribute_map", None)
    if isinstance(aliases, dict):
        names |= {k for k in aliases if isinstance(k, str)}
    return names


@functools.lru_cache(maxsize=None)
def _class_fields(config_class: type) -> frozenset[str]:
    """The fields one config class defines: its parameters, aliases and the public attributes of
    its default instance (transformers' internal state, `_attn_implementation_internal`, is
    none)."""
    names = _declared_names(config_class)
    default = _default_instance(config_class)
    if default is not None:
        names |= {k for k in vars(default) if not k.startswith("_")}
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def _all_config_fields() -> frozenset[str]:
    """The parameters and aliases of every config class transformers has (imports each: a few
    seconds, once per process, and only for a config with a field its own class lacks)."""
    from transformers.models.auto import configuration_auto

    names: set[str] = set()
    for model_type in list(configuration_auto.CONFIG_MAPPING.keys()):
        try:
            config_class = configuration_auto.CONFIG_MAPPING[model_type]
        except Exception:  # a model whose module fails to import here
            continue
        names |= _declared_names(config_class)
    return frozenset(n for n in names if not n.startswith("_"))


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


def translate(
    spec: Spec, config: HFConfig, ignored: frozenset[str] = frozenset(), metadata: list[FieldPath] | None = None
) -> ModelDims:
    """Evaluate every dim of the spec over the config; all problems are reported together. A
    dim whose value is wrong is blamed on the config field it was read from, where the config
    holds it, when it was read from exactly one. `ignored`: config fields accepted whatever
    they are (`check_config_fields`); `metadata`, when given, receives the metadata fields
    accepted."""
    config = text_view(spec.hf_architecture, config)  # a vision-language config, read as its text model's
    errors = ErrorSink()
    if config.architectures and spec.hf_architecture not in config.architectures:
        errors.add(
            Location(config.path, 1, 1),
            f"config is for {', '.join(config.architectures)}, but spec {spec.path} maps "
            f"{spec.hf_architecture}",
        )
    accepted = check_config_fields(spec, config, errors, ignored)
    if metadata is not None:
        metadata.extend(accepted)
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
                f"config field '{field_path}' is {json_text(value)}: dims.{dim} {message} "
                f"(spec {dim_loc.path}, line {dim_loc.line})",
            )
            return
    errors.add(dim_loc, f"dims.{dim} {message}{tail}")
