"""Bad input to the compiler's commands (`mapgen build`, `mapgen standin`): one row per input.

Each row gives the input, the exit code and a fragment of the message `mapgen` must print, and a
time limit that turns a hang into a failure. Every row also checks that no traceback is printed
and that the folder the command ran in holds exactly what it held before (no output, no temporary
file, no folder), but for what the row says the command creates. Rows that once hung (a FIFO, a
link to the process's own stdout, a YAML alias bomb) run as processes of their own under a
timeout; the others run in this process through click's test runner, under a SIGALRM deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
import transformers
from click.testing import CliRunner

from mapgen.verify import testing
from mapgen.cli import main
from mapgen.common.errors import MapgenError
from mapgen.compiler.postprocess import GeneratedCodeError, check

from spec_cases import BASE_CONFIG, BASE_SPEC

LLAMA_SPEC = (testing.ROOT / "specs" / "llama.yaml").read_text()
MIXTRAL_SPEC = (testing.ROOT / "specs" / "mixtral.yaml").read_text()
MIXTRAL_CONFIG = json.loads((testing.ROOT / "specs" / "configs" / "mixtral_8x7b.json").read_text())
QWEN3_MOE_CONFIG = json.loads((testing.ROOT / "specs" / "configs" / "qwen3_30b_a3b.json").read_text())


def spec(*edits: tuple[str, str], base: str = BASE_SPEC) -> str:
    for old, new in edits:
        assert old in base, f"edit target not in the spec: {old!r}"
        base = base.replace(old, new, 1)
    return base


def config(base: dict[str, Any] | None = None, **overrides: Any) -> str:
    fields = dict(BASE_CONFIG if base is None else base)
    for key, value in overrides.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return json.dumps(fields, indent=2)


def alias_bomb() -> str:
    lines = ["family: llama", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):  # 9**10 values once expanded
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def many_rules(count: int) -> str:
    rule = "  - megatron: decoder.layers.*.mlp.linear_fc2.weight\n    hf: model.layers.*.mlp.down_proj.weight\n    kind: auto\n"
    return spec(("rules:\n", "rules:\n" + rule * count))


@dataclass(frozen=True)
class Row:
    id: str
    command: str  # build or standin
    files: dict[str, str | bytes]  # written into the folder the command runs in
    args: list[str]  # {unwritable} stands for a folder this process cannot write into
    code: int
    message: str  # must appear in stderr
    seconds: float  # time limit
    own_process: bool = False  # hang-prone: a process of its own, under a timeout
    setup: Callable[[Path], None] | None = None
    creates: tuple[str, ...] = ()  # what the command leaves, relative to its folder


def _fifo(name: str) -> Callable[[Path], None]:
    return lambda folder: os.mkfifo(folder / name)


def _link(name: str, target: str) -> Callable[[Path], None]:
    return lambda folder: os.symlink(target, folder / name)


def _device(path: Path) -> None:
    try:  # a null device (1, 3) of the test's own
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("cannot make a device node here")


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))


def _folder(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).mkdir()


OK_CONFIG = config()
TINY = {"bad.yaml": BASE_SPEC, "config.json": OK_CONFIG}
BUILD = ["bad.yaml", "config.json", "-o", "out.py"]
LLAMA = {"llama.yaml": LLAMA_SPEC}
LLAMA_BUILD = ["llama.yaml", "config.json", "-o", "out.py"]
MIXTRAL = {"mixtral.yaml": MIXTRAL_SPEC}
MIXTRAL_BUILD = ["mixtral.yaml", "config.json", "-o", "out.py"]

ROWS: list[Row] = [
    # --- specs ---
    Row("spec-binary", "build", {**TINY, "bad.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, BUILD, 2,
        "bad.yaml:1:1: not UTF-8 text (byte 0x89); is this a binary file?", 30),
    Row("spec-control-character", "build", {**TINY, "bad.yaml": "family: ll\x00ama\n"}, BUILD, 2,
        "bad.yaml:1:11: invalid YAML: character #x0000 is not allowed", 30),
    Row("spec-alias-bomb", "build", {**TINY, "bad.yaml": alias_bomb()}, BUILD, 2,
        "the YAML document expands to more than 100,000 values", 60, own_process=True),
    Row("spec-recursive-anchor", "build", {**TINY, "bad.yaml": "family: &f [llama, *f]\n"}, BUILD, 2,
        "bad.yaml:1:9: recursive YAML alias: a value that contains itself", 30),
    Row("spec-nested-10000-deep", "build", {**TINY, "bad.yaml": "family: " + "[" * 10_000 + "]" * 10_000 + "\n"},
        BUILD, 2, "bad.yaml:1:1: invalid YAML: values nest deeper than 64 levels", 60),
    Row("spec-nested-100-deep", "build", {**TINY, "bad.yaml": "family: " + "[" * 100 + "]" * 100 + "\n"},
        BUILD, 2, "bad.yaml:1:72: values nest deeper than 64 levels", 30),
    Row("spec-string-repetition", "build",
        {**TINY, "bad.yaml": spec(("  layernorm_epsilon: rms_norm_eps\n", "  layernorm_epsilon: rms_norm_eps\n  normalization: \"'RMSNorm' * 1000000000\"\n"))},
        BUILD, 2, "dims.normalization: cannot evaluate ''RMSNorm' * 1000000000': gives a string of 7,000,000,000 characters, over the limit of 10,000", 30),
    Row("spec-format-width", "build",
        {**TINY, "bad.yaml": spec(("  layernorm_epsilon: rms_norm_eps\n", "  layernorm_epsilon: rms_norm_eps\n  normalization: \"'%0999999999d' % 1\"\n"))},
        BUILD, 2, "'%' formatting width or precision 999,999,999 is over 100", 30),
    Row("spec-huge-range", "build",
        {**TINY, "bad.yaml": spec(("  layernorm_epsilon: rms_norm_eps\n", "  layernorm_epsilon: rms_norm_eps\n  sliding_window_layers: range(1000000000)\n"))},
        BUILD, 2, "dims.sliding_window_layers: cannot evaluate 'range(1000000000)': gives a list of 1,000,000,000 elements", 30),
    Row("spec-quadratic-comprehension", "build",
        {**TINY, "bad.yaml": spec(("  layernorm_epsilon: rms_norm_eps\n", "  layernorm_epsilon: rms_norm_eps\n  sliding_window_layers: '[i for i in range(90000) if i in range(90000)]'\n"))},
        BUILD, 2, "takes more than 1,000,000 steps to evaluate", 60),
    Row("spec-expression-too-deep", "build",
        {**TINY, "bad.yaml": spec(("vocab_size: vocab_size", "vocab_size: " + "-" * 60 + "vocab_size"))},
        BUILD, 2, "nested 62 deep, at most 50 levels are allowed", 30),
    Row("spec-expression-too-long", "build",
        {**TINY, "bad.yaml": spec(("vocab_size: vocab_size", "vocab_size: vocab_size" + " + 0" * 600))},
        BUILD, 2, "dims.vocab_size: expression of 2,410 characters: at most 2,000 are allowed", 30),
    Row("spec-integer-growth", "build",
        {**TINY, "bad.yaml": spec(("vocab_size: vocab_size", "vocab_size: vocab_size" + " * vocab_size" * 20))},
        BUILD, 2, "gives an integer of 134 bits, over the limit of 128", 30),
    Row("spec-division-by-zero-in-when", "build",
        {**TINY, "bad.yaml": spec(("    hf: lm_head.weight\n    kind: auto\n", "    hf: lm_head.weight\n    kind: auto\n    when: 1 // 0\n"))},
        BUILD, 2, "bad.yaml:39:15: when: cannot evaluate '1 // 0': integer division or modulo by zero", 30),
    Row("spec-1001-rules", "build", {**TINY, "bad.yaml": many_rules(992)}, BUILD, 2,
        "bad.yaml:15:3: 1,001 rules: a spec may have at most 1,000", 60),
    Row("spec-three-double-stars", "build",
        {**TINY, "bad.yaml": spec(("megatron: decoder.final_layernorm.weight", "megatron: '**.**.**.weight'"))},
        BUILD, 2, "has 3 '**' wildcards: at most 2 are allowed", 30),
    Row("spec-architecture-not-a-name", "build",
        {**TINY, "bad.yaml": spec(("hf_architecture: LlamaForCausalLM", "hf_architecture: 'Llama\"\"\"ForCausalLM'"))},
        BUILD, 2, "bad.yaml:2:18: 'hf_architecture' must be a transformers class name", 30),
    Row("spec-missing", "build", {"config.json": OK_CONFIG}, BUILD, 2,
        "bad.yaml: cannot read: No such file or directory", 30),
    Row("spec-is-a-fifo", "build", {"config.json": OK_CONFIG}, BUILD, 2,
        "bad.yaml: cannot read: not a regular file (a FIFO (named pipe))", 60, own_process=True, setup=_fifo("bad.yaml")),
    Row("spec-over-1-mib", "build", {**TINY, "bad.yaml": BASE_SPEC + "#" * (1 << 20)}, BUILD, 2,
        "bytes, over the limit of 1,048,576 for an input file", 30),
    Row("spec-path-with-quote", "build", {'a"b.yaml': BASE_SPEC, "config.json": OK_CONFIG},
        ['a"b.yaml', "config.json", "-o", "out.py"], 2,
        "spec path 'a\"b.yaml' has '\"', which mapgen does not write into a module's comments", 30),
    # --- configs ---
    Row("config-nan", "build", {**TINY, "config.json": config(rms_norm_eps=float("nan"))}, BUILD, 2,
        "config.json:13:3: config field 'rms_norm_eps' is NaN, not a finite number", 30),
    Row("config-infinity", "build", {**TINY, "config.json": config(rope_theta=1.0).replace("1.0", "1e999")}, BUILD, 2,
        "config.json:16:3: config field 'rope_theta' is Infinity, not a finite number", 30),
    Row("config-vocab-size-0", "build", {**TINY, "config.json": config(vocab_size=0)}, BUILD, 2,
        "config.json:11:3: config field 'vocab_size' is 0: dims.vocab_size must be positive, got 0 (spec bad.yaml, line 10)", 30),
    Row("config-negative-epsilon", "build", {**TINY, "config.json": config(rms_norm_eps=-1e-6)}, BUILD, 2,
        "config.json:13:3: config field 'rms_norm_eps' is -1e-06: dims.layernorm_epsilon must be positive", 30),
    Row("config-negative-head-dim", "build", {**LLAMA, "config.json": config(head_dim=-16)}, LLAMA_BUILD, 2,
        "config.json:17:3: config field 'head_dim' is -16: dims.kv_channels must be positive, got -16 (spec llama.yaml, line 11)", 30),
    Row("config-layers-as-string", "build", {**TINY, "config.json": config(num_hidden_layers="32")}, BUILD, 2,
        "config.json:8:3: config field 'num_hidden_layers' is \"32\": dims.num_layers must be an integer, got '32'", 30),
    Row("config-100000-layers", "build", {**TINY, "config.json": config(num_hidden_layers=100_000)}, BUILD, 2,
        "config.json:8:3: config field 'num_hidden_layers' is 100000: dims.num_layers 100,000 is over mapgen's limit of 4,096 layers", 30),
    Row("config-5000-experts", "build", {**MIXTRAL, "config.json": config(MIXTRAL_CONFIG, num_local_experts=5_000)},
        MIXTRAL_BUILD, 2, "config field 'num_local_experts' is 5000: dims.num_moe_experts 5,000 is over mapgen's limit of 4,096 experts", 30),
    Row("config-131072-expert-layers", "build", {**MIXTRAL, "config.json": config(MIXTRAL_CONFIG, num_local_experts=4_096)},
        MIXTRAL_BUILD, 2, "dims.num_moe_experts 4,096 in 32 layers are 131,072 expert-layers, over mapgen's limit of 32,768", 30),
    Row("config-integer-over-63-bits", "build", {**TINY, "config.json": config(vocab_size=2**70)}, BUILD, 2,
        "dims.vocab_size must be an integer of at most 63 bits, got one of 71 bits", 30),
    Row("config-5000-digit-integer", "build", {**TINY, "config.json": config(vocab_size=7).replace('"vocab_size": 7', '"vocab_size": ' + "9" * 5000)},
        BUILD, 2, "config.json:1:1: invalid JSON: Exceeds the limit (4300 digits)", 30),
    Row("config-nested-100000-deep", "build", {**TINY, "config.json": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"},
        BUILD, 2, "config.json:1:1: invalid config: values nest deeper than 64 levels", 60),
    Row("config-nested-100-deep", "build", {**TINY, "config.json": '{"a": ' + "[" * 100 + "]" * 100 + "}"},
        BUILD, 2, "config.json:1:1: invalid config: values nest 101 levels deep, at most 64 are allowed", 30),
    Row("config-duplicate-key", "build", {**TINY, "config.json": config().replace('"vocab_size": 128', '"vocab_size": 128, "vocab_size": 256')},
        BUILD, 2, "config.json:11:22: duplicate key 'vocab_size' (first defined at line 11)", 30),
    Row("config-model-type-contradicts-architectures", "build", {**TINY, "config.json": config(model_type="qwen2")}, BUILD, 2,
        "config.json:5:3: config field 'model_type' is 'qwen2', which contradicts its architectures: LlamaForCausalLM is a 'llama' model", 60),
    Row("config-no-model-type", "build", {**TINY, "config.json": config(model_type=None)}, BUILD, 2,
        "config.json:1:1: config has no 'model_type' (for LlamaForCausalLM: 'llama')", 60),
    Row("config-architectures-not-a-list", "build", {**TINY, "config.json": config(architectures="LlamaForCausalLM")}, BUILD, 2,
        "config.json:2:3: config field 'architectures' must be a list of class names, got \"LlamaForCausalLM\"", 30),
    Row("config-binary", "build", {**TINY, "config.json": b'{"a": 1,\n "b": "\xff\xfe"}'}, BUILD, 2,
        "config.json:2:8: not UTF-8 text (byte 0xff)", 30),
    Row("config-is-a-directory", "build", {"bad.yaml": BASE_SPEC}, BUILD, 2,
        "is a directory", 30, setup=_folder("config.json")),
    # --- outputs ---
    Row("output-link-to-own-stdout", "build", TINY, BUILD, 2,
        "cannot write out.py: it is a symbolic link (to /proc/self/fd/1), not a regular file", 60,
        own_process=True, setup=_link("out.py", "/proc/self/fd/1")),
    Row("output-fifo", "build", TINY, BUILD, 2,
        "cannot write out.py: it is a FIFO (named pipe), not a regular file", 60, own_process=True, setup=_fifo("out.py")),
    Row("output-dangling-link", "build", TINY, BUILD, 2,
        "cannot write out.py: it is a symbolic link (to elsewhere.py)", 30, setup=_link("out.py", "elsewhere.py")),
    # (a device node of its own, not /dev/null: as root, a broken build replaced /dev/null itself)
    Row("output-device", "build", TINY, BUILD, 2,
        "cannot write out.py: it is a character device, not a regular file", 30, setup=lambda f: _device(f / "out.py")),
    Row("output-socket", "build", TINY, BUILD, 2,
        "cannot write out.py: it is a socket, not a regular file", 30, setup=lambda f: _socket(f / "out.py")),
    Row("output-unwritable-folder", "build", TINY, ["bad.yaml", "config.json", "-o", "{unwritable}/out.py"], 2,
        "cannot write {unwritable}/out.py: Permission denied", 60),
    Row("output-under-unwritable-folder", "build", TINY, ["bad.yaml", "config.json", "-o", "{unwritable}/a/b/out.py"], 2,
        "cannot create folder {unwritable}/a: ", 60),
    Row("output-under-a-file", "build", {**TINY, "file": "x"}, ["bad.yaml", "config.json", "-o", "file/out.py"], 2,
        "cannot write file/out.py: Not a directory", 60),
    Row("output-missing-folders", "build", TINY, ["bad.yaml", "config.json", "-o", "new/sub/out.py"], 0,
        "created folder new\ncreated folder new/sub\nwrote new/sub/out.py", 60, creates=("new", "new/sub", "new/sub/out.py")),
    Row("output-is-a-directory", "build", TINY, ["bad.yaml", "config.json", "-o", "gen"], 2,
        "is a directory", 30, setup=_folder("gen")),
    Row("name-with-newline-and-quotes", "build", TINY, [*BUILD, "--name", 'x\n"""\nimport os'], 2,
        "target name 'x\\n\"\"\"\\nimport os' is not a Python module name", 30),
    Row("name-from-output-stem", "build", TINY, ["bad.yaml", "config.json", "-o", "my-model.py"], 2,
        "target name 'my-model' is not a Python module name", 30),
    Row("name-keyword", "build", TINY, [*BUILD, "--name", "class"], 2, "target name 'class' is not a Python module name", 30),
    # --- stand-ins ---
    Row("standin-without-attention-heads", "standin", {"config.json": config(num_attention_heads=None)}, ["config.json", "out"], 2,
        "config.json: mapgen standin cannot shrink this config: needs 'num_attention_heads' as a positive integer (it is missing)", 30),
    Row("standin-invalid-json", "standin", {"config.json": "{\"a\": 1,}"}, ["config.json", "out"], 2,
        "config.json:1:9: invalid JSON: Expecting property name enclosed in double quotes", 30),
    Row("standin-nan", "standin", {"config.json": config(rms_norm_eps=float("nan"))}, ["config.json", "out"], 2,
        "config.json:13:3: config field 'rms_norm_eps' is NaN, not a finite number", 30),
    Row("standin-unknown-model-type", "standin", {"config.json": config(model_type="no_such_model")}, ["config.json", "out"], 2,
        "config.json: transformers cannot build a stand-in of this config: ValueError", 60),
    Row("standin-kv-heads-do-not-divide", "standin", {"config.json": config(num_key_value_heads=3)}, ["config.json", "out"], 2,
        "'num_key_value_heads' 3 does not divide 'num_attention_heads' 4", 30),
    Row("standin-into-a-file", "standin", {"config.json": OK_CONFIG, "out": "x"}, ["config.json", "out"], 2,
        "Invalid value for 'OUT_DIR': Directory 'out' is a file", 30),
    Row("standin-into-unwritable-folder", "standin", {"config.json": OK_CONFIG}, ["config.json", "{unwritable}/standin"], 2,
        "cannot write the stand-in into {unwritable}/standin: ", 60),
    Row("standin-config-is-a-fifo", "standin", {}, ["config.json", "out"], 2,
        "config.json: cannot read: not a regular file (a FIFO (named pipe))", 60, own_process=True, setup=_fifo("config.json")),
    # values build refuses, which the stand-in replaces by its own: refused as build refuses them
    Row("standin-negative-experts", "standin", {"config.json": config(QWEN3_MOE_CONFIG, num_experts=-8)}, ["config.json", "out"], 2,
        "config field 'num_experts' is -8: dims.num_moe_experts must be positive, got -8", 30),
    Row("standin-experts-a-string", "standin", {"config.json": config(QWEN3_MOE_CONFIG, num_experts="8")}, ["config.json", "out"], 2,
        "config field 'num_experts' is \"8\": dims.num_moe_experts must be an integer, got '8'", 30),
    Row("standin-layers-a-string", "standin", {"config.json": config(QWEN3_MOE_CONFIG, num_hidden_layers="4")}, ["config.json", "out"], 2,
        "config field 'num_hidden_layers' is \"4\": dims.num_layers must be an integer, got '4'", 30),
    Row("standin-layers-zero-no-family-spec", "standin", {"config.json": config(model_type="phi3", num_hidden_layers=0)}, ["config.json", "out"], 2,
        "config field 'num_hidden_layers' is 0: build takes a positive integer", 30),
]


