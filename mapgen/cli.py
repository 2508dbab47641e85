"""The `mapgen` command line: build and check generated modules (verify comes with the runtime)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mapgen import __version__
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mapgen.common.console import quiet_libraries
from mapgen.common.errors import MapgenError
from mapgen.common.layout import HF_EXPERTS, LAYOUTS, MODEL_CLASSES
from mapgen.compiler.packaged import TARGETS_FILE, find_root, specs_folder
from mapgen.standin import write_mxfp4_standin, write_standin
from mapgen.twin import find_module_file, local_twin, scratch_folder, shown_as_given
from mapgen.compiler.diff import diff_paths, diff_revision, report
from mapgen.compiler.write import (
    WrittenPackage,
    check_output,
    stale_diff,
    stale_files,
    write_if_changed,
    write_package,
)

F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True, highlight=False, soft_wrap=True)
RAW_DIFF_LINES = 400  # of each stale module's unified diff, after its summary


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _parallel_options(dp_help: str, uneven: bool = True) -> Callable[[F], F]:
    """The parallel layout flags every command that takes a layout shares (verify, explain,
    convert); `uneven`: also the first and last pipeline stages' layer counts."""
    options = [
        click.option("--tp", default=1, show_default=True),
        click.option("--pp", default=1, show_default=True),
        click.option("--vpp", default=1, show_default=True, help="Virtual pipeline stages per rank."),
        click.option("--ep", default=1, show_default=True),
        click.option("--etp", type=int, default=None, help="Expert-TP size (default: TP)."),
        click.option("--dp", type=int, default=None, help=dp_help),
    ]
    if uneven:
        options += [
            click.option("--first-stage-layers", type=int, help="Layers of the first pipeline stage (uneven PP)."),
            click.option("--last-stage-layers", type=int, help="Layers of the last pipeline stage (uneven PP)."),
        ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mapgen", message="%(prog)s %(version)s")
def main() -> None:
    """mapgen: compile static HF <-> Megatron-Core weight-mapping modules."""
    quiet_libraries()  # megatron-core's deprecation notices, optional-package warnings, ...


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Module file (OUT.py) or package folder to write (default: the package "
                   "generated/<NAME>/ under the current folder; NAME: --name, else the config file's stem).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="te", show_default=True,
              help="Megatron naming: te (TransformerEngine, what GPU users run) or local.")
@click.option("--name", help="Target name in the module (default: the output's stem, or the config file's).")
@click.option("--hf-experts", type=click.Choice(HF_EXPERTS), default="per_expert", show_default=True,
              help="How the HF checkpoint stores MoE experts: one tensor per expert, or stacked.")
@click.option("--model", "model_class", type=click.Choice(MODEL_CLASSES), default=None,
              help="megatron-core model class: GPTModel, HybridModel (attention and MLP as layers of their "
                   "own) or LLaVAModel (default: the first of the spec's `models`; gpt if it states none).")
@click.option("--ignore-config-field", "ignore_config_fields", metavar="NAME", multiple=True,
              help="Accept config field NAME (a.b for a nested one) though the spec does not read it "
                   "(repeatable; recorded in the module's Regenerate line). A field no transformers config "
                   "class defines is taken for tool metadata without it.")
def build(
    spec: str | None, config: str | None, output: str | None, layout: str, name: str | None, hf_experts: str,
    model_class: str | None, ignore_config_fields: tuple[str, ...],
) -> None:
    """Build every target in specs/targets.yaml, or SPEC + CONFIG into -o OUTPUT (default:
    generated/<config file stem>/)."""
    try:
        if spec is None and config is None:
            if output is not None or name is not None or model_class is not None or ignore_config_fields:
                raise click.UsageError("-o, --name, --model and --ignore-config-field need SPEC and CONFIG")
            _build_all()
        elif spec is None or config is None:
            raise click.UsageError(
                "give SPEC and CONFIG together (and -o OUTPUT, or it is generated/<config file stem>/), or none of them"
            )
        else:
            _build_one(Path(spec), Path(config), output, layout, name, hf_experts, model_class, ignore_config_fields)
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        if hint := _ignore_hint(exc):
            err.print(hint, markup=False)
        sys.exit(2)


def _ignore_hint(exc: MapgenError) -> str:
    """The line after a refusal of config fields the spec does not read: the explicit escape."""
    from mapgen.compiler.config import UNKNOWN_FIELD

    refused = re.findall(rf"config field '([^']+)' {UNKNOWN_FIELD} ", str(exc))
    if not refused:
        return ""
    names = list(dict.fromkeys(refused))
    flags = " ".join(f"--ignore-config-field {name}" for name in names)
    it = "it" if len(names) == 1 else "them"
    return (
        f"hint: transformers defines {'this field' if len(names) == 1 else 'these fields'}, so mapgen takes {it} "
        f"for architecture (docs/config-fields.md); if the model does not depend on {it}, build with {flags}"
    )


def _build_one(
    spec: Path, config: Path, given_output: str | None, layout: str, name: str | None, hf_experts: str,
    model_class: str | None, ignore_config_fields: tuple[str, ...],
) -> None:
    from mapgen.compiler.build import (
        check_ignored_names, check_target_name, compile_package, compile_target, display_path,
    )

    check_ignored_names(ignore_config_fields)
    output = Path(given_output) if given_output is not None else Path("generated") / (name or config.stem)
    single = output.suffix == ".py"  # OUT.py: one module; otherwise a package folder
    target = name or (output.stem if single else output.name)
    check_target_name(target)
    if single:
        check_output(output)  # before a build that may take a minute
    command = (
        f"mapgen build {display_path(spec)} {display_path(config)} -o {display_path(output)}"
        f" --layout {layout}" + (f" --name {name}" if name else "")
        + (f" --hf-experts {hf_experts}" if hf_experts != "per_expert" else "")
        + (f" --model {model_class}" if model_class not in (None, "gpt") else "")
        + "".join(f" --ignore-config-field {field}" for field in dict.fromkeys(ignore_config_fields))
    )
    notes: list[str] = []  # the build's note on the config's metadata fields
    options: dict[str, Any] = {"hf_experts": hf_experts, "model": model_class, "notes": notes,
                               "ignore_config_fields": ignore_config_fields}
    started = time.perf_counter()
    with err.status(f"building {target} from {display_path(spec)} and {display_path(config)}"):  # transient
        if single:
            source = compile_target(target, spec, config, layout, command, **options)
        else:
            files = compile_package(target, spec, config, layout, command, **options)
    seconds = time.perf_counter() - started
    for note in notes:
        err.print(note, markup=False)
    if single:
        written = write_if_changed(output, source)
        for folder in written.created:
            err.print(f"created folder {display_path(folder)}", markup=False)
        state = "wrote" if written else "unchanged"
        err.print(f"{state} {display_path(output)} ({len(source.encode())} bytes, {seconds:.1f} s)", markup=False)
        return
    package = write_package(output, files)
    for folder in package.created:
        err.print(f"created folder {display_path(folder)}", markup=False)
    _report_package(err, display_path(output), files, package, seconds)


def _report_package(console: Any, shown: str, files: dict[str, str], package: WrittenPackage, seconds: float) -> None:
    from mapgen.compiler.build import display_path

    for path in package.removed:
        console.print(f"removed {display_path(path)}", markup=False)
    size = sum(len(text.encode()) for text in files.values())
    state = f"wrote {len(package.written)} of" if package.written else "unchanged,"
    console.print(f"{state} {shown}/ ({len(files)} files, {size} bytes, {seconds:.1f} s)", markup=False)


def _build_all() -> None:
    from mapgen.compiler.targets import Skipped, compile_entries, read_targets

    root = find_root(Path.cwd())
    entries = [e for e in read_targets(root) if e.checked_in]
    with _progress() as progress:
        task = progress.add_task("mapgen build", total=len(entries))
        for entry, files, seconds, notes in compile_entries(root, entries):
            for note in notes:
                progress.console.print(note, markup=False)
            if isinstance(files, Skipped):  # left as it is: a later megatron-core builds it
                progress.console.print(f"skipped {entry.output} (target {entry.name}): {files.reason}", markup=False)
                progress.advance(task)
                continue
            progress.update(task, description=f"built {entry.name}")
            package = write_package(root / entry.output, files)
            for folder in package.created:
                progress.console.print(f"created folder {folder.relative_to(root).as_posix()}", markup=False)
            _report_package(progress.console, entry.output, files, package, seconds)
            progress.advance(task)


def summary_of_package(folder: Path, files: dict[str, str], shown: str) -> list[str]:
    """`mapgen diff`'s summary of a checked-in package against its rebuild (or why there is none)."""
    from mapgen.compiler.diff import summarize_builds
    from mapgen.compiler.diffread import package_texts

    try:
        return summarize_builds(package_texts(folder) if folder.is_dir() else None, files, shown)
    except MapgenError as exc:
        return [f"{shown}: {exc}"]


@main.command(name="check")
def check_command() -> None:
    """Exit 1 when generated/ differs from what the specs and configs give: for each stale module,
    what changed grouped by rule (as `mapgen diff` says it), then the unified diff."""
    from mapgen.compiler.targets import Skipped, compile_entries, read_targets

    try:
        root = find_root(Path.cwd())
        entries = [e for e in read_targets(root) if e.checked_in]
        stale: list[str] = []
        skipped: list[str] = []
        with _progress() as progress:
            task = progress.add_task("mapgen check", total=len(entries))
            for entry, source, _, _ in compile_entries(root, entries):
                if isinstance(source, Skipped):  # not checked: this megatron-core cannot build it
                    skipped.append(entry.output)
                    progress.console.print(
                        f"skipped {entry.output} (target {entry.name}), not checked: {source.reason}", markup=False
                    )
                    progress.advance(task)
                    continue
                progress.update(task, description=f"checked {entry.name}")
                folder = root / entry.output
                diffs = {file: stale_diff(folder / file, text, f"{entry.output}/{file}", limit=RAW_DIFF_LINES)
                         for file, text in source.items()}
                leftovers = [p.relative_to(root).as_posix() for p in stale_files(folder, source)]
                if any(diffs.values()) or leftovers:  # what changed by rule, then a unified diff per file
                    sys.stdout.write(report([summary_of_package(folder, source, entry.output)]) + "\n")
                for file, diff in diffs.items():
                    if diff:
                        stale.append(f"{entry.output}/{file}")
                        sys.stdout.write(diff)
                for leftover in leftovers:
                    stale.append(leftover)
                    sys.stdout.write(f"{leftover}: not a part of target {entry.name}\n")
                progress.advance(task)
        expected = {root / entry.output for entry in entries} | {root / "generated/__init__.py"}
        extra = sorted(
            p.relative_to(root).as_posix()
            for p in (root / "generated").iterdir()
            if p not in expected and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
        )
        for path in extra:
            sys.stdout.write(f"{path}: not built from any target in {TARGETS_FILE}\n")
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    if stale or extra:
        fix = "mapgen build" + (f" && git rm -r {' '.join(extra)}" if extra else "")
        err.print(f"generated/ is stale ({len(stale) + len(extra)} file(s)); fix with: {fix}", markup=False)
        sys.exit(1)
    checked = len(entries) - len(skipped)
    err.print(
        f"generated/ is up to date ({checked} targets"
        + (f"; {len(skipped)} skipped, which this megatron-core cannot build: {', '.join(skipped)}" if skipped else "")
        + ")",
        markup=False,
    )


@main.command(name="diff")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--rev", metavar="REV", help="Compare PATHS of the working tree (default: generated/) with git revision REV.")
def diff_command(paths: tuple[str, ...], rev: str | None) -> None:
    """What changed between two builds, grouped by rule: OLD NEW (two target packages, two
    modules, a module and a package, or two folders whose targets are paired by name), or
    --rev REV [PATHS...] (the working tree against REV). Exit status 0: no difference, 1:
    differences, 2: an error (an input that is not a whole generated module or package)."""
    try:
        if rev is not None:
            sections = list(diff_revision(rev, [Path(p) for p in paths], Path.cwd()))
        elif len(paths) == 2:
            sections = list(diff_paths(Path(paths[0]), Path(paths[1])))
        else:
            raise click.UsageError("give OLD and NEW (two files or two folders), or --rev REV [PATHS...]")
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    sys.stdout.write(report(sections))
    sys.exit(1 if any(sections) else 0)


def _is_first_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


VOCAB_DEFAULT = 128  # Megatron-LM's --make-vocab-size-divisible-by


@main.command()
@click.argument("generated")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@_parallel_options("Data-parallel replicas (default: EP, at least 1).")
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=VOCAB_DEFAULT, show_default=True,
              help="Build the model with the vocabulary padded to a multiple of this x TP, as "
                   "Megatron-LM does (the default is Megatron-LM's; 1: no padding beyond TP).")
