"""The `mapgen` command line: build and check generated modules (verify comes with the runtime)."""

from __future__ import annotations

import hashlib
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
from mapgen.common.files import module_label, share_tree, temporary_folder
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mapgen.common.console import quiet_libraries
from mapgen.common.errors import MapgenError
from mapgen.common.layout import HF_EXPERTS, LAYOUTS, MODEL_CLASSES
from mapgen.compiler.packaged import TARGETS_FILE, specs_folder
from mapgen.compiler.diff import diff_paths, diff_revision, report, summarize_file
from mapgen.compiler.write import (
    WrittenPackage,
    check_output,
    existing_output,
    stale_diff,
    stale_files,
    write_if_changed,
    write_package,
)

F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True, highlight=False, soft_wrap=True)
RAW_DIFF_LINES = 400  # of each stale module's unified diff, after its summary


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
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Module file to write.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="te", show_default=True,
              help="Megatron naming: te (TransformerEngine, what GPU users run) or local.")
@click.option("--name", help="Target name in the module (default: the output file's stem).")
@click.option("--hf-experts", type=click.Choice(HF_EXPERTS), default="per_expert", show_default=True,
              help="How the HF checkpoint stores MoE experts: one tensor per expert, or stacked.")
@click.option("--model", "model_class", type=click.Choice(MODEL_CLASSES), default="gpt", show_default=True,
              help="megatron-core model class: GPTModel, or HybridModel (attention and MLP as layers of their own).")
def build(
    spec: str | None, config: str | None, output: str | None, layout: str, name: str | None, hf_experts: str,
    model_class: str,
) -> None:
    """Build every target in specs/targets.yaml, or SPEC + CONFIG into -o OUTPUT."""
    try:
        if spec is None and config is None:
            _build_all()
        elif spec is None or config is None or output is None:
            raise click.UsageError("give SPEC, CONFIG and -o OUTPUT together, or none of them")
        else:
            _build_one(Path(spec), Path(config), Path(output), layout, name, hf_experts, model_class)
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)


def _build_one(
    spec: Path, config: Path, output: Path, layout: str, name: str | None, hf_experts: str, model_class: str
) -> None:
    from mapgen.compiler.build import check_target_name, compile_package, compile_target, display_path

    single = output.suffix == ".py"  # OUT.py: one module; otherwise a package folder
    target = name or (output.stem if single else output.name)
    check_target_name(target)
    if single:
        check_output(output)  # before a build that may take a minute
    command = (
        f"mapgen build {display_path(spec)} {display_path(config)} -o {display_path(output)}"
        f" --layout {layout}" + (f" --name {name}" if name else "")
        + (f" --hf-experts {hf_experts}" if hf_experts != "per_expert" else "")
        + (f" --model {model_class}" if model_class != "gpt" else "")
    )
    started = time.perf_counter()
    with err.status(f"building {target} from {display_path(spec)} and {display_path(config)}"):  # transient
        if single:
            source = compile_target(target, spec, config, layout, command, hf_experts=hf_experts, model=model_class)
        else:
            files = compile_package(target, spec, config, layout, command, hf_experts=hf_experts, model=model_class)
    seconds = time.perf_counter() - started
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
    from mapgen.compiler.build import Skipped, compile_entries, read_targets

    root = find_root(Path.cwd())
    entries = [e for e in read_targets(root) if e.checked_in]
    with _progress() as progress:
        task = progress.add_task("mapgen build", total=len(entries))
        for entry, files, seconds in compile_entries(root, entries):
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
    from mapgen.compiler.build import Skipped, compile_entries, read_targets

    try:
        root = find_root(Path.cwd())
        entries = [e for e in read_targets(root) if e.checked_in]
        stale: list[str] = []
        skipped: list[str] = []
        with _progress() as progress:
            task = progress.add_task("mapgen check", total=len(entries))
            for entry, source, _ in compile_entries(root, entries):
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


def _module_file(generated: str) -> Path:
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


SPEC_LINE = re.compile(r"^# Spec: +(.+) sha256:([0-9a-f]{64})$", re.MULTILINE)


