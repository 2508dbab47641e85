"""The `mapgen` command line: build and check generated modules (verify comes with the runtime)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mapgen.build import TARGETS_FILE, compile_entry, compile_target, display_path, read_targets
from mapgen.errors import MapgenError
from mapgen.inventory import LAYOUTS
from mapgen.write import stale_diff, write_if_changed

err = Console(stderr=True, highlight=False, soft_wrap=True)


def find_root(start: Path) -> Path:
    for folder in (start, *start.parents):
        if (folder / TARGETS_FILE).is_file():
            return folder
    raise MapgenError(f"no {TARGETS_FILE} in {start} or any folder above it")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


@click.group()
def main() -> None:
    """mapgen: compile static HF <-> Megatron-Core weight-mapping modules."""
    # megatron-core warns at import about optional CUDA packages (Apex, TE) a CPU build lacks
    warnings.filterwarnings("ignore", module=r"(megatron|transformers|torch)(\.|$)")


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Module file to write.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="te", show_default=True,
              help="Megatron naming: te (TransformerEngine, what GPU users run) or local.")
@click.option("--name", help="Target name in the module (default: the output file's stem).")
def build(
    spec: str | None, config: str | None, output: str | None, layout: str, name: str | None
) -> None:
    """Build every target in specs/targets.yaml, or SPEC + CONFIG into -o OUTPUT."""
    try:
        if spec is None and config is None:
            _build_all()
        elif spec is None or config is None or output is None:
            raise click.UsageError("give SPEC, CONFIG and -o OUTPUT together, or none of them")
        else:
            _build_one(Path(spec), Path(config), Path(output), layout, name)
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)


def _build_one(spec: Path, config: Path, output: Path, layout: str, name: str | None) -> None:
    target = name or output.stem
    command = (
        f"mapgen build {display_path(spec)} {display_path(config)} -o {display_path(output)}"
        f" --layout {layout}" + (f" --name {name}" if name else "")
    )
    started = time.perf_counter()
    source = compile_target(target, spec, config, layout, command)
    written = write_if_changed(output, source)
    seconds = time.perf_counter() - started
    state = "wrote" if written else "unchanged"
    err.print(f"{state} {display_path(output)} ({len(source.encode())} bytes, {seconds:.1f} s)", markup=False)


def _build_all() -> None:
    root = find_root(Path.cwd())
    entries = read_targets(root)
    with _progress() as progress:
        task = progress.add_task("mapgen build", total=len(entries))
        for entry in entries:
            progress.update(task, description=f"building {entry.name}")
            started = time.perf_counter()
            source = compile_entry(root, entry)
            written = write_if_changed(root / entry.output, source)
            seconds = time.perf_counter() - started
            state = "wrote" if written else "unchanged"
            progress.console.print(
                f"{state} {entry.output} ({len(source.encode())} bytes, {seconds:.1f} s)",
                markup=False,
            )
            progress.advance(task)


@main.command(name="check")
def check_command() -> None:
    """Exit 1 with a diff when generated/ differs from what the specs and configs give."""
    try:
        root = find_root(Path.cwd())
        entries = read_targets(root)
        stale: list[str] = []
        with _progress() as progress:
            task = progress.add_task("mapgen check", total=len(entries))
            for entry in entries:
                progress.update(task, description=f"checking {entry.name}")
                diff = stale_diff(root / entry.output, compile_entry(root, entry), entry.output)
                if diff:
                    stale.append(entry.output)
                    sys.stdout.write(diff)
                progress.advance(task)
        expected = {root / entry.output for entry in entries} | {root / "generated/__init__.py"}
        extra = sorted(
            p.relative_to(root).as_posix()
            for p in (root / "generated").glob("*.py")
            if p not in expected
        )
        for path in extra:
            sys.stdout.write(f"{path}: not built from any target in {TARGETS_FILE}\n")
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    if stale or extra:
        fix = "mapgen build" + (f" && git rm {' '.join(extra)}" if extra else "")
        err.print(f"generated/ is stale ({len(stale) + len(extra)} file(s)); fix with: {fix}", markup=False)
        sys.exit(1)
    err.print(f"generated/ is up to date ({len(entries)} targets)", markup=False)


if __name__ == "__main__":
    main()
