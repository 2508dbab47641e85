"""The command line's conventions (issue 24): `verify` and `convert` refuse bad arguments before
torch is imported; no message names a temporary file (the local twin, a config copy); torch's
"No CUDA runtime is found" notice is silenced; `verify` names its phases; the vocabulary is
padded as Megatron-LM pads it (128 x TP) unless told otherwise; `convert` creates missing
folders above OUT_DIR and a failed conversion is called one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mapgen.cli import main
from mapgen.twin import shown_as_given
from mapgen.common.console import Phases
from mapgen.compiler.build import compile_target
from mapgen.verify import testing

CONFIG = testing.ROOT / "specs" / "configs" / "llama3_2_1b.json"
SPEC = testing.ROOT / "specs" / "llama.yaml"

# runs `mapgen ARGS` in a fresh interpreter, then says on stdout which libraries it imported
DRIVER = """
import json, sys
from mapgen.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
loaded = {name: any(m == name or m.startswith(name + ".") for m in sys.modules) for name in ("torch", "megatron")}
print(json.dumps({"code": code, **loaded}))
"""


def _quiet_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh `mapgen`: without what an in-process CLI set in this one."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_CPP_LOG_LEVEL")}
    return {**env, **extra}


# --- 1. refusals before torch ------------------------------------------------------------------

# (row, args, the message's fragment); run in a folder with hf/, ckpt/, existing/, a_file, mod.py
REFUSALS: list[tuple[str, list[str], str]] = [
    ("existing-out", ["convert", "hf-to-megatron", "mod.py", "hf", "existing"], "existing already exists (--overwrite replaces it"),
    ("out-is-the-input", ["convert", "hf-to-megatron", "mod.py", "hf", "hf", "--overwrite"], "hf is the input folder itself"),
    ("out-is-a-link-to-the-input", ["convert", "hf-to-megatron", "mod.py", "hf", "link", "--overwrite"], "link is the input folder itself"),
    ("out-inside-the-input", ["convert", "hf-to-megatron", "mod.py", "hf", "hf/megatron"], "hf/megatron lies inside the input folder hf"),
    ("out-holds-the-input", ["convert", "hf-to-megatron", "mod.py", "hf", ".", "--overwrite"], ". holds the input folder hf"),
    ("megatron-out-inside-ckpt", ["convert", "megatron-to-hf", "mod.py", "ckpt", "ckpt/hf"], "ckpt/hf lies inside the input folder ckpt"),
    ("megatron-ckpt-missing", ["convert", "megatron-to-hf", "mod.py", "absent", "out"], "absent: no such folder"),
    ("out-under-a-file", ["convert", "hf-to-megatron", "mod.py", "hf", "a_file/out"], "a_file/out: a_file is not a folder"),
    ("convert-tp-zero", ["convert", "hf-to-megatron", "mod.py", "hf", "out", "--tp", "0"], "--tp must be a positive integer, got 0"),
    ("convert-module-missing", ["convert", "hf-to-megatron", "absent.py", "hf", "out"], "absent.py: neither a file"),
    ("verify-pp-negative", ["verify", "mod.py", "hf", "--pp", "-1"], "--pp must be a positive integer, got -1"),
    ("verify-first-stage-zero", ["verify", "mod.py", "hf", "--first-stage-layers", "0"], "--first-stage-layers must be a positive integer, got 0"),
]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}\n")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"the user's weights")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "mod.py").write_text("# not read: the arguments are refused first\n")
    (tmp_path / "link").symlink_to(tmp_path / "hf")
    return tmp_path


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("row", "args", "fragment"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_arguments_are_refused_before_torch_is_imported(workdir: Path, row: str, args: list[str], fragment: str) -> None:
    before = _listing(workdir)
    run = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=workdir, capture_output=True, text=True,
                         timeout=300, env=_quiet_env())
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["code"] == 2, run.stderr
    assert fragment in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not report["torch"] and not report["megatron"], f"refusing {row} imported torch or megatron-core"
    assert _listing(workdir) == before and not (workdir / "out").exists()  # the input untouched, nothing written


# --- 2. no temporary path in a message -----------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama stand-in, its local and te modules (built from the repository's spec, which the
    local twin is built from again), a config of another model and one that is not JSON."""
    root = tmp_path_factory.mktemp("cli_conventions")
    hf = root / "hf"
    testing.save_standin(json.loads(CONFIG.read_text()), hf)
    paths = {"root": root, "hf": hf}
    cwd = Path.cwd()
    os.chdir(testing.ROOT)  # the modules name their spec as specs/llama.yaml, as `mapgen build` here does
    try:
        for layout in ("local", "te"):
            module = root / f"llama_{layout}.py"
            module.write_text(compile_target(module.stem, Path("specs/llama.yaml"), hf / "config.json", layout, "test"))
            paths[layout] = module
    finally:
        os.chdir(cwd)
    other = json.loads((hf / "config.json").read_text())
    other["num_attention_heads"] = 2  # another model: the module was built with 4
    (root / "other_config.json").write_text(json.dumps(other))
    (root / "broken_config.json").write_text('{"model_type": "llama",')
    (root / "empty_ckpt").mkdir()
    return paths


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folder for this test alone: a message that names it names a temporary file."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.chdir(testing.ROOT)
    return folder


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_verify_names_the_users_module_not_its_twin(llama: dict[str, Path], scratch: Path) -> None:
    code, output = _invoke(["verify", str(llama["te"]), str(llama["hf"]), "--tp", "8"])
    assert code == 2, output
    assert f"cannot verify {llama['te']} on {llama['hf']}:" in output, output
    assert "--tp 8 does not divide the 4 attention heads" in output
    assert str(scratch) not in output and os.path.realpath(scratch) not in output, output
    assert list(scratch.iterdir()) == []  # the twin's folder is gone


