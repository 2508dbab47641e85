"""The runtime-only install (`pip install mapgen`, no extras): the wheel's own requirements are
torch (bounded to the versions CI tests), megatron-core and safetensors; in a venv holding only
those distributions and what they require, `mapgen.runtime`, a checked-in generated package and
the public runtime API import, a stand-in loads, exports bit-exact and saves, none of the extras'
packages is importable, and the `mapgen` command says in one line which extra it needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_wheel import build_wheel, clean_env, run_ok

import mapgen
from mapgen.__main__ import BUILD_MODULES, MISSING_BUILD
from mapgen.compiler.build import compile_package
from mapgen.compiler.write import write_package
from mapgen.verify import testing

RUNTIME = {"torch", "megatron-core", "safetensors"}
# the extras' packages (import names) a runtime-only job must not get; jinja2 is not among them:
# torch itself requires it
EXTRAS_ONLY = ("transformers", "black", "click", "rich", "yaml", "psutil", "pytest", "mypy")
MAKEFILE_PIN = re.compile(r"^PINS \?= (.+)$", re.M)

# run inside the runtime-only venv: argv = tiny module, checked-in package copy, stand-in, out
JOB = r"""
import importlib, importlib.util, json, sys
from pathlib import Path
tiny_dir, generated_dir, hf, out = map(Path, sys.argv[1:5])
extras = sys.argv[5].split(",")
importable = [m for m in extras if importlib.util.find_spec(m) is not None]

import mapgen
import mapgen.runtime
import torch
from safetensors.torch import load_file

api = {name: getattr(mapgen, name) for name in mapgen.__all__}  # imports every module of the public API

# the checked-in package, from outside any repository: its __init__ and every part file
llama = mapgen.load_module(generated_dir)
parts = sorted(p.stem for p in generated_dir.glob("*.py") if p.stem != "__init__")
for part in parts:
    importlib.import_module(f"{llama.__name__}.{part}")

# one process: build the tiny module's model, load the stand-in, export, save
mapgen.init_single_process()
tiny = mapgen.load_module(tiny_dir)
chunks = mapgen.from_hf_pretrained(tiny, hf)
mapgen.prepare_cpu()
logits = mapgen.cpu_logits(chunks[0], torch.tensor([[1, 2, 3]]))
original = load_file(hf / "model.safetensors")
exported = dict(mapgen.export_hf_weights(tiny, chunks))
exact = sorted(n for n in original if n in exported and torch.equal(exported[n].view(torch.uint8), original[n].view(torch.uint8)))
mapgen.save_hf_pretrained(tiny, chunks, out, hf)
saved = {}
for file in sorted(out.glob("*.safetensors")):
    saved.update(load_file(file))
saved_exact = sorted(n for n in original if n in saved and torch.equal(saved[n].view(torch.uint8), original[n].view(torch.uint8)))
json.dump({
    "mapgen": mapgen.__file__,
    "importable": importable,
    "imported": sorted(m for m in extras if m in sys.modules),
    "api": sorted(api),
    "logits": [list(logits.shape), bool(torch.isfinite(logits).all())],
    "target": llama.TARGET,
    "parts": parts,
    "original": sorted(original),
    "exported": sorted(exported),
    "exact": exact,
    "saved": sorted(saved),
    "saved_exact": saved_exact,
    "config_saved": json.loads((out / "config.json").read_text()) == json.loads((hf / "config.json").read_text()),
}, sys.stdout)
"""


@dataclass(frozen=True)
class RuntimeOnly:
    wheel: Path
    venv: Path
    exposed: frozenset[str]  # the parent's distributions the venv sees (canonical names)
    base: Path


def wheel_metadata(wheel: Path) -> dict[str, list[str]]:
    """The wheel's METADATA headers, each a list of its values, and the description as "Body"."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(name).decode())
    fields: dict[str, list[str]] = {}
    for key, value in message.items():
        fields.setdefault(key, []).append(value)
    fields["Body"] = [str(message.get_payload())]
    return fields


def base_requirements(requires: list[str]) -> list[Requirement]:
    """The requirements that hold without any extra, on this machine."""
    wanted = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            wanted.append(requirement)
    return wanted


def required_distributions(roots: list[Requirement]) -> dict[str, metadata.Distribution]:
    """`roots` and, recursively, what each requires (no extras), as installed in this environment."""
    found: dict[str, metadata.Distribution] = {}
    queue = list(roots)
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        distribution = metadata.distribution(requirement.name)  # missing: PackageNotFoundError
        found[name] = distribution
        queue.extend(base_requirements(distribution.requires or []))
    return found