def verify(generated: str, hf_dir: str, tp: int, pp: int, vpp: int, ep: int, etp: int | None,
           dp: int | None, first_stage_layers: int | None, last_stage_layers: int | None,
           make_vocab_size_divisible_by: int) -> None:
    """Import HF_DIR through GENERATED on CPU processes, compare logits with transformers and
    the exported tensors with the checkpoint's bytes. GENERATED: a file or a module name. The
    model is built in the checkpoint's dtype; transformers runs in it too. Its phases are shown
    on stderr (a line each where stderr is not a terminal)."""
    from mapgen.common.console import Phases
    from mapgen.common.parallel import ParallelLayout, size_problems

    dp = max(ep, 1) if dp is None else dp
    sizes: dict[str, int | None] = dict(tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp, etp=etp, first_stage_layers=first_stage_layers,
                                        last_stage_layers=last_stage_layers,
                                        make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    names: dict[Path, Path] = {}
    temporary: Path | None = None  # the local twin's folder, once made
    phases = Phases("verify", enabled=_is_first_rank(), console=err)
    try:
        module_file = find_module_file(generated)
        if problems := size_problems(sizes):  # before torch is imported: seconds
            raise MapgenError(f"cannot verify {module_file} on {hf_dir}:\n  " + "\n  ".join(problems))
        with scratch_folder("verify") as folder, phases:  # phases closed first
            temporary = Path(folder)
            phases("importing torch")
            from mapgen.verify.verdict import Job
            from mapgen.verify.jobs import verify as run_verify

            layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp, first_stage_layers=first_stage_layers,
                                    last_stage_layers=last_stage_layers)
            twin = local_twin(module_file, Path(hf_dir) / "config.json", temporary, phases, phases.note)
            if twin != module_file:
                names[twin] = module_file
            progress = temporary / "phases.txt"
            phases.follow(progress)
            job = Job(str(twin), hf_dir, layout, make_vocab_size_divisible_by, progress=str(progress), scratch=folder)
            (result,) = run_verify([job], layout.world_size, phase=phases)
    except MapgenError as exc:
        err.print(shown_as_given(str(exc), temporary, names), markup=False)
        sys.exit(2)
    if _is_first_rank():
        click.echo(shown_as_given(result.summary(), temporary, names))
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="The dtype of the saved weights (and config.json's dtype).")
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=1, show_default=True,
              help="Give the stand-in a vocabulary that Megatron-LM pads to a multiple of this x TP "
                   "(192 rows for 128; default: 128 rows).")
