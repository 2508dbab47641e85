"""The orchestrator: spec + config -> formatted module source, and the checked-in target list."""

from __future__ import annotations

import hashlib
import keyword
import multiprocessing
import os
import re
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from mapgen.compiler import yamlsource
from mapgen.common.console import quiet_libraries
from mapgen.compiler.config import (
    FieldPath,
    HFConfig,
    evaluate_in_context,
    evaluate_reported,
    read_hf_config,
    translate,
    without_fields,
)
from mapgen.common.dims import ModelDims
from mapgen.common.errors import ErrorSink, Location, MapgenError, NeedsNewerMegatronCore, SpecError
from mapgen.compiler.expand import expand
from mapgen.compiler.format import format_source
from mapgen.compiler.inventory import (
    _HF_LAYER, HFTensor, architecture_model_type, hf_inventory, megatron_inventory, own_config_class,
)
from mapgen.compiler.ir import Source, Target
from mapgen.compiler.nested import text_view
from mapgen.common.limits import MAX_INPUT_BYTES
from mapgen.common.layout import HF_EXPERTS, LAYOUTS, MODEL_CLASSES
from mapgen.compiler.packaged import TARGETS_FILE, folder
from mapgen.common import gcpause
from mapgen.compiler.postprocess import check
from mapgen.compiler.render import EXPERTS_PER_PART, render, render_package
from mapgen.compiler.pattern import Pattern
from mapgen.compiler.spec import Spec, StatedModels, parse_spec, stated_models
from mapgen.compiler.write import file_kind

TARGET_KEYS = ("spec", "config", "layout")
# the megatron-core model class (None: the spec's default, `models:`); whether `mapgen build`
# writes the package into generated/ (a family's larger members are built on demand, by the
# tests and the bench)
OPTIONAL_TARGET_KEYS: dict[str, object] = {"model": None, "checked_in": True}
# a config field name `mapgen build --ignore-config-field` takes: it is written, as given, into
# the module's `# Regenerate:` line, which must rebuild the module as a shell command
IGNORABLE_FIELD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class TargetEntry:
    """One line of specs/targets.yaml: builds the package generated/<name>/."""

    name: str
    spec: str
    config: str
    layout: str
    model: str = "gpt"
    checked_in: bool = True

    @property
    def output(self) -> str:
        return f"generated/{self.name}"


def display_path(path: str | Path) -> str:
    """The path as written in generated headers: a spec or config this mapgen ships by its
    shipped name (`specs/llama.yaml`, wherever the wheel is installed), anything else relative
    to the working directory; never absolute, so the output is the same on every machine, in
    every virtualenv."""
    absolute = Path(path).resolve()
    shipped = folder("specs")
    if shipped is not None and absolute.is_relative_to(shipped.resolve()):
        return "specs/" + absolute.relative_to(shipped.resolve()).as_posix()
    try:
        return absolute.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        relative = os.path.relpath(absolute, Path.cwd().resolve())
        return Path(relative).as_posix()


def read_targets(root: Path) -> list[TargetEntry]:
    path = root / TARGETS_FILE
    node = yamlsource.load(TARGETS_FILE, input_text(read_input(path, TARGETS_FILE), TARGETS_FILE))
    errors = ErrorSink()
    entries: list[TargetEntry] = []
    if not isinstance(node.value, dict) or set(node.value) != {"targets"}:
        errors.add(node.loc, "targets file must hold one key, 'targets'")
        errors.raise_if_any()
    assert isinstance(node.value, dict)
    targets = node.value["targets"]
    if not isinstance(targets.value, dict):
        errors.add(targets.loc, "'targets' must map module names to {spec, config, layout, model}")
        errors.raise_if_any()
    assert isinstance(targets.value, dict)
    for name, entry in targets.value.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            errors.add(targets.key_loc(name), f"target name '{name}' is not a Python module name")
            continue
        if not isinstance(entry.value, dict) or not set(TARGET_KEYS) <= set(entry.value) <= {
            *TARGET_KEYS, *OPTIONAL_TARGET_KEYS
        }:
            errors.add(
                entry.loc,
                f"target '{name}' needs the keys {', '.join(TARGET_KEYS)} and may have "
                f"{', '.join(OPTIONAL_TARGET_KEYS)}",
            )
            continue
        values: dict[str, object] = {key: entry.value[key].value for key in TARGET_KEYS}
        values.update({key: entry.value[key].value if key in entry.value else default
                       for key, default in OPTIONAL_TARGET_KEYS.items()})
        if values["layout"] not in LAYOUTS:
            errors.add(entry.value["layout"].loc, f"layout must be one of {', '.join(LAYOUTS)}")
            continue
        if values["model"] is not None and values["model"] not in MODEL_CLASSES:
            errors.add(entry.value["model"].loc, f"model must be one of {', '.join(MODEL_CLASSES)}")
            continue
        if not isinstance(values["checked_in"], bool):
            errors.add(entry.value["checked_in"].loc, "checked_in must be true or false")
            continue
        try:
            stated = _stated_models(root, str(values["spec"]))
        except SpecError as exc:
            errors.messages += exc.messages
            continue
        except MapgenError as exc:
            errors.add(entry.value["spec"].loc, f"target '{name}': {exc}")
            continue
        given = values["model"]
        if given is not None and stated is not None and given not in stated.names:
            errors.add(
                entry.value["model"].loc,
                f"target '{name}': model {given}: spec {values['spec']} builds {stated} (its models, line {stated.loc.line})",
            )
            continue
        values["model"] = given or (stated.default if stated else "gpt")
        entries.append(
            TargetEntry(
                name, str(values["spec"]), str(values["config"]), str(values["layout"]), str(values["model"]),
                bool(values["checked_in"]),
            )
        )
    errors.raise_if_any()
    return entries