def test_the_table_has_at_least_30_rows() -> None:
    assert len(ROWS) >= 30
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder this process cannot create files in: a read-only folder, or (as root, whom
    permissions do not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path_factory.mktemp("readonly")
        folder.chmod(0o555)
        return str(folder)
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys"
    os.close(fd)
    os.unlink(name)
    return ""  # the rows that need one are skipped


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Hang in this (the main) thread once `seconds` have passed."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _listing(folder: Path) -> set[str]:
    found: set[str] = set()
    for parent, folders, files in os.walk(folder):
        for name in (*folders, *files):
            found.add((Path(parent) / name).relative_to(folder).as_posix())
    return found


def _run(row: Row, folder: Path, unwritable: str) -> tuple[int, str]:
    args = [a.replace("{unwritable}", unwritable) for a in row.args]
    if row.own_process:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(testing.ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "mapgen.cli", row.command, *args],
                cwd=folder, env=env, capture_output=True, text=True, timeout=row.seconds,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{row.id}: hung (no answer in {row.seconds} s)")
        return done.returncode, done.stderr
    previous = Path.cwd()
    os.chdir(folder)
    try:
        with deadline(row.seconds):
            result = CliRunner().invoke(main, [row.command, *args])
    except Hang:
        pytest.fail(f"{row.id}: hung (no answer in {row.seconds} s)")
    finally:
        os.chdir(previous)
    if isinstance(result.exception, Hang):
        pytest.fail(f"{row.id}: hung (no answer in {row.seconds} s)")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, tmp_path: Path, unwritable: str) -> None:
    if "{unwritable}" in " ".join(row.args) and not unwritable:
        pytest.skip("no unwritable folder")
    for name, content in row.files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if row.setup is not None:
        row.setup(tmp_path)
    before = _listing(tmp_path)
    started = time.perf_counter()
    code, stderr = _run(row, tmp_path, unwritable)
    seconds = time.perf_counter() - started
    assert code == row.code, stderr
    assert row.message.replace("{unwritable}", unwritable) in stderr
    assert "Traceback" not in stderr and "[rank" not in stderr
    assert seconds < row.seconds
    assert _listing(tmp_path) == before | set(row.creates), "left behind"
    if row.setup is not None and row.id.startswith("output-") and "link" in row.id:
        assert (tmp_path / "out.py").is_symlink()  # the link is left as it was
    if row.id in ("output-device", "output-fifo", "output-socket"):
        assert not stat.S_ISREG(os.lstat(tmp_path / "out.py").st_mode)  # not replaced by a file


