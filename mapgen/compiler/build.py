"""The orchestrator: spec + config -> formatted module source (one file, or a package's files).

The checked-in target list and its batch build are `mapgen.compiler.targets`'."""

from __future__ import annotations

import hashlib
import keyword
import os
import re
import stat
from pathlib import Path

from mapgen.compiler.config import FieldPath, translate, without_fields
from mapgen.compiler.hfconfig import HFConfig, evaluate_in_context, evaluate_reported, read_hf_config
from mapgen.common.dims import ModelDims
from mapgen.common.errors import ErrorSink, Location, MapgenError, SpecError
from mapgen.compiler.expand import expand
from mapgen.compiler.format import format_source
from mapgen.compiler.hf_tensors import architecture_model_type, hf_inventory, own_config_class
from mapgen.compiler.inventory import HFTensor
from mapgen.compiler.ir import Source, Target
from mapgen.compiler.model_classes import MODELS
from mapgen.compiler.mtp import with_mtp_tensors, mtp_layers
from mapgen.compiler.nested import text_view
from mapgen.common.limits import MAX_INPUT_BYTES
from mapgen.common.layout import HF_EXPERTS, MODEL_CLASSES
from mapgen.compiler.packaged import folder
from mapgen.common import gcpause
from mapgen.compiler.postprocess import check
from mapgen.compiler.render import EXPERTS_PER_PART, render, render_package
from mapgen.compiler.spec import Spec, parse_spec
from mapgen.compiler.write import file_kind

# a config field name `mapgen build --ignore-config-field` takes: it is written, as given, into
# the module's `# Regenerate:` line, which must rebuild the module as a shell command
IGNORABLE_FIELD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


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
    model_class = MODELS[model]
    if problems := model_class.problems(dims):
        raise SpecError([f"{Location(spec.path, 1, 1)}: {p}" for p in problems])
    hf = model_class.hf_tensors(hf, lambda: tuple(prefix for prefix, _ in _ignored_hf(spec, config, dims, ())))
    try:
        megatron = model_class.inventory(dims, layout)
    except MapgenError:
        raise
    except Exception as exc:  # megatron-core asserts what it cannot build
        raise SpecError(
            [
                f"{Location(spec.path, 1, 1)}: megatron-core cannot build the model of {config.path} "
                f"(dims from spec {spec.path}): {type(exc).__name__}: {_first_line(exc)}"
            ]
        ) from None
    hf, hf_copies, hf_prefixes = with_mtp_tensors(spec, config, dims, hf, mtp)
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
        + (f", {model_class.title}" if model_class.title else "")
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