def module_spec(module_file: Path, written: str) -> Path:
    """The spec file `module_file` was built from. `written` is its SOURCES[0], relative to the
    folder the module was built in, which the module does not record: tried from the working
    directory, from the repository holding the module, then as a spec this mapgen ships (a wheel
    install); the first that exists and has the sha256 of the module's header wins."""
    with module_file.open(encoding="utf-8") as text:
        header = SPEC_LINE.search(text.read(4096))
    wanted = header.group(2) if header else None
    path = Path(written)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute():
        try:
            candidates.append(find_root(module_file.resolve().parent) / path)
        except MapgenError:
            pass  # not in a repository laid out like this one
    try:
        candidates.append(specs_folder() / path.name)
    except MapgenError:
        pass
    existing = [c for c in dict.fromkeys(c.resolve() for c in candidates) if c.is_file()]
    for candidate in existing:
        if wanted is None or hashlib.sha256(candidate.read_bytes()).hexdigest() == wanted:
            return candidate
    differ = f" ({', '.join(map(str, existing))} differ from it)" if existing else ""
    raise MapgenError(
        f"{module_file}: its spec {written}" + (f" sha256:{wanted}" if wanted else "")
        + f" is needed to build the local-layout twin that verify runs on CPU, and is not found{differ}"
        f"; tried {', '.join(map(str, candidates))}. Run verify from the folder the module was built in,"
        " or verify a local-layout module: mapgen build SPEC CONFIG -o OUT.py --layout local"
    )


def _local_twin(module_file: Path, hf_dir: Path, folder: Path) -> Path:
    """A te-layout module is checked through the local-layout module of the same spec for the
    checkpoint's config: TransformerEngine does not run on CPU."""
    from mapgen.compiler.build import compile_target

    from mapgen.verify.jobs import config_problems, load_mapping_module

    module = load_mapping_module(module_file)
    if module.LAYOUT == "local":
        # the module was built from some config; the one beside the weights must give the same
        # model, or transformers' reference is another model (a te module's twin is built from it)
        try:
            spec = module_spec(module_file, module.SOURCES[0])
        except (MapgenError, AttributeError, IndexError, TypeError):
            err.print(f"note: the spec of {module_file} is not found; config.json is not compared with its DIMS", markup=False)
            return module_file
        if problems := config_problems(module, spec, hf_dir / "config.json"):
            raise MapgenError(
                f"{hf_dir / 'config.json'} does not describe the model {module_file} maps:\n  " + "\n  ".join(problems)
            )
        return module_file
    spec = module_spec(module_file, module.SOURCES[0])
    twin = folder / f"{module_label(module_file)}_local.py"
    twin.write_text(
        compile_target(
            twin.stem, spec, hf_dir / "config.json", "local", "mapgen verify (local twin)",
            model=getattr(module, "MODEL", "gpt"),
        )
    )
    err.print(f"checking {module.LAYOUT}-layout {module_label(module_file)} through its local twin for {hf_dir / 'config.json'}", markup=False)
    return twin


@main.command()
@click.argument("generated")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@_parallel_options("Data-parallel replicas (default: EP, at least 1).")
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=1, show_default=True,
              help="Build the model with the vocabulary padded to a multiple of this x TP, as "
                   "Megatron-LM does (its default: 128).")
