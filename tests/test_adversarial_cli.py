"""Bad input to the newer commands (`mapgen diff`, `explain`, `convert`, `verify`): one row per input.

Each row gives the input, and the message and exit code `mapgen` must answer with: a clear
error naming the file, flag or rank at fault (exit 2), never a traceback, never a hang (every
command runs under a deadline), never a process started for what is known before. Beyond the
tables: a damaged Megatron checkpoint found by the ranks is one error naming the file; a full
filesystem is said; a killed convert leaves nothing in $TMPDIR and the next run succeeds; an FP8
checkpoint verifies without `accelerate`; a config whose quantization contradicts its tensors
is one error naming both.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mapgen.cli import main
from mapgen.compiler.build import compile_target
from mapgen.verify import testing

MAPGEN = [sys.executable, "-m", "mapgen.cli"]
LLAMA = testing.ROOT / "generated" / "llama3_2_1b"  # a checked-in target package
EMBEDDING = "embedding.word_embeddings.weight"


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Hang in this (the main) thread once `seconds` have passed: a hang fails the row."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _no_spawn(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("processes were started for input refused before any process starts")


def _invoke(args: list[str], seconds: float = 120, cwd: Path | None = None) -> tuple[int, str]:
    """`mapgen ARGS` in this process, under a deadline, with verify and convert unable to start
    processes; (exit code, stdout + stderr)."""
    from mapgen import convert as convert_module
    from mapgen.verify import jobs

    saved = (jobs.spawn, convert_module.spawn)
    jobs.spawn = convert_module.spawn = _no_spawn  # type: ignore[assignment]
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with deadline(seconds):
            result = CliRunner().invoke(main, args)
    finally:
        os.chdir(previous)
        jobs.spawn, convert_module.spawn = saved  # type: ignore[assignment]
    if isinstance(result.exception, Hang):
        pytest.fail(f"hung: mapgen {' '.join(args)}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


# --- mapgen diff: what is not a whole generated module is refused, naming it ---------------------


def _cut_part(folder: Path) -> tuple[str, str]:
    shutil.copytree(LLAMA, folder / "cut")
    part = folder / "cut" / "layer_003.py"
    part.write_text(part.read_text()[:3000])
    return str(LLAMA), str(folder / "cut")


def _notes(folder: Path) -> tuple[str, str]:
    (folder / "notes.py").write_text("x = 1\n")
    return str(folder / "notes.py"), str(LLAMA)


def _empty_folders(folder: Path) -> tuple[str, str]:
    (folder / "a").mkdir(), (folder / "b").mkdir()
    return str(folder / "a"), str(folder / "b")


DIFF_ROWS: list[tuple[str, Callable[[Path], tuple[str, str]], str]] = [
    ("file-not-a-module", _notes, "notes.py: not a generated module (no mapgen header and no PARAMS table)"),
    ("part-cut-in-half", _cut_part, "cut/layer_003.py: not a whole part of the package (it is cut short"),
    ("two-empty-folders", _empty_folders, "no .py file there, in either folder"),
]


@pytest.mark.parametrize(("row", "make", "fragment"), DIFF_ROWS, ids=[r[0] for r in DIFF_ROWS])
def test_diff_refuses_what_is_not_a_whole_build(tmp_path: Path, row: str, make: Callable[[Path], tuple[str, str]], fragment: str) -> None:
    old, new = make(tmp_path)
    code, output = _invoke(["diff", old, new])
    assert code == 2 and fragment in output, output
    assert "parameters" not in output and "no difference" not in output and "Traceback" not in output


# --- mapgen explain: the layout limits verify and convert have (mapgen.common.limits) ------------

EXPLAIN_ROWS: list[tuple[str, list[str], str]] = [
    ("dp-10**12", ["--dp", str(10**12)], f"--dp {10**12} is above mapgen's limit of 131,072 ranks"),
    ("dp-10**6", ["--dp", str(10**6)], f"--dp {10**6} is above mapgen's limit of 131,072 ranks"),
    ("world-beyond-the-limit", ["--tp", "2", "--dp", "70000"], "--tp 2 x --pp 1 x --dp 70000 = 140,000 ranks is above"),
    ("tp-beyond-the-limit", ["--tp", str(2**40)], f"--tp {2**40} is above mapgen's limit of 131,072 ranks"),
    ("vocab-divisor-10**21", ["--make-vocab-size-divisible-by", str(10**21)],
     f"--make-vocab-size-divisible-by {10**21} is above mapgen's limit of 16,384"),
    ("vpp-beyond-the-limit", ["--pp", "2", "--vpp", str(10**9)], f"--vpp {10**9} is above mapgen's limit of 4,096 virtual pipeline stages"),
    ("vpp-without-pp", ["--vpp", "2"], "vpp 2 needs pp 2 or more"),
]


@pytest.mark.parametrize(("row", "flags", "fragment"), EXPLAIN_ROWS, ids=[r[0] for r in EXPLAIN_ROWS])
def test_explain_refuses_a_layout_beyond_the_limits(row: str, flags: list[str], fragment: str) -> None:
    code, output = _invoke(["explain", str(LLAMA), EMBEDDING, *flags], seconds=60)
    assert code == 2 and fragment in output, output
    assert "Traceback" not in output


def test_the_shard_map_has_the_same_limits() -> None:
    """The Python API (ParallelLayout, which explain and the shard map take) refuses what the CLI
    refuses, before numbering a rank."""
    from mapgen.common.parallel import ParallelLayout

    assert ParallelLayout(dp=10**12).problems() == [f"dp {10**12} is above mapgen's limit of 131,072 ranks"]
    assert ParallelLayout(make_vocab_size_divisible_by=10**21).problems()[0].startswith("make_vocab_size_divisible_by")
    assert ParallelLayout(tp=8, dp=16384).problems() == []  # 131,072 ranks: at the limit, accepted


# --- mapgen convert: refused before processes start, or agreed on by the ranks -------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama stand-in, its local module, and a Megatron checkpoint of it that `mapgen convert`
    wrote (one process)."""
    root = tmp_path_factory.mktemp("adversarial_convert")
    hf = root / "hf"
    testing.save_standin(json.loads((testing.ROOT / "specs" / "configs" / "llama3_2_1b.json").read_text()), hf)
    module = root / "llama_local.py"
    module.write_text(compile_target("llama_local", testing.ROOT / "specs" / "llama.yaml", hf / "config.json", "local", "test"))
    checkpoint = root / "ckpt"
    done = subprocess.run([*MAPGEN, "convert", "hf-to-megatron", str(module), str(hf), str(checkpoint)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr
    return {"root": root, "hf": hf, "module": module, "ckpt": checkpoint}


def _truncated(release: Path) -> None:
    data = release / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])