@pytest.mark.parametrize(
    "overrides", [{"num_experts": -8}, {"num_experts": "8"}, {"num_hidden_layers": "4"}, {"num_experts_per_tok": 0}],
    ids=["experts-negative", "experts-string", "layers-string", "top-k-zero"],
)
def test_standin_refuses_a_config_with_builds_own_messages(tmp_path: Path, overrides: dict[str, Any]) -> None:
    """`mapgen standin` and `mapgen build` read a config the same way: what build says about it
    (the truth here), standin says too, line for line, and writes nothing."""
    (tmp_path / "config.json").write_text(config(QWEN3_MOE_CONFIG, **overrides))
    spec_file = testing.ROOT / "specs" / "qwen3_moe.yaml"
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        built = CliRunner().invoke(main, ["build", str(spec_file), "config.json", "-o", "out.py"])
        standin = CliRunner().invoke(main, ["standin", "config.json", "out"])
    finally:
        os.chdir(previous)
    assert built.exit_code == standin.exit_code == 2, (built.stderr, standin.stderr)
    build_lines = [line for line in built.stderr.splitlines() if line.startswith("config.json:")]
    assert build_lines and all(line in standin.stderr.splitlines() for line in build_lines), (built.stderr, standin.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_later_build_removes_the_temporary_files_killed_builds_left(tmp_path: Path) -> None:
    """`-o X.py` and the package form: a `.NAME.py.*.tmp` of a build killed while writing (an
    older mapgen's name, or this host's with a process that is gone) is removed by the next
    build that writes NAME; a running build's, or another host's, is left alone."""
    import socket

    from mapgen.compiler.write import write_if_changed, write_package

    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a process that has exited (its id not reused in the meantime, as a rule)
    for target in (tmp_path / "one", tmp_path / "pk"):
        target.mkdir()
        left = [".x.py.abc123_z.tmp", f".x.py.{host}-{dead}.k2j3.tmp"]
        kept = [f".x.py.{host}-{os.getppid()}.live.tmp", f".x.py.otherhost-{dead}.xyz.tmp", ".y.py.abc.tmp"]
        for name in left + kept:
            (target / name).write_text("half a module")
        if target.name == "one":
            first = write_if_changed(target / "x.py", "X = 1\n")
            again = write_if_changed(target / "x.py", "X = 1\n")  # unchanged: still a build that succeeded
            assert first.changed and not again.changed
            assert sorted(p.name for p in first.removed) == sorted(left) and again.removed == ()
            assert sorted(p.name for p in target.iterdir()) == sorted(["x.py", *kept])
        else:
            written = write_package(target, {"__init__.py": "", "x.py": "X = 1\n"})
            assert {p.name for p in written.removed} >= set(left) and not {p.name for p in written.removed} & set(kept[:2])
            assert {".x.py.abc123_z.tmp", f".x.py.{host}-{dead}.k2j3.tmp"}.isdisjoint(p.name for p in target.iterdir())


# --- the gate on generated code: what ast.parse alone let through -----------------------------

PREAMBLE = "from __future__ import annotations\n\nfrom mapgen import runtime as rt\nfrom mapgen.common.dims import ModelDims\n\n"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("DIMS = ModelDims(layernorm_epsilon=nan)\n", "generated code uses 'nan', which nothing defines"),
        ("X = (1, 2, inf)\n", "generated code uses 'inf', which nothing defines"),
        ("def f(ctx: int) -> int:\n    return rt.no_such_function(ctx)\n", "uses rt.no_such_function, which mapgen.runtime does not have"),
        ("from mapgen.runtime import NoSuchPlan\n", "imports NoSuchPlan from mapgen.runtime, which has no such name"),
        ("import no_such_package_here\n", "imports no_such_package_here, which does not import"),
        ("return 1\n", "generated code does not compile: 'return' outside function"),
        ("def f(a, a):\n    return a\n", "generated code does not compile: duplicate argument 'a'"),
        ("T = (" + "".join(f"f{i}(), " for i in range(20)) + ")\n", "generated code uses 'f0', which nothing defines"),
        ("x = 1\nfrom __future__ import annotations\n", "'from __future__' import after other code"),
    ],
)
def test_gate_refuses_code_that_parses_but_does_not_import(source: str, message: str) -> None:
    with pytest.raises(GeneratedCodeError) as raised:
        check(PREAMBLE + source, "t")
    assert message in str(raised.value)