def verify(generated: str, hf_dir: str, tp: int, pp: int, vpp: int, ep: int, etp: int | None,
           dp: int | None, first_stage_layers: int | None, last_stage_layers: int | None,
           make_vocab_size_divisible_by: int) -> None:
    """Import HF_DIR through GENERATED on CPU processes, compare logits with transformers and
    the exported tensors with the checkpoint's bytes. GENERATED: a file or a module name. The
    model is built in the checkpoint's dtype; transformers runs in it too."""
    import tempfile

    from mapgen.compiler.megatron_model import ParallelLayout
    from mapgen.verify.jobs import Job
    from mapgen.verify.jobs import verify as run_verify

    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=max(ep, 1) if dp is None else dp,
                            first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    try:
        with tempfile.TemporaryDirectory() as folder:
            module_file = _local_twin(_module_file(generated), Path(hf_dir), Path(folder))
            job = Job(str(module_file), hf_dir, layout, make_vocab_size_divisible_by)
            (result,) = run_verify([job], layout.world_size)
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(result.summary())
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
    from mapgen.compiler.megatron_model import DTYPES
    from mapgen.verify.testing import standin_vocab_size

    vocab_size = standin_vocab_size(make_vocab_size_divisible_by)
    try:
        created = _save_standin(Path(config), Path(out_dir), seed, DTYPES[dtype], vocab_size)
        if mxfp4_twin is not None:
            _mxfp4_standin(Path(config), Path(out_dir), Path(mxfp4_twin))
    except MapgenError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    for folder in created:
        err.print(f"created folder {folder}", markup=False)
    err.print(f"wrote a tiny {dtype} stand-in of {config} (vocabulary {vocab_size}) to {out_dir}", markup=False)
    if mxfp4_twin is not None:
        err.print(f"stored its expert weights in MXFP4; its dequantized twin is in {mxfp4_twin}", markup=False)


def _mxfp4_standin(config: Path, out: Path, twin: Path) -> None:
    """Turn the stand-in in `out` into its MXFP4 form and write its dequantized twin to `twin`
    (each folder's files replaced whole once both are written)."""
    import shutil

    from mapgen.verify.mxfp4_standin import write_mxfp4_twins

    published = json.loads(config.read_text()).get("quantization_config")
    quantization = published if isinstance(published, dict) and published.get("quant_method") == "mxfp4" else None
    staging = temporary_folder(out.parent, f".{out.name}.mxfp4.", ".tmp")
    try:
        try:
            write_mxfp4_twins(out, staging / "mxfp4", staging / "twin", quantization)
        except ValueError as exc:
            raise MapgenError(f"{config}: cannot write an MXFP4 stand-in: {exc}") from None
        twin.mkdir(parents=True, exist_ok=True)
        share_tree(staging)
        for folder, target in ((staging / "twin", twin), (staging / "mxfp4", out)):
            for item in folder.iterdir():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_standin(config: Path, out: Path, seed: int, dtype: Any, vocab_size: int) -> list[Path]:
    """`mapgen standin`'s work: the folders it created. Any failure leaves nothing behind."""
    import shutil

    from mapgen.compiler.build import input_text, read_input
    from mapgen.compiler.config import read_hf_config
    from mapgen.verify.testing import save_standin, standin_problems
    from mapgen.compiler.write import make_folders

    shown = str(config)
    fields = read_hf_config(shown, input_text(read_input(config, shown), shown)).fields
    problems = standin_problems(fields)
    if problems:
        raise MapgenError(f"{shown}: mapgen standin cannot shrink this config: " + "; ".join(problems))
    if os.path.lexists(out) and not out.is_dir():
        raise MapgenError(f"cannot write the stand-in into {out}: it is not a folder")
    created = make_folders(out.parent)
    try:
        try:
            staging = temporary_folder(out.parent, f".{out.name}.", ".tmp")
        except OSError as exc:
            raise MapgenError(f"cannot write the stand-in into {out}: {exc.strerror}") from None
        try:
            try:
                save_standin(fields, staging, seed, dtype=dtype, vocab_size=vocab_size)
            except OSError as exc:
                raise MapgenError(f"cannot write the stand-in into {out}: {exc.strerror or exc}") from None
            except Exception as exc:  # transformers' verdict on a config it cannot build
                raise MapgenError(
                    f"{shown}: transformers cannot build a stand-in of this config: {type(exc).__name__}: "
                    + (str(exc).strip().splitlines() or ["(no message)"])[0][:300]
                ) from None
            share_tree(staging)  # readable by others as the umask allows, as save_pretrained's files are
            if not out.exists():
                staging.rename(out)
            else:  # an existing folder: each file replaced whole
                for item in staging.iterdir():
                    os.replace(item, out / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return created


@main.command(name="explain")
@click.argument("generated")
@click.argument("name")
@_parallel_options("Data-parallel replicas, for global rank numbers (default: EP, at least 1).")
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=1, show_default=True,
              help="The vocabulary padded to a multiple of this x TP, as Megatron-LM does.")