def test_convert_names_the_users_module_not_its_twin(llama: dict[str, Path], scratch: Path, tmp_path: Path) -> None:
    code, output = _invoke(["convert", "hf-to-megatron", str(llama["te"]), str(llama["hf"]), str(tmp_path / "out"), "--tp", "8"])
    assert code == 2, output
    assert f"cannot convert {llama['hf']} with {llama['te']}:" in output, output
    assert str(scratch) not in output and os.path.realpath(scratch) not in output, output


@pytest.mark.parametrize(("module", "config", "fragment"), [
    ("local", "other_config.json", "does not describe the model"),  # the config against the module's DIMS
    ("te", "broken_config.json", "JSON"),  # the twin's build reads it
], ids=["another-model", "not-json"])
def test_convert_names_the_users_hf_config_not_a_copy(
    llama: dict[str, Path], scratch: Path, tmp_path: Path, module: str, config: str, fragment: str
) -> None:
    given = llama["root"] / config
    code, output = _invoke(["convert", "megatron-to-hf", str(llama[module]), str(llama["root"] / "empty_ckpt"),
                            str(tmp_path / "out"), "--hf-config", str(given)])
    assert code == 2, output
    assert str(given) in output and fragment in output, output
    assert str(scratch) not in output and os.path.realpath(scratch) not in output, output
    assert "Traceback" not in output


def test_temporary_paths_are_named_as_the_user_knows_them(tmp_path: Path) -> None:
    temporary = tmp_path / "tmpabc"
    temporary.mkdir()
    (tmp_path / "link").symlink_to(temporary)
    twin = tmp_path / "link" / "mod_local.py"  # a spelling through a link: its real path is also replaced
    text = f"{twin}:3: bad; {temporary / 'mod_local.py'} again; {temporary / 'phases.txt'}"
    shown = shown_as_given(text, tmp_path / "link", {twin: Path("generated/mod")})
    assert shown == "generated/mod:3: bad; generated/mod again; (mapgen's temporary folder)/phases.txt"


# --- 3. torch's CUDA notice ----------------------------------------------------------------------

PROBE = """
import logging, sys
if sys.argv[1] == "quiet":
    from mapgen.common.console import quiet_libraries
    quiet_libraries()  # as the CLI does first, before torch is imported
import torch  # resets its "torch" logger to WARNING
# what torch.utils.cpp_extension logs when a CUDA build of torch finds CUDA_HOME but no GPU
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/probe'")
"""


def test_torchs_cuda_notice_is_silenced_after_torch_is_imported() -> None:
    loud = subprocess.run([sys.executable, "-c", PROBE, "loud"], capture_output=True, text=True, timeout=300, env=_quiet_env())
    quiet = subprocess.run([sys.executable, "-c", PROBE, "quiet"], capture_output=True, text=True, timeout=300, env=_quiet_env())
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "No CUDA runtime is found" in loud.stderr  # the probe reaches stderr without mapgen
    assert quiet.stderr == ""


# --- 4. verify's phases, with the default vocabulary padding; quiet otherwise ----------------------