def test_gate_passes_bound_names() -> None:
    source = PREAMBLE + (
        "def import_a_1(ctx: rt.ParallelContext, load: rt.Loader) -> None:\n    return rt.whole_import(load('a'), out=None)\n\n\n"
        "PARAMS = (" + "".join("(import_a_1, len, ModelDims), " for _ in range(20)) + ")\n"
        "IMPORTS = {p[0]: p for p in PARAMS}\n"
    )
    check(source, "t")


# --- the HF inventory: one conversion per kind of layer, the same result -----------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_hf_inventory_converts_each_kind_of_layer_once(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inventory equals transformers' own conversion of the whole state dict (names and
    shapes), and the number of conversion calls does not grow with the layers."""
    import transformers.core_model_loading as loading

    from mapgen.compiler.hf_tensors import hf_inventory

    real = loading.revert_weight_conversion
    calls: list[int] = []

    def counted(model: Any, state: dict[str, Any]) -> Any:
        calls.append(len(state))
        return real(model, state)

    monkeypatch.setattr(loading, "revert_weight_conversion", counted)
    architecture = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "mixtral": "MixtralForCausalLM"}[family]
    counts = {}
    for layers in (4, 12):
        config = testing.tiny_hf_config(family, num_hidden_layers=layers).to_dict()
        calls.clear()
        found = hf_inventory(architecture, config)
        counts[layers] = len(calls)
        with torch.device("meta"):
            model = getattr(transformers, architecture)._from_config(
                transformers.AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
            )
        whole = real(model, dict(model.state_dict()))
        tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if config.get("tie_word_embeddings") else set()
        assert sorted((t.name, t.shape) for t in found) == sorted(
            (name, tuple(tensor.shape)) for name, tensor in whole.items() if name not in tied
        )
        assert len(found) > layers * 9
    assert counts[4] == counts[12]


# --- stand-ins: one KV head stays one ------------------------------------------------------------


def test_standin_keeps_a_single_kv_head() -> None:
    mqa = testing.standin_config({**BASE_CONFIG, "num_attention_heads": 8, "num_key_value_heads": 1})
    assert (mqa["num_attention_heads"], mqa["num_key_value_heads"]) == (4, 1)
    gqa = testing.standin_config({**BASE_CONFIG, "num_attention_heads": 8, "num_key_value_heads": 2})
    mha = testing.standin_config({**BASE_CONFIG, "num_attention_heads": 8, "num_key_value_heads": 8})
    assert gqa["num_key_value_heads"] == 2 and mha["num_key_value_heads"] == 4
    with pytest.raises(ValueError, match="needs 'num_attention_heads' as a positive integer"):
        testing.standin_config({**BASE_CONFIG, "num_attention_heads": None})


# --- a te module built outside the repository: verify finds its spec -----------------------------


def test_te_module_built_outside_the_repository_finds_its_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mapgen verify` of a te module needs the module's spec; `module_spec` finds it from the
    folder it was built in, and from anywhere when it is a spec mapgen ships (by sha256). A
    spec of the user's own, verified from another folder, is a clear error saying what to do."""
    from mapgen.compiler.build import compile_target
    from mapgen.compiler.packaged import module_spec
    from mapgen.verify.testing import import_module_from_path

    built, elsewhere = tmp_path / "built", tmp_path / "elsewhere"
    (built / "specs").mkdir(parents=True)
    elsewhere.mkdir()
    (built / "config.json").write_text(OK_CONFIG)
    (built / "specs" / "llama.yaml").write_text(LLAMA_SPEC)  # the shipped spec, byte for byte
    (built / "specs" / "mine.yaml").write_text(LLAMA_SPEC + "# my own\n")
    monkeypatch.chdir(built)
    for name in ("llama", "mine"):
        source = compile_target(name, Path(f"specs/{name}.yaml"), Path("config.json"), "te", "test")
        (built / f"{name}.py").write_text(source)
    shipped = import_module_from_path(built / "llama.py", "adversarial_te_llama")
    mine = import_module_from_path(built / "mine.py", "adversarial_te_mine")
    assert shipped.SOURCES[0] == "specs/llama.yaml" and mine.SOURCES[0] == "specs/mine.yaml"
    assert module_spec(built / "mine.py", mine.SOURCES[0]) == (built / "specs" / "mine.yaml").resolve()

    monkeypatch.chdir(elsewhere)
    found = module_spec(built / "llama.py", shipped.SOURCES[0])
    assert found.read_text() == LLAMA_SPEC and found.resolve() != (built / "specs" / "llama.yaml").resolve()
    with pytest.raises(MapgenError) as raised:
        module_spec(built / "mine.py", mine.SOURCES[0])
    assert "is needed to build the local-layout twin" in str(raised.value)
    assert "Run verify from the folder the module was built in" in str(raised.value)