@click.option("--mxfp4-twin", "mxfp4_twin", type=click.Path(file_okay=False), default=None,
              help="Store the stand-in's stacked expert weights in MXFP4 (gpt-oss's published format) and "
                   "write its dequantized twin (the same model, unquantized) to this folder.")
def standin(
    config: str, out_dir: str, seed: int, dtype: str, make_vocab_size_divisible_by: int, mxfp4_twin: str | None
) -> None:
    """Save a tiny random stand-in (4 layers, hidden 64) of CONFIG's model to OUT_DIR, keeping
    what shapes the mapping: GQA or MQA, head_dim, tied embeddings, biases, rope scaling. The
    files are written into a hidden folder beside OUT_DIR and moved into it when complete; a
    missing OUT_DIR (and folders above it) is created."""
    from mapgen.compiler.megatron_config import DTYPES
    from mapgen.verify.testing import standin_vocab_size

    vocab_size = standin_vocab_size(make_vocab_size_divisible_by)
    try:
        created = write_standin(Path(config), Path(out_dir), seed, DTYPES[dtype], vocab_size)
        if mxfp4_twin is not None:
            write_mxfp4_standin(Path(config), Path(out_dir), Path(mxfp4_twin))
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    for folder in created:
        err.print(f"created folder {folder}", markup=False)
    err.print(f"wrote a tiny {dtype} stand-in of {config} (vocabulary {vocab_size}) to {out_dir}", markup=False)
    if mxfp4_twin is not None:
        err.print(f"stored its expert weights in MXFP4; its dequantized twin is in {mxfp4_twin}", markup=False)