def test_verify_names_its_phases_and_pads_the_vocabulary_as_megatron_lm(llama: dict[str, Path]) -> None:
    """As users run it, stderr not a terminal: a line per phase and nothing else on stderr
    (CUDA_HOME set: a CUDA build of torch would say "No CUDA runtime is found" there); the
    vocabulary of 128 padded to 128 x TP2 by default."""
    run = subprocess.run(
        [sys.executable, "-m", "mapgen.cli", "verify", str(llama["te"]), str(llama["hf"]), "--tp", "2"],
        capture_output=True, text=True, timeout=900, cwd=testing.ROOT, env=_quiet_env(CUDA_HOME=str(testing.ROOT)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stderr.splitlines()
    assert all(line.startswith("verify: ") for line in lines), run.stderr
    expected = [
        "verify: importing torch",
        f"verify: importing {llama['te']}",
        f"verify: building the local-layout twin of llama_te for {llama['hf'] / 'config.json'}",
        "verify: checking the module, the layout and the checkpoint",
        "verify: starting 2 processes",
        "verify: building the model (tp2xpp1, float32, vocab 128 padded to 256)",
        f"verify: loading {llama['hf']} into the model",
        "verify: forward: megatron-core against transformers",
        "verify: export: every tensor against the checkpoint's bytes",
    ]
    assert len(lines) == len(expected), run.stderr  # one line per phase
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)
    verdict = run.stdout.strip()
    assert "vocab 128 padded to 256 (pad logits max 0)" in verdict and verdict.endswith(": OK"), verdict


def test_phases_on_a_terminal_and_elsewhere(tmp_path: Path) -> None:
    from rich.console import Console

    def run(console: Any, enabled: bool = True) -> list[str]:
        progress = tmp_path / f"phases_{len(list(tmp_path.iterdir()))}.txt"
        with Phases("verify", enabled=enabled, console=console) as phases:
            phases("one")
            phases.follow(progress)
            progress.write_text("two\nthree\nfo")  # another process's lines; the last one unfinished
        return phases.seen

    plain = StringIO()
    assert run(Console(file=plain, force_terminal=False, width=200)) == ["one", "two", "three"]
    assert plain.getvalue() == "verify: one\nverify: two\nverify: three\n"
    terminal = StringIO()
    assert run(Console(file=terminal, force_terminal=True, width=200)) == ["one", "two", "three"]
    assert "verify: one\n" not in terminal.getvalue()  # a spinner line, not a line per phase
    silent = StringIO()
    assert run(Console(file=silent, force_terminal=False), enabled=False) == ["one", "two", "three"]
    assert silent.getvalue() == ""


def test_explain_pads_the_vocabulary_as_megatron_lm_by_default(llama: dict[str, Path]) -> None:
    padded = _invoke(["explain", str(llama["te"]), "embedding.word_embeddings.weight", "--tp", "2"])[1].splitlines()
    assert "  tp rank 1 (global rank 1): Megatron rows 128:256, 128 pad rows (zeros)" in padded
    assert "vocab:  the model has 256 rows: the 128 HF rows padded to a multiple of" in padded
    unpadded = _invoke(["explain", str(llama["te"]), "embedding.word_embeddings.weight", "--tp", "2",
                        "--make-vocab-size-divisible-by", "1"])[1].splitlines()
    assert "  tp rank 1 (global rank 1): Megatron rows 64:128" in unpadded
    assert not any(line.startswith("vocab:") for line in unpadded)


# --- 6. convert: missing folders above OUT_DIR, a failure called a conversion's ------------------


def test_convert_creates_missing_folders_above_out_dir(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "megatron"
    code, output = _invoke(["convert", "hf-to-megatron", str(llama["local"]), str(llama["hf"]), str(out), "--tp", "2"])
    assert code == 0, output
    assert f"created folder {tmp_path / 'new'}\n" in output and f"created folder {tmp_path / 'new' / 'deeper'}\n" in output
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    record = json.loads((out / "mapgen.json").read_text())
    assert record["make_vocab_size_divisible_by"] == 128 and record["vocab_rows"] == 256  # Megatron-LM's padding


def test_a_failed_conversion_is_called_one_and_leaves_no_folders(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cli_tasks

    from mapgen import convert as convert_module

    monkeypatch.setattr(convert_module, "run_convert", cli_tasks.dying_conversion)
    out = tmp_path / "new" / "megatron"
    code, output = _invoke(["convert", "hf-to-megatron", str(llama["local"]), str(llama["hf"]), str(out)])
    assert code == 2, output
    assert "the conversion processes failed: rank 0 exited with code 3" in output, output
    assert "verification" not in output
    assert not (tmp_path / "new").exists()  # the folder made for it is gone again
