"""The module a command runs on CPU: the module file a GENERATED argument names, and a te-layout
module's local-layout twin, built for the checkpoint's config into a scratch folder that a killed
run's successor removes (`mapgen verify`, `mapgen convert`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mapgen.common.errors import MapgenError
from mapgen.common.files import module_label
from mapgen.compiler.packaged import find_root, module_spec


def find_module_file(generated: str) -> Path:
    """The module file GENERATED names: a one-file module, a target package's `__init__.py` (the
    package folder given), a target of generated/ here, or an importable module."""
    path = Path(generated)
    if path.is_file():
        return path
    if path.is_dir() and (path / "__init__.py").is_file():
        return path / "__init__.py"
    if generated.isidentifier():  # a target of the repository here (generated/ is not installed)
        try:
            folder = find_root(Path.cwd()) / "generated"
        except MapgenError:
            folder = None
        for checked_in in ([folder / generated / "__init__.py", folder / f"{generated}.py"] if folder else []):
            if checked_in.is_file():
                return checked_in
    import importlib.util

    try:
        found = importlib.util.find_spec(generated if "." in generated else f"generated.{generated}")
    except ModuleNotFoundError:  # its package is not importable
        found = None
    if found is None or found.origin is None:
        raise MapgenError(
            f"{generated}: neither a file, a target in generated/ of a repository here, nor an importable module"
        )
    return Path(found.origin)




def local_twin(
    module_file: Path, config: Path, folder: Path, say: Callable[[str], None], note: Callable[[str], None]
) -> Path:
    """A te-layout module is checked through the local-layout module of the same spec for the
    checkpoint's config (`config`, the user's file): TransformerEngine does not run on CPU. The
    twin is written into `folder` (temporary); `say` is told the phase, `note` a remark."""
    from mapgen.compiler.build import compile_target, recorded_ignored_fields

    from mapgen.verify.inputs import config_problems, load_mapping_module

    say(f"importing {module_file}")
    module = load_mapping_module(module_file)
    ignored = recorded_ignored_fields(module_file)  # what it was built to accept, the twin too
    if module.LAYOUT == "local":
        # the module was built from some config; the one beside the weights must give the same
        # model, or transformers' reference is another model (a te module's twin is built from it)
        try:
            spec = module_spec(module_file, module.SOURCES[0])
        except (MapgenError, AttributeError, IndexError, TypeError):
            note(f"note: the spec of {module_file} is not found; {config} is not compared with its DIMS")
            return module_file
        if problems := config_problems(module, spec, config, ignored):
            raise MapgenError(f"{config} does not describe the model {module_file} maps:\n  " + "\n  ".join(problems))
        return module_file
    spec = module_spec(module_file, module.SOURCES[0])
    twin = folder / f"{module_label(module_file)}_local.py"
    say(f"building the local-layout twin of {module_label(module_file)} for {config}")  # TE does not run on CPU
    twin.write_text(
        compile_target(
            twin.stem, spec, config, "local", "mapgen verify (local twin)", model=getattr(module, "MODEL", "gpt"),
            ignore_config_fields=ignored,
        )
    )
    return twin


def shown_as_given(text: str, temporary: Path | None, names: dict[Path, Path]) -> str:
    """`text` with the files of the `temporary` folder named as the user knows them (`names`:
    the local twin -> the module given); any other path in it said to be temporary."""
    for path, given in names.items():
        for spelling in dict.fromkeys((str(path), os.path.realpath(path))):
            text = text.replace(spelling, str(given))
    for spelling in dict.fromkeys((str(temporary), os.path.realpath(temporary)) if temporary else ()):
        text = text.replace(spelling, "(mapgen's temporary folder)")
    return text


def scratch_folder(kind: str) -> Any:
    """A temporary folder for verify's and convert's local twin (`tempfile.TemporaryDirectory`),
    named `mapgen-KIND-HOST-PID-...`. A killed run cannot remove its own: the folders of this
    kind that this user's runs on this host left, whose process is gone, are removed first."""
    import shutil
    import tempfile

    from mapgen.common.files import host_tag, process_alive

    prefix = f"mapgen-{kind}-{host_tag()}-"
    try:
        left = [p for p in Path(tempfile.gettempdir()).glob(f"{prefix}*") if p.is_dir() and p.stat().st_uid == os.getuid()]
    except OSError:
        left = []
    for folder in left:
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")