@main.command(name="explain")
@click.argument("generated")
@click.argument("name")
@_parallel_options("Data-parallel replicas, for global rank numbers (default: EP, at least 1).")
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=VOCAB_DEFAULT, show_default=True,
              help="The vocabulary padded to a multiple of this x TP, as Megatron-LM does and as verify and "
                   "convert build the model (the default is Megatron-LM's).")
def explain_command(generated: str, name: str, tp: int, pp: int, vpp: int, ep: int, etp: int | None,
                    dp: int | None, first_stage_layers: int | None, last_stage_layers: int | None,
                    make_vocab_size_divisible_by: int) -> None:
    """Say how GENERATED maps NAME (a Megatron parameter or an HF tensor): the rule and its kind,
    the shapes, and under the layout which stage, EP rank and TP ranks hold which HF slices,
    and what export gathers. GENERATED: a file or a module name, as for verify."""
    from mapgen.common.parallel import ParallelLayout
    from mapgen.explain import explain
    from mapgen.verify.inputs import load_mapping_module

    dp = max(ep, 1) if dp is None else dp
    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp, first_stage_layers=first_stage_layers,
                            last_stage_layers=last_stage_layers, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    try:
        module_file = find_module_file(generated)
        if problems := layout.size_problems(flags=True):  # the limits verify and convert have, by flag
            raise MapgenError(f"cannot explain {name} of {module_file}:\n  " + "\n  ".join(problems))
        lines = explain(load_mapping_module(module_file), name, layout, module_file)
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    click.echo("\n".join(lines))