def expose(distributions: dict[str, metadata.Distribution], folder: Path) -> None:
    """Symlinks in `folder` to the distributions' top-level modules and dist-info folders, from
    their RECORD; a namespace folder (no __init__.py, shared with distributions not exposed: nvidia/,
    megatron/) is a real folder holding links to the distribution's own entries."""
    for distribution in distributions.values():
        files = distribution.files
        assert files is not None, f"{distribution.metadata['Name']} has no RECORD"
        for file in files:
            parts = file.parts
            if parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
                continue  # scripts outside site-packages; caches; path hooks
            source = Path(str(distribution.locate_file(parts[0])))
            link = folder / parts[0]
            if source.is_dir() and not source.name.endswith(".dist-info") and not (source / "__init__.py").exists() and len(parts) >= 2:
                link.mkdir(exist_ok=True)
                source, link = source / parts[1], link / parts[1]
            if not link.exists() and not link.is_symlink():
                link.symlink_to(source)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def runtime_only(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> RuntimeOnly:
    """A venv without the parent's site-packages: a folder of links to exactly the distributions
    the wheel requires without extras, recursively (from this environment's metadata), on a
    .pth; the wheel installed with --no-deps by the parent's pip."""
    base = tmp_path_factory.mktemp("runtime_only")
    distributions = required_distributions(base_requirements(wheel_metadata(wheel).get("Requires-Dist", [])))
    site = base / "runtime_site"
    site.mkdir()
    expose(distributions, site)

    venv = base / "venv"
    run_ok([sys.executable, "-m", "venv", "--without-pip", venv], base)
    python = venv / "bin" / "python"
    purelib = Path(run_ok([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip())
    (purelib / "runtime_site.pth").write_text(f"{site}\n")
    run_ok([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-compile", wheel], base)
    return RuntimeOnly(wheel, venv, frozenset(distributions), base)


def test_the_wheel_requires_the_runtime_only_with_torch_bounded_to_what_ci_tests(wheel: Path) -> None:
    fields = wheel_metadata(wheel)
    requires = [Requirement(r) for r in fields["Requires-Dist"]]
    runtime: dict[str, Requirement] = {canonicalize_name(r.name): r for r in requires if r.marker is None}
    assert set(runtime) == RUNTIME
    # every other requirement is an extra's
    assert all("extra ==" in str(r.marker) for r in requires if r.marker is not None)
    assert {"build", "verify", "test"} <= set(fields["Provides-Extra"])

    # bounded: both CI stacks' pins (the Makefile's) inside, the registry's newer torch outside
    stacks = [line.split() for line in MAKEFILE_PIN.findall((testing.ROOT / "Makefile").read_text())]
    assert len(stacks) == 2 and all(stacks)
    for stack in stacks:
        for pin in map(Requirement, stack):
            (version,) = [Version(s.version) for s in pin.specifier]
            assert runtime[canonicalize_name(pin.name)].specifier.contains(version), (pin, runtime[canonicalize_name(pin.name)])
    torch_range = runtime["torch"].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in torch_range), f"torch unbounded: {torch_range}"
    assert not torch_range.contains(Version("2.14.1")) and not torch_range.contains(Version("2.6.0"))
    assert torch_range.contains(Version(metadata.version("torch")).base_version)  # this stack's

    # the extras carry what the runtime does not
    build = {canonicalize_name(r.name) for r in requires if r.marker is not None and r.marker.evaluate({"extra": "build"})}
    assert {"transformers", "jinja2", "black", "pyyaml", "click", "rich", "psutil"} <= build
    verify = {canonicalize_name(r.name) for r in requires if r.marker is not None and r.marker.evaluate({"extra": "verify"})}
    assert {"transformers", "mapgen"} <= verify  # mapgen[build]: the compiler builds the twin

    assert fields["License-Expression"] == ["Apache-2.0"]
    assert fields["License-File"] == ["LICENSE"]
    with zipfile.ZipFile(wheel) as archive:
        (license_file,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_file) == (testing.ROOT / "LICENSE").read_bytes()
    assert "Apache License" in (testing.ROOT / "LICENSE").read_text()
    urls = dict(u.split(", ", 1) for u in fields["Project-URL"])
    assert set(urls) == {"Repository", "Documentation", "Issues"}
    assert all(u.startswith("https://github.com/mapgen-dev/mapgen") for u in urls.values())
    assert fields["Summary"] and fields["Author"] == ["the mapgen authors"]
    assert fields["Description-Content-Type"] == ["text/markdown"]
    assert fields["Body"][0].strip() == (testing.ROOT / "README.md").read_text().strip()
    assert "Programming Language :: Python :: 3.11" in fields["Classifier"]
    assert "Programming Language :: Python :: 3.12" in fields["Classifier"]



@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Made with the build extra, here: a tiny stand-in of Llama-3.2-1B and the module built for
    it (local layout, the one a CPU builds), both in a folder outside the repository."""
    base = tmp_path_factory.mktemp("standin")
    hf = base / "hf"
    testing.save_standin(json.loads((testing.ROOT / "specs/configs/llama3_2_1b.json").read_text()), hf)
    files = compile_package("tiny_local", testing.ROOT / "specs/llama.yaml", hf / "config.json", "local", "test")
    write_package(base / "tiny_local", files)
    return hf, base / "tiny_local"


def test_the_runtime_imports_loads_exports_and_saves_without_the_extras(
    runtime_only: RuntimeOnly, standin: tuple[Path, Path]
) -> None:
    venv = runtime_only.venv
    # what the venv sees is the runtime's closure, not the parent's site-packages
    assert {"torch", "megatron-core", "safetensors", "numpy", "packaging"} <= runtime_only.exposed
    assert not {"transformers", "black", "click", "rich", "pyyaml", "psutil", "mapgen"} & runtime_only.exposed

    hf, tiny = standin
    generated = runtime_only.base / "checked_in" / "llama3_2_1b"  # outside the repository
    shutil.copytree(testing.ROOT / "generated" / "llama3_2_1b", generated, ignore=shutil.ignore_patterns("__pycache__"))
    out = runtime_only.base / "saved"
    job = run_ok([venv / "bin" / "python", "-c", JOB, tiny, generated, hf, out, ",".join(EXTRAS_ONLY)], runtime_only.base)
    found = json.loads(job.stdout.splitlines()[-1])

    assert found["importable"] == [] and found["imported"] == []
    purelib = Path(found["mapgen"]).resolve().parent.parent
    assert purelib.is_relative_to(venv.resolve()) and Path(found["mapgen"]).name == "__init__.py"
    assert found["api"] == sorted(mapgen.__all__)
    (batch, tokens, vocab), finite = found["logits"]  # the vocabulary padded to a multiple of 128
    assert (batch, tokens, finite) == (1, 3, True) and vocab % 128 == 0
    assert 0 <= vocab - json.loads((hf / "config.json").read_text())["vocab_size"] < 128
    assert found["target"] == "llama3_2_1b"
    assert found["parts"] == sorted(p.stem for p in generated.glob("*.py") if p.stem != "__init__") and len(found["parts"]) > 16

    original = found["original"]
    assert len(original) > 10 and "model.embed_tokens.weight" in original
    assert found["exported"] == original and found["exact"] == original  # bit for bit
    assert found["saved"] == original and found["saved_exact"] == original and found["config_saved"]


def test_the_mapgen_command_without_the_build_extra_says_which_extra_in_one_line(runtime_only: RuntimeOnly) -> None:
    for args in ([], ["--help"], ["build", "specs/llama.yaml", "config.json"]):
        result = subprocess.run(
            [str(runtime_only.venv / "bin" / "mapgen"), *args],
            cwd=runtime_only.base, env=clean_env(), capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(MISSING_BUILD), line
        assert "pip install 'mapgen[build]'" in line


def test_the_entry_points_check_is_the_build_extra() -> None:
    """BUILD_MODULES (import names) are the import names of exactly the build extra's
    distributions, by this environment's own record of which distribution holds which."""
    pyproject = tomllib.loads((testing.ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == {"mapgen": "mapgen.__main__:main"}
    build = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["optional-dependencies"]["build"]}
    holders = metadata.packages_distributions()
    assert {canonicalize_name(holders[m][0]) for m in BUILD_MODULES} == build
    runtime = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    assert runtime == RUNTIME and not runtime & build


def test_the_mapgen_command_with_the_extras_answers_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mapgen", "--help"], cwd=testing.ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "build" in result.stdout and "verify" in result.stdout and "Usage:" in result.stdout