def explain_command(generated: str, name: str, tp: int, pp: int, vpp: int, ep: int, etp: int | None,
                    dp: int | None, first_stage_layers: int | None, last_stage_layers: int | None,
                    make_vocab_size_divisible_by: int) -> None:
    """Say how GENERATED maps NAME (a Megatron parameter or an HF tensor): the rule and its kind,
    the shapes, and under the layout which stage, EP rank and TP ranks hold which HF slices,
    and what export gathers. GENERATED: a file or a module name, as for verify."""
    from mapgen.explain import explain
    from mapgen.runtime.shardmap import ShardLayout
    from mapgen.verify.jobs import load_mapping_module

    layout = ShardLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp, first_stage_layers=first_stage_layers,
                         last_stage_layers=last_stage_layers, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    try:
        module_file = _module_file(generated)
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


def _run_convert(direction: str, generated: str, source: str, out_dir: str, config_folder: Path | None,
                 layout_flags: dict[str, Any], **settings: Any) -> None:
    import tempfile

    from mapgen.compiler.megatron_model import ParallelLayout
    from mapgen.convert import ConvertJob, read_megatron_checkpoint, smallest_dp
    from mapgen.convert import convert as run

    flags = dict(layout_flags)
    dp = flags.pop("dp")
    layout = ParallelLayout(**flags)
    layout = ParallelLayout(**flags, dp=smallest_dp(layout) if dp is None else dp)
    try:
        with tempfile.TemporaryDirectory() as folder:
            module_file = _module_file(generated)
            if config_folder is None:  # megatron-to-hf: the config recorded beside the checkpoint, or --hf-config
                config_folder = Path(folder) / "config"
                config_folder.mkdir()
                given = settings.pop("hf_config")
                recorded = Path(source) / "config.json"
                if given is None and not recorded.is_file():
                    read_megatron_checkpoint(source)  # says what is wrong with SOURCE, if anything
                    raise MapgenError(
                        f"{source}: no config.json beside the checkpoint (mapgen convert records one); give the "
                        "model's HF config.json with --hf-config"
                    )
                (config_folder / "config.json").write_bytes(Path(given or recorded).read_bytes())
            twin = _local_twin(module_file, config_folder, Path(folder))
            style = "local" if twin == module_file else "te"  # the tensor names of the module's layer spec
            hf_config = json.loads((config_folder / "config.json").read_text(encoding="utf-8"))
            job = ConvertJob(direction, str(twin), source, out_dir, layout, hf_config, key_style=style, **settings)
            result = run(job)
    except (MapgenError, OSError, ValueError) as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        err.print(result.summary(), markup=False)
    sys.exit(0 if result.error is None else 2 if result.bad_input else 1)


@convert.command(name="hf-to-megatron")
@click.argument("generated")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path())
@_layout_options
@click.option("--make-vocab-size-divisible-by", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pad the vocabulary to a multiple of this x TP, as Megatron-LM does (its default: 128); "
                   "the checkpoint then loads at that TP.")
@click.option("--iteration", type=click.IntRange(min=0), default=None,
              help="Write iter_NNNNNNN/ for this iteration (default: release/, which Megatron-LM loads as "
                   "iteration 0 without optimizer or RNG state).")
def hf_to_megatron(generated: str, hf_dir: str, out_dir: str, dtype: str | None, overwrite: bool,
                   make_vocab_size_divisible_by: int, iteration: int | None, **layout: Any) -> None:
    """Import HF_DIR through GENERATED and write a megatron-core distributed checkpoint to
    OUT_DIR (latest_checkpointed_iteration.txt, release/, config.json, mapgen.json), atomically."""
    _run_convert("hf-to-megatron", generated, hf_dir, out_dir, Path(hf_dir), layout, dtype=dtype,
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
    (sharded safetensors, index, config.json) to OUT_DIR, atomically."""
    _run_convert("megatron-to-hf", generated, ckpt_dir, out_dir, None, layout, dtype=dtype,
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