def _missing(release: Path) -> None:
    (release / "__0_0.distcp").unlink()


def _garbage_common(release: Path) -> None:
    (release / "common.pt").write_bytes(b"garbage\n")


def _no_common(release: Path) -> None:
    if not (release / "common.pt").exists():
        pytest.skip("this megatron-core keeps the common state in the data files")
    (release / "common.pt").unlink()


DAMAGED_ROWS: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("distcp-truncated", _truncated, ("__0_0.distcp: cut short: 1,000 bytes, .metadata places data up to byte",)),
    ("distcp-missing", _missing, ("__0_0.distcp: missing (.metadata places tensors in it)",)),
    ("common-garbage", _garbage_common, ("common.pt: cannot read megatron-core's common state: UnpicklingError",)),
    ("common-missing", _no_common, ("common.pt: missing (megatron-core's common state",)),
]


@pytest.mark.parametrize(("row", "spoil", "fragments"), DAMAGED_ROWS, ids=[r[0] for r in DAMAGED_ROWS])
def test_a_damaged_megatron_checkpoint_is_refused_before_processes_start(
    llama: dict[str, Path], tmp_path: Path, row: str, spoil: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(llama["ckpt"], folder)
    spoil(folder / "release")
    code, output = _invoke(["convert", "megatron-to-hf", str(llama["module"]), str(folder), str(tmp_path / "out"), "--tp", "2"])
    assert code == 2, output
    for fragment in fragments:
        assert fragment in output, (fragment, output)
    assert "Traceback" not in output and not (tmp_path / "out").exists()


def test_the_vocabulary_padding_limit_is_checked_before_processes_start(llama: dict[str, Path], tmp_path: Path) -> None:
    """It passed the early checks, then allocated 256 TB for 10**12."""
    code, output = _invoke(["convert", "hf-to-megatron", str(llama["module"]), str(llama["hf"]), str(tmp_path / "out"),
                            "--make-vocab-size-divisible-by", str(10**12)])
    assert code == 2 and f"--make-vocab-size-divisible-by {10**12} is above mapgen's limit of 16,384" in output, output
    assert not (tmp_path / "out").exists()


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_zeroed_data_file_is_one_error_on_every_rank_naming_it(llama: dict[str, Path], tmp_path: Path) -> None:
    """Its size is right, so only the ranks' read finds it (torch raises its CheckpointException,
    a BaseException, on every rank): one error naming the file, exit 2, and $TMPDIR as it was
    but for the folder a killed run left, which is gone."""
    folder = tmp_path / "ckpt"
    shutil.copytree(llama["ckpt"], folder)
    data = folder / "release" / "__0_0.distcp"
    data.write_bytes(bytes(data.stat().st_size))
    scratch = tmp_path / "tmp"
    stale = scratch / f"mapgen-convert-{_host()}-{_dead_pid()}-abc123"
    (stale / "twin").mkdir(parents=True)
    done = subprocess.run([*MAPGEN, "convert", "megatron-to-hf", str(llama["module"]), str(folder), str(tmp_path / "out"), "--tp", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 2, done.stderr
    assert f"{data}: no data at byte " in done.stderr and "(zeroed?)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "processes failed" not in done.stderr
    assert list(scratch.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_killed_convert_leaves_nothing_in_tmpdir_and_the_next_run_succeeds(llama: dict[str, Path], tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = [*MAPGEN, "convert", "hf-to-megatron", str(llama["module"]), str(llama["hf"]), str(tmp_path / "out")]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with deadline(300):
            while not list(scratch.glob("mapgen-convert-*")) and process.poll() is None:
                time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the command and the processes it started
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the convert finished before it could be killed"
    assert list(scratch.glob("mapgen-convert-*")), "the killed run left its folder (the case under test)"
    # a run killed while writing leaves its hidden staging folder beside the output: the next run removes it
    staged = tmp_path / f".out.partial-{_host()}-{_dead_pid()}-abc123"
    (staged / "release").mkdir(parents=True)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_checkpoint_exception_is_said_with_each_ranks_failure() -> None:
    """torch's CheckpointException is a BaseException, which `except Exception` lets through:
    convert catches it by name and says each rank's failure in a line."""
    from torch.distributed.checkpoint.api import CheckpointException

    from mapgen.megatron_checkpoint import checkpoint_failure

    full = OSError(errno.ENOSPC, "No space left on device")
    exc = CheckpointException("write failed", {0: (full, None), 1: (full, None), 3: (EOFError(), None)})
    assert not isinstance(exc, Exception)
    assert checkpoint_failure(exc) == "OSError: No space left on device (ranks 0, 1); EOFError (rank 3)"
    assert checkpoint_failure(CheckpointException("told", {})) == "CheckpointException: failed on another rank"


def test_a_filesystem_too_small_for_the_checkpoint_is_said_before_writing(llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mapgen.convert_rank import _space_problems

    module = testing.import_module_from_path(llama["module"], "adversarial_cli_llama")
    elements = sum(int(torch.Size(p.shape).numel()) for p in module.PARAMS)
    usage = shutil.disk_usage(llama["root"])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=elements * 4 - 1))
    (problem,) = _space_problems(module, llama["root"] / "x", torch.float32, module.DIMS.vocab_size)
    assert problem.startswith(f"{llama['root']}: ") and "MiB free on its filesystem, the checkpoint's tensors take" in problem
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=elements * 4))
    assert _space_problems(module, llama["root"] / "x", torch.float32, module.DIMS.vocab_size) == []


# --- mapgen verify: FP8 without accelerate, a contradicting config, one tensor of another dtype ---


def _quantized_copy(source: Path, folder: Path, quant_method: str) -> None:
    """`source` with every projection weight FP8 block-quantized (16 x 16 blocks, DeepSeek's
    recipe), its config saying `quant_method`."""
    from test_fp8 import quantize

    folder.mkdir()
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.endswith(("proj.weight", "_with_mqa.weight")):
            stored[name], stored[name + "_scale_inv"] = quantize(tensor, (16, 16))
        else:
            stored[name] = tensor
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method, "fmt": "e4m3", "weight_block_size": [16, 16]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adversarial_fp8")
    hf = root / "hf"
    testing.save_standin(json.loads((testing.ROOT / "specs" / "configs" / "deepseek_v3.json").read_text()), hf)
    module = root / "deepseek_local.py"
    module.write_text(compile_target("deepseek_local", testing.ROOT / "specs" / "deepseek_v3.yaml", hf / "config.json", "local", "test"))
    _quantized_copy(hf, root / "fp8", "fp8")
    return {"root": root, "hf": hf, "module": module, "fp8": root / "fp8"}


def test_an_fp8_checkpoint_verifies_without_accelerate(deepseek: dict[str, Path]) -> None:
    """transformers loads an FP8 checkpoint only with `accelerate`, which mapgen does not
    depend on; verify's reference is the checkpoint dequantized as mapgen reads it."""
    done = subprocess.run([*MAPGEN, "verify", str(deepseek["module"]), str(deepseek["fp8"])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("verify deepseek_local tp1xpp1: ") and done.stdout.rstrip().endswith(": OK"), done.stdout
    assert "accelerate" not in done.stderr


def test_a_quant_method_that_contradicts_the_tensors_is_one_error(deepseek: dict[str, Path], tmp_path: Path) -> None:
    _quantized_copy(deepseek["hf"], tmp_path / "mx", "mxfp4")
    code, output = _invoke(["verify", str(deepseek["module"]), str(tmp_path / "mx")])
    assert code == 2, output
    assert "config.json: quantization_config.quant_method is 'mxfp4', but the checkpoint's tensors are FP8 with block scales" in output
    problems = {line for line in output.splitlines() if line.startswith("  ")}
    assert len(problems) == 1 and "blocks of [128, 128]" not in output, output  # one problem, not one per tensor


def test_one_tensor_of_another_dtype_is_named_with_its_dtype() -> None:
    """The export of a float32 model cannot give a float16 tensor back: the verdict says so,
    rather than a bare `differ: NAME` that reads like a mapping bug."""
    from mapgen.verify.verdict import cannot_equal

    said = cannot_equal(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float16), "F16", "float32")
    assert "stored as F16" in said and "the model runs in float32" in said and "export gives float32" in said
    assert cannot_equal(torch.zeros(2, 2), torch.ones(2, 2), "F32", "float32") == ""