def _layout_options(command: Any) -> Any:
    """The flags of `mapgen convert`'s commands: the layout, the output dtype, --overwrite."""
    for option in reversed([
        _parallel_options("Data-parallel replicas (default: the fewest the layout takes).", uneven=False),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="The output's dtype (default: the input's)."),
        click.option("--overwrite", is_flag=True, help="Replace OUT_DIR once the new checkpoint is complete."),
    ]):
        command = option(command)
    return command


@main.group()
def convert() -> None:
    """HF checkpoints to and from megatron-core distributed checkpoints in Megatron-LM's layout
    (what its --ckpt-format torch_dist --load reads). The conversion runs on CPU processes over
    gloo (or the ones torchrun started); the Megatron checkpoint does not depend on the layout."""


def _run_convert(direction: str, generated: str, source: str, out_dir: str, layout_flags: dict[str, Any],
                 hf_config: str | None = None, **settings: Any) -> None:
    """Both directions: what is wrong with the arguments is said before torch is imported (a
    missing input, an output that exists, is the input or lies inside it, a size that is not
    positive); then the module's local twin, the conversion, the verdict."""
    from mapgen.common.parallel import ParallelLayout, size_problems, smallest_dp
    from mapgen.verify.arguments import folder_problems, output_problems

    flags = dict(layout_flags)
    if flags["dp"] is None:
        flags["dp"] = smallest_dp(flags["tp"], flags["ep"], flags["etp"])
    names: dict[Path, Path] = {}
    temporary: Path | None = None  # the local twin's folder, once made
    try:
        module_file = find_module_file(generated)
        problems = size_problems({**flags, "make_vocab_size_divisible_by": settings.get("make_vocab_size_divisible_by")})
        if direction == "megatron-to-hf":
            problems += folder_problems(Path(source), "give the folder Megatron-LM's --load takes")
        problems += output_problems(Path(out_dir), settings["overwrite"], Path(source))
        if problems:
            raise MapgenError(f"cannot convert {source} with {module_file}:\n  " + "\n  ".join(problems))
        config = Path(source) / "config.json"  # hf-to-megatron's, or the one recorded beside the checkpoint
        if direction == "megatron-to-hf" and hf_config is not None:
            config = Path(hf_config)
        elif direction == "megatron-to-hf" and not config.is_file():
            from mapgen.megatron_checkpoint import read_megatron_checkpoint

            read_megatron_checkpoint(source)  # says what is wrong with SOURCE, if anything
            raise MapgenError(
                f"{source}: no config.json beside the checkpoint (mapgen convert records one); give the "
                "model's HF config.json with --hf-config"
            )
        from mapgen.convert_job import ConvertJob
        from mapgen.convert import convert as run

        layout = ParallelLayout(**flags)
        with scratch_folder("convert") as folder:
            temporary = Path(folder)

            def note(text: str) -> None:
                if _is_first_rank():
                    err.print(text, markup=False)

            twin = local_twin(module_file, config, temporary, lambda phase: None, note)
            if twin != module_file:
                names[twin] = module_file
                note(f"converting through the local-layout twin of {module_file}, built for {config}")
            style = "local" if twin == module_file else "te"  # the tensor names of the module's layer spec
            try:
                fields = json.loads(config.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise MapgenError(f"{config}: not a JSON config: {exc}") from None
            job = ConvertJob(direction, str(twin), source, out_dir, layout, fields, key_style=style, **settings)
            result = run(job)
    except (MapgenError, OSError, ValueError) as exc:
        err.print(shown_as_given(str(exc), temporary, names), markup=False)
        sys.exit(2)
    if _is_first_rank():
        for created in result.created if result.error is None else []:
            err.print(f"created folder {created}", markup=False)
        err.print(shown_as_given(result.summary(), temporary, names), markup=False)
    sys.exit(0 if result.error is None else 2 if result.bad_input else 1)


@convert.command(name="hf-to-megatron")
@click.argument("generated")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path())
@_layout_options
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=VOCAB_DEFAULT, show_default=True,
              help="Pad the vocabulary to a multiple of this x TP, as Megatron-LM does (the default is "
                   "Megatron-LM's; give the value your training run uses): the checkpoint then loads at that TP.")