def _stated_models(root: Path, spec: str) -> StatedModels | None:
    """The `models:` of a target's spec (a path relative to the repository root)."""
    return stated_models(spec, input_text(read_input(root / spec, spec), spec))


def choose_model(spec: Spec, given: str | None) -> str:
    """The megatron-core model class to build: `given` (`mapgen build --model`), which the
    spec's `models:` must list, or the spec's default (gpt for a spec that states none)."""
    if given is not None and given not in MODEL_CLASSES:
        raise MapgenError(f"model must be one of {', '.join(MODEL_CLASSES)}, got {given!r}")
    stated = spec.models
    if stated is None:
        return given or "gpt"
    if given is not None and given not in stated.names:
        raise SpecError(
            [
                f"{stated.loc}: --model {given}: spec {spec.path} builds {stated} (its models); "
                f"leave --model out to build {stated.default}"
                + (f", or give --model {' or '.join(n for n in stated.names[1:])}" if len(stated.names) > 1 else "")
            ]
        )
    return given or stated.default


def check_ignored_names(names: tuple[str, ...]) -> frozenset[str]:
    """`--ignore-config-field` names: config field paths (dotted for a nested field) that the
    module's `# Regenerate:` line can record."""
    for name in names:
        if not IGNORABLE_FIELD.fullmatch(name) or ".." in name or name.endswith("."):
            raise MapgenError(
                f"--ignore-config-field {name!r}: not a config field name mapgen can record in the module's "
                "Regenerate line (letters, digits, _, - and . between names)"
            )
    return frozenset(names)


REGENERATE_LINE = re.compile(r"^# Regenerate: (.*)$", re.MULTILINE)


def recorded_ignored_fields(module_file: Path) -> tuple[str, ...]:
    """The `--ignore-config-field` names a module was built with, from its header's
    `# Regenerate:` line: what rebuilds it (verify's local twin, its config check) must pass
    them along, or the config it was built from is refused."""
    header = module_file / "__init__.py" if module_file.is_dir() else module_file  # a package: its __init__.py
    with header.open(encoding="utf-8") as text:
        found = REGENERATE_LINE.search(text.read(8192))
    words = found.group(1).split() if found else []
    return tuple(words[i + 1] for i, word in enumerate(words[:-1]) if word == "--ignore-config-field")


