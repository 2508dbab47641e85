"""The wheel as users get it: built from this tree, installed (not editable) into a fresh
virtualenv, it builds a module from a spec and a config outside any repository; it carries the
template and the specs, and none of generated/."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from mapgen.verify import testing
from mapgen.compiler.build import compile_target
from mapgen.common.errors import MapgenError

SPEC, CONFIG = "specs/llama.yaml", "specs/configs/llama3_2_1b.json"
OUTPUT = "out/llama3_2_1b.py"
# what a source tree holds beside the sources: virtualenvs, caches, earlier builds
NOT_SOURCES = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__")

# run inside the fresh venv: where its mapgen comes from, and what it ships
INSPECT = """
import json, sys, sysconfig
from pathlib import Path
from click.testing import CliRunner
import mapgen
from mapgen import cli
from mapgen.compiler.packaged import module_spec
specs = CliRunner().invoke(cli.main, ["specs"])
json.dump({
    "mapgen": mapgen.__file__,
    "purelib": sysconfig.get_paths()["purelib"],
    "specs_exit": specs.exit_code,
    "specs": specs.output.strip(),
    "twin_spec": str(module_spec(Path(sys.argv[1]), "specs/llama.yaml")),
}, sys.stdout)
"""


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    work: Path


def clean_env() -> dict[str, str]:
    """The environment minus what would put this checkout (PYTHONPATH) or another venv in front."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run_ok(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def build_wheel(base: Path) -> Path:
    """This tree, copied to `base`/src (generated/ included, as a checkout has it) -> `pip wheel`
    (offline, with this interpreter's setuptools) -> the wheel's path."""
    source = base / "src"
    shutil.copytree(testing.ROOT, source, ignore=NOT_SOURCES)
    assert (source / "generated" / "llama3_2_1b" / "__init__.py").is_file()
    dist = base / "dist"
    run_ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
            "-w", dist, source], base)
    (wheel,) = dist.glob("mapgen-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """This tree (generated/ included) -> `pip wheel` -> a fresh venv that sees the test
    interpreter's site-packages (torch, megatron-core, ...) through a .pth file, but not its
    editable mapgen (that needs the finder its own .pth installs, which a plain path line skips)."""
    base = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(base)

    venv = base / "venv"
    run_ok([sys.executable, "-m", "venv", "--without-pip", venv], base)
    python = venv / "bin" / "python"
    purelib = Path(run_ok([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip())
    parent = sysconfig.get_paths()
    (purelib / "parent_site.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys((parent["purelib"], parent["platlib"]))))
    # the parent's pip, run by the venv's python, installs into the venv; --ignore-installed: the
    # parent's mapgen dist-info is visible and would count as "already installed"
    run_ok([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-compile", wheel], base)

    work = base / "work"  # a user's folder: a spec and a config, no repository above it
    for name in (SPEC, CONFIG):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(testing.ROOT / name, work / name)
    return Installed(wheel, venv, work)


def test_wheel_carries_template_and_specs_not_generated(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        template = wheel.read("mapgen/templates/module.py.j2")
        spec = wheel.read("mapgen/specs/llama.yaml")
    assert [n for n in names if n.startswith("generated/")] == []
    assert {n.split("/")[0] for n in names} == {"mapgen", f"{installed.wheel.name.split('-py3')[0]}.dist-info"}
    assert template == (testing.ROOT / "templates/module.py.j2").read_bytes()
    assert spec == (testing.ROOT / "specs/llama.yaml").read_bytes()
    assert "mapgen/specs/configs/deepseek_v3.json" in names
    assert "mapgen/specs/targets.yaml" not in names  # it names generated/ files the wheel lacks
    assert installed.wheel.stat().st_size < 1_000_000  # generated/ alone is 150 MB (METADATA holds the README)


def test_installed_wheel_builds_a_module_outside_the_repository(installed: Installed) -> None:
    work = installed.work
    command = f"mapgen build {SPEC} {CONFIG} -o {OUTPUT} --layout te"
    build = subprocess.Popen(
        [installed.venv / "bin" / "mapgen", "build", SPEC, CONFIG, "-o", OUTPUT],
        cwd=work, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:  # the repository's own build of the same command, while the wheel's runs
        expected = compile_target("llama3_2_1b", testing.ROOT / SPEC, testing.ROOT / CONFIG, "te", command, (SPEC, CONFIG))
    finally:
        stdout, stderr = build.communicate(timeout=300)
    assert build.returncode == 0, stderr
    assert f"wrote {OUTPUT}" in stderr
    written = (work / OUTPUT).read_text()
    assert written.splitlines()[4] == f"# Regenerate: {command}"
    assert written == expected  # byte for byte: same template, same formatting

    # the shipped spec and config, from wherever the wheel is installed: named by their shipped
    # names, so the bytes are the same as the checkout's build of the same names
    shipped = run_ok([installed.venv / "bin" / "mapgen", "specs"], installed.venv).stdout.strip()
    again = subprocess.run(
        [installed.venv / "bin" / "mapgen", "build", f"{shipped}/llama.yaml", f"{shipped}/configs/llama3_2_1b.json",
         "-o", OUTPUT], cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert (work / OUTPUT).read_text() == expected

    inspect = run_ok([installed.venv / "bin" / "python", "-c", INSPECT, work / OUTPUT], installed.venv)
    found = json.loads(inspect.stdout)
    venv = installed.venv.resolve()
    purelib = Path(found["purelib"])
    # the wheel's mapgen, not this checkout's nor the parent venv's editable one
    assert Path(found["mapgen"]).resolve() == purelib.resolve() / "mapgen" / "__init__.py"
    assert purelib.resolve().is_relative_to(venv)
    assert not (purelib / "generated").exists()
    assert found["specs_exit"] == 0
    assert Path(found["specs"]) == purelib / "mapgen" / "specs"
    assert sorted(p.name for p in Path(found["specs"]).glob("*.yaml")) == sorted(
        p.name for p in (testing.ROOT / "specs").glob("*.yaml") if p.name != "targets.yaml"
    )
    # `mapgen verify`'s local twin, run away from the folder the module was built in: the
    # shipped spec, whose sha256 is the one in the module's header
    assert Path(found["twin_spec"]) == purelib / "mapgen" / "specs" / "llama.yaml"


def _module_with_spec(folder: Path, sha256: str) -> Path:
    module = folder / "mod.py"
    module.write_text(f"# @generated by mapgen.\n# Spec:   specs/llama.yaml sha256:{sha256}\n")
    return module


def test_twin_spec_is_the_one_the_module_was_built_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mapgen.compiler.packaged import module_spec

    real = (testing.ROOT / SPEC).read_bytes()
    (tmp_path / "specs").mkdir()
    (tmp_path / SPEC).write_bytes(real.replace(b"family: llama", b"family: llama2"))  # edited since
    monkeypatch.chdir(tmp_path)
    module = _module_with_spec(tmp_path, hashlib.sha256(real).hexdigest())
    found = module_spec(module, SPEC)
    assert found != (tmp_path / SPEC).resolve() and found.read_bytes() == real  # the shipped one

    stale = _module_with_spec(tmp_path, "0" * 64)
    with pytest.raises(MapgenError) as error:
        module_spec(stale, SPEC)
    message = str(error.value)
    assert f"its spec {SPEC} sha256:{'0' * 64} is needed to build the local-layout twin" in message
    assert str((tmp_path / SPEC).resolve()) in message and "differ from it" in message
    assert "--layout local" in message