@click.option("--iteration", type=click.IntRange(min=0), default=None,
              help="Write iter_NNNNNNN/ for this iteration (default: release/, which Megatron-LM loads as "
                   "iteration 0 without optimizer or RNG state).")
def hf_to_megatron(generated: str, hf_dir: str, out_dir: str, dtype: str | None, overwrite: bool,
                   make_vocab_size_divisible_by: int, iteration: int | None, **layout: Any) -> None:
    """Import HF_DIR through GENERATED and write a megatron-core distributed checkpoint to
    OUT_DIR (latest_checkpointed_iteration.txt, release/, config.json, mapgen.json), atomically;
    missing folders above OUT_DIR are created."""
    _run_convert("hf-to-megatron", generated, hf_dir, out_dir, layout, dtype=dtype,
                 overwrite=overwrite, make_vocab_size_divisible_by=make_vocab_size_divisible_by, iteration=iteration)


@convert.command(name="megatron-to-hf")
@click.argument("generated")
@click.argument("ckpt_dir", type=click.Path())
@click.argument("out_dir", type=click.Path())
@_layout_options
@click.option("--hf-config", type=click.Path(exists=True, dir_okay=False),
              help="The model's HF config.json, for a checkpoint without one beside it.")
def megatron_to_hf(generated: str, ckpt_dir: str, out_dir: str, dtype: str | None, overwrite: bool,
                   hf_config: str | None, **layout: Any) -> None:
    """Load the Megatron-LM checkpoint folder CKPT_DIR (the one --load takes) into the model at
    any layout (megatron-core reshards it), export through GENERATED and write an HF checkpoint
    (sharded safetensors, index, config.json) to OUT_DIR, atomically; missing folders above
    OUT_DIR are created."""
    _run_convert("megatron-to-hf", generated, ckpt_dir, out_dir, layout, dtype=dtype,
                 overwrite=overwrite, hf_config=hf_config)


@main.command(name="specs")
def specs_command() -> None:
    """Print the folder of the family specs (<family>.yaml) and model configs (configs/) that
    come with mapgen: mapgen build "$(mapgen specs)/llama.yaml" CONFIG -o OUT.py."""
    try:
        click.echo(str(specs_folder()))
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