def read_input(path: Path, shown: str) -> bytes:
    """The bytes of an input file: a regular file (a link to one is followed) of at most
    MAX_INPUT_BYTES. A FIFO, device or directory is refused before it is opened: reading one
    may never end."""
    try:
        status = path.stat()
    except OSError as exc:
        raise MapgenError(f"{shown}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        raise MapgenError(f"{shown}: cannot read: not a regular file ({file_kind(status.st_mode)})")
    if status.st_size > MAX_INPUT_BYTES:
        raise MapgenError(f"{shown}: {status.st_size:,} bytes, over the limit of {MAX_INPUT_BYTES:,} for an input file")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise MapgenError(f"{shown}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:  # it grew since
        raise MapgenError(f"{shown}: over the limit of {MAX_INPUT_BYTES:,} bytes for an input file")
    return data


def input_text(data: bytes, shown: str) -> str:
    """UTF-8 text, or an error naming the file, line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError(
            [f"{shown}:{line}:{col}: not UTF-8 text (byte 0x{data[exc.start]:02x}); is this a binary file?"]
        ) from None


def _source(path: Path, shown: str) -> tuple[str, Source]:
    data = read_input(path, shown)
    return input_text(data, shown), Source(shown, hashlib.sha256(data).hexdigest())


def check_target_name(name: str) -> None:
    """A module's target name is a Python module name: it is written into the module's header
    comment and docstring, and verify names the local twin after it."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise MapgenError(
            f"target name {name!r} is not a Python module name (letters, digits and _, not starting "
            "with a digit, not a keyword); give --name NAME, or an output file named NAME.py"
        )


def check_shown_path(path: str, what: str) -> None:
    """A path written into the module's header comments and rule docstrings must stay inside
    them: printable, no quote or backslash."""
    bad = [c for c in path if not c.isprintable() or c in "\"\\"]
    if bad:
        raise MapgenError(
            f"{what} path {path!r} has {', '.join(sorted({repr(c) for c in bad}))}, which mapgen does not "
            "write into a module's comments and docstrings; rename or move the file"
        )


def build_target(
    name: str,
    spec_path: Path,
    config_path: Path,
    layout: str,
    regenerate: str,
    shown_paths: tuple[str, str] | None = None,
    hf_experts: str = "per_expert",
    model: str | None = None,
    *,
    ignore_config_fields: tuple[str, ...] = (),
    notes: list[str] | None = None,
) -> tuple[Target, list[str]]:
    """The target's IR and header lines; raises SpecError listing every problem found.

    `shown_paths` are the spec and config paths as headers and messages give them (default:
    relative to the working directory). `hf_experts` is how the checkpoint stores MoE experts: `per_expert`
    tensors (as published, and as transformers saves), or `stacked` along a leading expert dim
    (transformers' in-memory layout), which rules read through their `fused_hf`. `model`: the
    megatron-core model class (None: the spec's default, `choose_model`).
    `ignore_config_fields`: config fields accepted whatever they are (`--ignore-config-field`;
    `regenerate` should record them). `notes`, when given, receives the build's one note line
    on the metadata fields of the config it accepted (`mapgen.compiler.config`)."""
    if model is not None and model not in MODEL_CLASSES:
        raise MapgenError(f"model must be one of {', '.join(MODEL_CLASSES)}, got {model!r}")
    ignored = check_ignored_names(ignore_config_fields)
    if hf_experts not in HF_EXPERTS:
        raise MapgenError(f"hf_experts must be one of {', '.join(HF_EXPERTS)}, got {hf_experts!r}")
    stacked = hf_experts == "stacked"
    check_target_name(name)
    shown_spec, shown_config = shown_paths or (display_path(spec_path), display_path(config_path))
    check_shown_path(shown_spec, "spec")
    check_shown_path(shown_config, "config")
    if not regenerate.isprintable():
        raise MapgenError(f"the regenerate command {regenerate!r} must be printable (one line)")
    spec_text, spec_source = _source(spec_path, shown_spec)
    config_text, config_source = _source(config_path, shown_config)
    spec = parse_spec(spec_source.path, spec_text)
    if spec.unsupported is not None:
        raise SpecError([spec.unsupported.message(spec.hf_architecture)])
    model = choose_model(spec, model)
    # a vision-language config (Qwen3.5's published one) is read as its text model's: `nested`
    config = text_view(spec.hf_architecture, read_hf_config(config_source.path, config_text))
    metadata: list[FieldPath] = []
    dims = translate(spec, config, ignored, metadata)
    if metadata and notes is not None:
        notes.append(metadata_note(config.path, metadata))
    check_model_type(spec, config)
    mtp = mtp_layers(spec, config, dims)
    try:
        hf = hf_inventory(
            spec.hf_architecture, without_fields(config.fields, metadata), stacked_experts=stacked,
            extra_layers=mtp.transformers_layers() if mtp else (),
        )
    except Exception as exc:  # what transformers raises for a config it cannot build varies
        raise SpecError(
            [
                f"{Location(spec.path, 1, 1)}: transformers cannot build {spec.hf_architecture} "
                f"from {config.path}: {type(exc).__name__}: {_first_line(exc)}"
            ]
        ) from None
    if model == "llava":
        from mapgen.compiler.llava_model import published_hf_names, llava_problems

        if problems := llava_problems(dims):
            raise SpecError([f"{Location(spec.path, 1, 1)}: {p}" for p in problems])
        # the tower's layers past the feature layer, and its post-norm, are built by transformers
        # but read by nothing: the spec declares them ignored (IGNORED_HF), not mapped
        unused = tuple(prefix for prefix, _ in _ignored_hf(spec, config, dims, ()))
        hf = tuple(t for t in published_hf_names(hf) if not t.name.startswith(unused))
    try:
        megatron = megatron_inventory(dims, layout, model)
    except MapgenError:
        raise
    except Exception as exc:  # megatron-core asserts what it cannot build
        raise SpecError(
            [
                f"{Location(spec.path, 1, 1)}: megatron-core cannot build the model of {config.path} "
                f"(dims from spec {spec.path}): {type(exc).__name__}: {_first_line(exc)}"
            ]
        ) from None
    hf, hf_copies, hf_prefixes = _with_mtp_tensors(spec, config, dims, hf, mtp)
    mappings = expand(
        spec, config, dims, layout, megatron, hf, fused_experts=stacked,
        mtp_hf_layer=mtp.hf_layer if mtp else None, mtp_number=mtp.own_number if mtp else None,
        copies=frozenset(hf_copies), hf_prefixes=hf_prefixes,
    )
    ignored_hf = _ignored_hf(spec, config, dims, hf)
    target = Target(
        name=name,
        family=spec.family,
        hf_architecture=spec.hf_architecture,
        layout=layout,
        model=model,
        spec=spec_source,
        config=config_source,
        dims=dims,
        mappings=mappings,
        hf_tensors=hf,
        ignored_hf=ignored_hf,
        hf_copies=tuple(hf_copies.items()),
        hf_namings=spec.hf_namings,
    )
    header = [
        "@generated by mapgen. DO NOT EDIT: change the spec or the config and rebuild.",
        f"Target: {name} ({layout} layout"
        + (", HybridModel" if model == "hybrid" else ", LLaVAModel" if model == "llava" else "")
        + (", HF experts stacked)" if stacked else ")"),
        f"Spec:   {spec_source.path} sha256:{spec_source.sha256}",
        f"Config: {config_source.path} sha256:{config_source.sha256}",
        f"Regenerate: {regenerate}",
    ]
    return target, header


def metadata_note(config_path: str, fields: list[FieldPath]) -> str:
    """The one note line of a build whose config holds metadata fields."""
    names = ", ".join(".".join(keys) for keys in fields)
    return (
        f"note: {config_path}: {names} {'is' if len(fields) == 1 else 'are'} defined by no transformers config "
        "class: taken for tool metadata, not read"
    )


def _checked_source(source: str, what: str, formatted: bool) -> str:
    with gcpause.paused():  # the syntax tree of a large module is millions of objects
        tree = check(source, what)
        formatted_source = format_source(source, tree) if formatted else source
        del tree
    return formatted_source


def compile_target(
    name: str,
    spec_path: Path,
    config_path: Path,
    layout: str,
    regenerate: str,
    shown_paths: tuple[str, str] | None = None,
    formatted: bool = True,
    hf_experts: str = "per_expert",
    model: str | None = None,
    *,
    ignore_config_fields: tuple[str, ...] = (),
    notes: list[str] | None = None,
) -> str:
    """One module's source text (the one-file form: `mapgen build ... -o OUT.py`); the
    arguments as `build_target`'s, and `formatted=False` returns the template's output as it
    goes into black."""
    target, header = build_target(
        name, spec_path, config_path, layout, regenerate, shown_paths, hf_experts, model,
        ignore_config_fields=ignore_config_fields, notes=notes,
    )
    return _checked_source(render(target, header), name, formatted)


def compile_package(
    name: str,
    spec_path: Path,
    config_path: Path,
    layout: str,
    regenerate: str,
    shown_paths: tuple[str, str] | None = None,
    hf_experts: str = "per_expert",
    model: str | None = None,
    experts_per_part: int = EXPERTS_PER_PART,
    *,
    ignore_config_fields: tuple[str, ...] = (),
    notes: list[str] | None = None,
) -> dict[str, str]:
    """The target as a package: file name -> source (`__init__.py` and one file per part; a
    layer with more experts than `experts_per_part` has them cut in ranges of that many)."""
    target, header = build_target(
        name, spec_path, config_path, layout, regenerate, shown_paths, hf_experts, model,
        ignore_config_fields=ignore_config_fields, notes=notes,
    )
    files = render_package(target, header, experts_per_part)
    return {file: _checked_source(text, f"{name}/{file}", True) for file, text in files.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def check_model_type(spec: Spec, config: HFConfig) -> None:
    """The config's model_type must be the one of the spec's architecture (transformers builds
    the model from model_type's config class, with the architecture's class), or one
    transformers does not know, of a checkpoint that brings its own copy of that config class
    (`own_config_class`: Kimi-K2's kimi_k2)."""
    wanted = architecture_model_type(spec.hf_architecture)
    model_type = config.fields.get("model_type")
    if model_type is None:
        raise SpecError([f"{Location(config.path, 1, 1)}: config has no 'model_type'" + (f" (for {spec.hf_architecture}: {wanted!r})" if wanted else "")])
    if wanted is not None and model_type != wanted and not own_config_class(spec.hf_architecture, config.fields):
        given = "its architectures" if config.architectures else f"spec {spec.path}'s hf_architecture"
        raise SpecError(
            [
                f"{config.where('model_type')}: config field 'model_type' is {model_type!r}, which contradicts "
                f"{given}: {spec.hf_architecture} is a {wanted!r} model"
            ]
        )


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


def _with_mtp_tensors(
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
    layers = [(m, t) for t in hf if (m := _HF_LAYER.match(t.name)) is not None]
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
            layer = _HF_LAYER.match(tensor.name)
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
    main = [t for t in hf if (m := _HF_LAYER.match(t.name)) is None or int(m.group(2)) not in own_layers]
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


def _ignored_hf(spec: Spec, config: HFConfig, dims: ModelDims, hf: tuple[HFTensor, ...]) -> tuple[tuple[str, str], ...]:
    """(prefix, why) of each `ignore_hf` entry; a prefix must not cover a tensor the
    architecture has, which the rules map."""
    errors = ErrorSink()
    found: list[tuple[str, str]] = []
    for entry in spec.ignore_hf:
        expr = entry.prefix
        ok, prefix = evaluate_reported(
            lambda: evaluate_in_context(expr, dims, config), errors, entry.loc, "ignore_hf.prefix", expr, config
        )
        if not ok:
            continue
        if not isinstance(prefix, str) or not prefix:
            errors.add(entry.loc, f"ignore_hf.prefix '{entry.prefix}' gives {prefix!r}, not a name prefix")
            continue
        covered = [t.name for t in hf if t.name.startswith(prefix)]
        if covered:
            errors.add(entry.loc, f"ignore_hf.prefix '{prefix}' covers tensors the rules map: {', '.join(covered[:5])}")
            continue
        found.append((prefix, entry.why))
    errors.raise_if_any()
    return tuple(found)


@dataclass(frozen=True)
class Skipped:
    """A target the installed megatron-core cannot build (`NeedsNewerMegatronCore`), and why."""

    reason: str


Package = dict[str, str]  # a target package: file name -> source


def _timed_compile(root: Path, entry: TargetEntry) -> tuple[Package | Skipped, float, list[str]]:
    quiet_libraries()  # in a worker process of its own
    started = time.perf_counter()
    notes: list[str] = []
    try:
        files: Package | Skipped = compile_entry(root, entry, notes)
    except NeedsNewerMegatronCore as exc:
        files = Skipped(str(exc))
    return files, time.perf_counter() - started, notes


def compile_entries(
    root: Path, entries: list[TargetEntry]
) -> Iterator[tuple[TargetEntry, Package | Skipped, float, list[str]]]:
    """(entry, its package's files, seconds, the build's note lines) for each entry, in order,
    built two at a time in processes of their own (the large MoE targets take tens of seconds
    each). A target this megatron-core cannot build gives `Skipped` (a later release can: the
    list serves every supported stack)."""
    if len(entries) < 2:
        for entry in entries:
            yield (entry, *_timed_compile(root, entry))
        return
    def previous_size(entry: TargetEntry) -> int:  # the largest (slowest) ones start first
        folder = root / entry.output
        return sum(f.stat().st_size for f in folder.glob("*.py")) if folder.is_dir() else 0

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        futures = {e.name: pool.submit(_timed_compile, root, e) for e in sorted(entries, key=previous_size, reverse=True)}
        for entry in entries:
            yield (entry, *futures[entry.name].result())


def compile_entry(root: Path, entry: TargetEntry, notes: list[str] | None = None) -> Package:
    return compile_package(
        entry.name,
        root / entry.spec,
        root / entry.config,
        entry.layout,
        "mapgen build",
        (entry.spec, entry.config),
        model=entry.model,
        notes=notes,
    )
