"""The command line as users run it: build, write-if-changed, check, errors, determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mapgen.verify import testing
from mapgen.compiler.build import compile_target

from spec_cases import BASE_CONFIG, BASE_SPEC

MAPGEN = [sys.executable, "-m", "mapgen.cli"]


def run(args: list[str], cwd: Path, seed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    return subprocess.run([*MAPGEN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project folder with one tiny target, laid out like the real one."""
    (tmp_path / "specs" / "configs").mkdir(parents=True)
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "__init__.py").write_text("")
    shutil.copy(testing.ROOT / "specs" / "llama.yaml", tmp_path / "specs" / "llama.yaml")
    (tmp_path / "specs" / "configs" / "tiny.json").write_text(json.dumps(BASE_CONFIG, indent=2))
    (tmp_path / "specs" / "targets.yaml").write_text(
        "targets:\n  tiny: {spec: specs/llama.yaml, config: specs/configs/tiny.json, layout: te}\n"
    )
    return tmp_path


def test_build_then_check_then_stale(project: Path) -> None:
    built = run(["build"], project)
    assert built.returncode == 0, built.stderr
    assert "wrote 5 of generated/tiny/ (5 files" in built.stderr
    output = project / "generated" / "tiny" / "layer_000.py"
    first = output.read_bytes()
    written = output.stat().st_mtime_ns

    again = run(["build"], project)
    assert again.returncode == 0 and "unchanged, generated/tiny/ (5 files" in again.stderr
    assert output.read_bytes() == first
    assert output.stat().st_mtime_ns == written  # not rewritten: the same bytes, the same mtime

    assert run(["check"], project).returncode == 0

    # checked in with heads=8 in the first layer's QKV import; the build says heads=4
    output.write_text(first.decode().replace("\n        heads=4,\n", "\n        heads=8,\n", 1))
    stale = run(["check"], project)
    assert stale.returncode == 1
    summary, raw = stale.stdout.split("\n\n--- generated/tiny/layer_000.py (checked in)\n", 1)
    assert summary.splitlines()[:3] == [  # what `mapgen diff` says, then the unified diff
        "generated/tiny: 1 parameter changed, 0 added, 0 removed (of 15)",
        "  rule decoder.layers.*.self_attention.linear_qkv.weight: 1 parameter changed (layer 0)",
        "    import rt.qkv_import(heads): 8 -> 4",
    ]
    hunk = raw.split("\n@@ ", 1)[1].splitlines()
    assert hunk[0].endswith(" @@ def import_self_attention_linear_qkv_weight(ctx: Ctx, load: Loader, out: Out = N")
    assert [line for line in hunk[1:] if line[:1] in ("-", "+")] == ["-        heads=8,", "+        heads=4,"]
    assert "fix with: mapgen build" in stale.stderr

    # a part the target no longer has, and a killed build's temporary file: stale, and removed by a build
    (project / "generated" / "tiny" / "layer_009.py").write_text("")
    (project / "generated" / "tiny" / ".layer_000.py.abc.tmp").write_text("")
    stale = run(["check"], project)
    assert stale.returncode == 1 and "generated/tiny/layer_009.py: not a part of target tiny" in stale.stdout
    rebuilt = run(["build"], project)
    assert rebuilt.returncode == 0 and "removed generated/tiny/layer_009.py" in rebuilt.stderr
    assert sorted(p.name for p in (project / "generated" / "tiny").iterdir() if p.name != "__pycache__") == [
        "__init__.py", "embedding.py", "layer_000.py", "layer_001.py", "output.py"
    ]
    assert run(["check"], project).returncode == 0


def test_check_flags_modules_no_target_builds(project: Path) -> None:
    assert run(["build"], project).returncode == 0
    (project / "generated" / "orphan.py").write_text("")
    stale = run(["check"], project)
    assert stale.returncode == 1
    assert "generated/orphan.py: not built from any target" in stale.stdout
    assert "git rm -r generated/orphan.py" in stale.stderr


def test_single_target_is_byte_identical_under_any_hash_seed(project: Path) -> None:
    args = ["build", "specs/llama.yaml", "specs/configs/tiny.json", "--layout", "local", "--name", "tiny"]
    first = run([*args, "-o", "a.py"], project, seed="0")
    second = run([*args, "-o", "b.py"], project, seed="1")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a = (project / "a.py").read_text()
    b = (project / "b.py").read_text()
    assert a.replace("-o a.py", "-o b.py") == b
    assert (
        "# Regenerate: mapgen build specs/llama.yaml specs/configs/tiny.json -o a.py --layout local"
        " --name tiny" in a
    )
    assert str(project) not in a and "/tmp" not in a
    assert "@generated" in a.splitlines()[0] and "DO NOT EDIT" in a.splitlines()[0]


def test_same_process_builds_twice_identically(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    args = ("tiny", Path("specs/llama.yaml"), Path("specs/configs/tiny.json"), "te", "mapgen build")
    assert compile_target(*args) == compile_target(*args)


def test_bad_spec_exits_2_and_writes_nothing(project: Path) -> None:
    (project / "bad.yaml").write_text(BASE_SPEC.replace("kind: qkv", "kind: qvk"))
    result = run(["build", "bad.yaml", "specs/configs/tiny.json", "-o", "out.py"], project)
    assert result.returncode == 2
    assert result.stderr.startswith("bad.yaml:23:11: unknown kind 'qvk'")
    assert "Traceback" not in result.stderr
    assert not (project / "out.py").exists()


def test_usage_error_needs_spec_and_config(project: Path) -> None:
    result = run(["build", "specs/llama.yaml"], project)
    assert result.returncode == 2
    assert "give SPEC and CONFIG together (and -o OUTPUT, or it is generated/<config file stem>/)" in result.stderr
    result = run(["build", "-o", "out.py"], project)  # the target list's build takes no -o
    assert result.returncode == 2 and "-o, --name, --model and --ignore-config-field need SPEC and CONFIG" in result.stderr
    assert not (project / "out.py").exists()


def test_version_and_short_help(tmp_path: Path) -> None:
    import mapgen

    version = run(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"mapgen {mapgen.__version__}"
    for args in (["-h"], ["build", "-h"], ["verify", "-h"]):
        shown = run(args, tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith("Usage: "), args
