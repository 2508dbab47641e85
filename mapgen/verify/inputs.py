"""The inputs of `mapgen verify` and `mapgen convert` checked before any process starts.

The module file, the HF checkpoint and config.json; each says what is wrong in the user's terms (a MapgenError, or a list of problems), not with the
traceback a rank would give once the processes run. The layout against the module's DIMS is
`jobs.layout_problems`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from mapgen.common.errors import MapgenError
from mapgen.common.files import module_label
from mapgen.runtime.checkpoint import HFCheckpoint

VERIFY_FIELDS = ("LAYOUT", "MODEL", "DIMS")  # what verify needs beyond what every conversion needs


def load_mapping_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a generated module from its file; a file that is not one is a MapgenError saying
    why (not Python, fails to import, lacks what a mapping module has), not a traceback."""
    from mapgen.runtime.module_check import module_problems
    from mapgen.runtime.package import import_path

    file = Path(path)
    if file.is_dir() and (file / "__init__.py").is_file():  # a target package
        file = file / "__init__.py"
    if not file.is_file():
        raise MapgenError(f"{file}: no such file")
    if file.suffix != ".py":
        raise MapgenError(f"{file}: not a mapgen mapping module: not a Python file (.py)")
    module_name = name or f"mapgen_verify_{''.join(c if c.isalnum() else '_' for c in module_label(file))}"
    try:
        module = import_path(file, module_name)
    except SyntaxError as exc:
        raise MapgenError(f"{file}:{exc.lineno}:{exc.offset}: not a mapgen mapping module: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the file does when imported
        older = (isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("mapgen.")) or (
            isinstance(exc, TypeError) and ("ParamPlan" in str(exc) or "RulePlan" in str(exc))
        )
        hint = "; it was built by another mapgen version: rebuild it (its header's Regenerate line)" if older else ""
        raise MapgenError(
            f"{file}: not a mapgen mapping module: importing it raised {type(exc).__name__}: {exc}{hint}"
        ) from None
    problems = module_problems(module)
    lacking = [field for field in VERIFY_FIELDS if not hasattr(module, field)]
    if lacking:
        problems.append(f"lacks {', '.join(lacking)}")
    if problems:
        raise MapgenError(f"{file}: not a mapgen mapping module (mapgen build writes them): it {'; '.join(problems)}")
    return module


def hf_problems(module: ModuleType, folder: str | Path) -> list[str]:
    """The HF checkpoint in `folder` against the module: config.json's architecture, the
    safetensors headers and index against the module's HF table (verify and convert share it)."""
    from mapgen.compiler.nested import text_architecture_of
    from mapgen.runtime.checkpoint_checks import checkpoint_problems, open_checkpoint

    found: list[str] = []
    config = Path(folder) / "config.json"
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except OSError as exc:
        found.append(f"{config}: cannot read: {exc.strerror}")
    except (UnicodeDecodeError, ValueError) as exc:
        found.append(f"{config}: not JSON: {exc}")
    else:
        architectures = fields.get("architectures") if isinstance(fields, dict) else None
        if not isinstance(fields, dict):
            found.append(f"{config}: a config.json must hold a JSON object")
        elif (
            isinstance(architectures, list) and architectures and module.HF_ARCHITECTURE not in architectures
            # a vision-language model around it (Qwen3.5's published checkpoint): mapgen.compiler.nested
            and not any(text_architecture_of(str(a), module.HF_ARCHITECTURE) for a in architectures)
        ):
            found.append(f"{config}: architectures is {architectures}, {module.TARGET} maps {module.HF_ARCHITECTURE}")
    try:
        checkpoint = open_checkpoint(module, folder)  # as Converter.load reads it
        if (contradiction := quantization_contradiction(checkpoint, config)) is not None:
            return found + [contradiction]  # what follows from it would only repeat it per tensor
        found += [f"{folder}: {problem}" for problem in checkpoint_problems(module, checkpoint)]
    except MapgenError as exc:
        found.append(str(exc))
    return found


def quantization_contradiction(checkpoint: HFCheckpoint, config: Path) -> str | None:
    """config.json's `quantization_config.quant_method` against the tensors the files hold:
    another method (mxfp4) over FP8 tensors with block scales, or fp8 over MXFP4 blocks and no
    FP8 tensor, said once, naming both."""
    from mapgen.runtime.checkpoint import FP8

    quantization = checkpoint.config.get("quantization_config") if isinstance(checkpoint.config, dict) else None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method is None:
        return None
    names = checkpoint.names()
    fp8 = [n for n in names if checkpoint.dtype(n) in FP8]
    scales = checkpoint.scale_names()
    blocks = checkpoint.mxfp4_names() or [n for n in names if n.endswith("_blocks") and checkpoint.dtype(n) == "U8"]
    if method != "fp8" and fp8 and scales:
        return (
            f"{config}: quantization_config.quant_method is {method!r}, but the checkpoint's tensors are FP8 with "
            f"block scales ({len(fp8)} F8 tensors, such as '{fp8[0]}' with '{scales[0]}'): config.json does not "
            "describe these files (an FP8 checkpoint says quant_method 'fp8')"
        )
    if method == "fp8" and blocks and not fp8:
        return (
            f"{config}: quantization_config.quant_method is 'fp8', but the checkpoint holds no FP8 tensor and "
            f"{len(blocks)} MXFP4 ones (such as '{blocks[0]}'): config.json does not describe these files"
        )
    return None


def config_problems(module: ModuleType, spec_path: Path, config_path: Path, ignored: tuple[str, ...] = ()) -> list[str]:
    """`config_path` (the config.json beside the weights) against the module built from
    `spec_path`: the model dims the spec derives from it must be the module's DIMS, or the
    reference transformers builds from it is another model than the one imported. `ignored`:
    the config fields the module was built to accept (`--ignore-config-field`)."""
    from dataclasses import fields as dataclass_fields

    from mapgen.compiler.config import translate
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.common.errors import SpecError
    from mapgen.compiler.spec import parse_spec

    try:
        spec = parse_spec(str(spec_path), spec_path.read_text(encoding="utf-8"))
        config = read_hf_config(str(config_path), config_path.read_text(encoding="utf-8"))
        dims = translate(spec, config, frozenset(ignored))
    except SpecError as exc:
        return list(exc.messages)
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{config_path}: cannot read: {exc}"]
    expressions = {d.name: str(d.expr) if d.expr is not None else repr(d.literal) for d in spec.dims}
    found = []
    for field in dataclass_fields(dims):
        ours, theirs = getattr(dims, field.name), getattr(module.DIMS, field.name)
        if ours != theirs:
            source = f" (dims.{field.name} = {expressions[field.name]} in {spec_path})" if field.name in expressions else ""
            found.append(f"{config_path}: gives {field.name} {ours!r}{source}, but {module.TARGET} was built with {theirs!r}")
    return found
