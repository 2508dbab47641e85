"""Bad input to the runtime and to `mapgen verify`, one row each: it never hangs, never passes
silently, never ends in a traceback, and leaves nothing half-written on disk.

Each table row names the bad input, how it is made, and what must come of it: the exception
type (or exit code) and a fragment of the message, which names the file, tensor, parameter,
flag or rank at fault. Every test is time-bound: in-process rows by an alarm (`_time_bound`),
command-line rows run as subprocesses with `timeout=`, and the distributed rows inside one
spawn of two gloo processes at TP2 whose `timeout_s` turns a hang into a failure.

Tables: CHECKPOINT_ROWS (safetensors headers, offsets, shards, index), LAYOUT_ROWS and
VERIFY_ROWS (`mapgen verify` refusing before any process starts), API_ROWS (Converter and
save_hf_checkpoint given wrong arguments), SAVE_ROWS (single-process saves to bad targets),
DIST_ROWS (saves at TP2 whose writer fails: simulated OSError and SafetensorError, a real
immutable folder, a missing parent, a full file system, a file-size limit; checkpoints that
fail on both ranks; NaN weights verified), and a save killed by a signal mid-write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mapgen.verify import megatron_cpu, testing
from mapgen.compiler.build import compile_target
from mapgen.common.parallel import ParallelLayout

import dist_tasks

ROW_SECONDS = 240  # an in-process row that takes longer has hung
TP2 = ParallelLayout(tp=2)


@pytest.fixture(autouse=True)
def _time_bound() -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"row still running after {ROW_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(ROW_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the good inputs every row spoils ---------------------------------------------------------


LLAMA_CONFIG = testing.ROOT / "specs" / "configs" / "llama3_1_8b.json"


def _compile(folder: Path, name: str, spec: str = "specs/llama.yaml") -> Path:
    path = folder / f"{name}.py"
    path.write_text(compile_target(name, testing.ROOT / spec, folder / "config.json", "local", "test"))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Llama stand-in (4 layers, 4 heads, 2 KV heads, hidden 64, FFN 96, vocabulary 128),
    single-file and sharded, and its local-layout module."""
    root = tmp_path_factory.mktemp("adversarial")
    single = root / "single"
    model = testing.save_standin(json.loads(LLAMA_CONFIG.read_text()), single)
    module = _compile(single, "llama_standin")
    sharded = root / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    return {"root": root, "single": single, "sharded": sharded, "module": module}


def _copy(good: dict[str, Any], tmp_path: Path, kind: str = "single") -> Path:
    folder = tmp_path / f"bad_{kind}"
    shutil.copytree(good[kind], folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return folder


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path: Path, header: dict[str, Any] | bytes, body: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + body)


def _edit(folder: Path, change: Callable[[dict[str, Any]], None], file: str = "model.safetensors") -> None:
    header, body = _header(folder / file)
    change(header)
    _write(folder / file, header, body)


def _shard_of(folder: Path, name: str) -> str:
    return str(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name])


K = "model.layers.1.self_attn.k_proj.weight"
V = "model.layers.1.self_attn.v_proj.weight"
MODEL_FILE = "model.safetensors"


def _overlap(folder: Path) -> None:  # k_proj's offsets are v_proj's: k would read v's bytes
    def change(header: dict[str, Any]) -> None:
        header[K]["data_offsets"] = list(header[V]["data_offsets"])
    _edit(folder, change)


def _short(folder: Path) -> None:
    def change(header: dict[str, Any]) -> None:
        start, end = header[K]["data_offsets"]
        header[K]["data_offsets"] = [start, end - 4]
    _edit(folder, change)


def _reversed(folder: Path) -> None:
    def change(header: dict[str, Any]) -> None:
        start, end = header[K]["data_offsets"]
        header[K]["data_offsets"] = [end, start]
    _edit(folder, change)


def _no_offsets(folder: Path) -> None:
    _edit(folder, lambda header: header[K].pop("data_offsets"))


def _huge_header_length(folder: Path) -> None:
    header, body = _header(folder / MODEL_FILE)
    _write(folder / MODEL_FILE, header, body, length=2**62)


def _header_not_json(folder: Path) -> None:
    header, body = _header(folder / MODEL_FILE)
    raw = json.dumps(header).encode()
    _write(folder / MODEL_FILE, b"{not json" + raw[9:], body)


def _header_a_list(folder: Path) -> None:
    header, body = _header(folder / MODEL_FILE)
    _write(folder / MODEL_FILE, json.dumps(list(header)).encode(), body)


def _unknown_dtype(folder: Path) -> None:
    _edit(folder, lambda header: header[K].update(dtype="F33"))


def _bad_shape(folder: Path) -> None:
    _edit(folder, lambda header: header[K].update(shape=[32, "64"]))


def _gap(folder: Path) -> None:  # every tensor 4 bytes later, 4 stray bytes before them
    header, body = _header(folder / MODEL_FILE)
    for name, info in header.items():
        if name != "__metadata__":
            info["data_offsets"] = [offset + 4 for offset in info["data_offsets"]]
    _write(folder / MODEL_FILE, header, b"\x00" * 4 + body)


def _duplicate_key(folder: Path) -> None:
    header, body = _header(folder / MODEL_FILE)
    raw = json.dumps(header)
    entry = json.dumps({K: header[K]})[1:-1]
    _write(folder / MODEL_FILE, ("{" + entry + ", " + raw[1:]).encode(), body)


def _tiny_file(folder: Path) -> None:
    (folder / MODEL_FILE).write_bytes(b"\x10\x00")


def _trailing_bytes(folder: Path) -> None:
    with (folder / MODEL_FILE).open("ab") as handle:
        handle.write(b"\x00" * 12)


def _truncated(folder: Path) -> None:
    data = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(data[:-1000])


def _bad_metadata(folder: Path) -> None:
    _edit(folder, lambda header: header.update(__metadata__={"format": 3}))


def _tensor_in_two_shards(folder: Path) -> None:
    # the k_proj of layer 1 also written (with other bytes) into another shard's file
    home = _shard_of(folder, K)
    other = next(p for p in sorted(folder.glob("model-*.safetensors")) if p.name != home)
    from safetensors.torch import load_file

    tensors = load_file(other)
    tensors[K] = torch.zeros(32, 64)
    save_file(tensors, str(other), metadata={"format": "pt"})


def _index_names_missing_file(folder: Path) -> None:
    (folder / _shard_of(folder, K)).unlink()


def _index_not_json(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"weight_map": {', '"weight_map": {,', 1))


def _index_without_weight_map(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))


def _index_outside_folder(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"][K] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))


def _index_unlisted_tensor(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    del content["weight_map"][K]
    index.write_text(json.dumps(content))


def _index_lists_tensor_twice(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    line = f'"{K}": "{_shard_of(folder, K)}"'
    index.write_text(text.replace(line, f'{line},\n    "{K}": "model-00001-of-00006.safetensors"', 1))


# (row, kind of checkpoint, how it is spoilt, fragments the error names)
CHECKPOINT_ROWS: list[tuple[str, str, Callable[[Path], None], tuple[str, ...]]] = [
    ("overlapping-offsets", "single", _overlap, (MODEL_FILE, "overlap", "data_offsets")),
    ("short-offsets", "single", _short, (MODEL_FILE, K, "hold 8188 bytes, but F32 [32, 64] needs 8192")),
    ("reversed-offsets", "single", _reversed, (MODEL_FILE, K, "end before they start")),
    ("entry-without-offsets", "single", _no_offsets, (MODEL_FILE, K, "lacks 'data_offsets'")),
    ("absurd-header-length", "single", _huge_header_length, (MODEL_FILE, f"header of {2**62} bytes", "more than the file's")),
    ("header-not-json", "single", _header_not_json, (MODEL_FILE, "is not UTF-8 JSON")),
    ("header-a-list", "single", _header_a_list, (MODEL_FILE, "header is a JSON list, not an object")),
    ("unknown-dtype", "single", _unknown_dtype, (MODEL_FILE, K, "dtype 'F33' is not a safetensors dtype")),
    ("shape-not-integers", "single", _bad_shape, (MODEL_FILE, K, "is not a list of non-negative integers")),
    ("offsets-gap", "single", _gap, (MODEL_FILE, "gap of 4 bytes from the start")),
    ("tensor-twice-in-header", "single", _duplicate_key, (MODEL_FILE, f"'{K}' appears twice")),
    ("file-of-two-bytes", "single", _tiny_file, (MODEL_FILE, "not a safetensors file: 2 bytes")),
    ("trailing-bytes", "single", _trailing_bytes, (MODEL_FILE, "12 more than its header's tensors take")),
    ("truncated-file", "single", _truncated, (MODEL_FILE, "truncated:")),
    ("metadata-not-strings", "single", _bad_metadata, (MODEL_FILE, "__metadata__ must map names to strings")),
    ("tensor-in-two-shards", "sharded", _tensor_in_two_shards, (K, "is in 2 files", "places it in")),
    ("index-names-missing-file", "sharded", _index_names_missing_file, ("missing, but", "model.safetensors.index.json places")),
    ("index-not-json", "sharded", _index_not_json, ("model.safetensors.index.json:", "not JSON")),
    ("index-without-weight-map", "sharded", _index_without_weight_map, ("needs a 'weight_map' object",)),
    ("index-outside-folder", "sharded", _index_outside_folder, ("'../elsewhere.safetensors'", "inside the folder")),
    ("index-does-not-list-tensor", "sharded", _index_unlisted_tensor, (K, "which model.safetensors.index.json does not list")),
    ("index-lists-tensor-twice", "sharded", _index_lists_tensor_twice, ("model.safetensors.index.json:", f"'{K}' appears twice")),
]


@pytest.fixture(scope="module")
def llama(good: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The stand-in's module and a single-process megatron-core model for it."""
    from mapgen.compiler.gpt_model import build_gpt_model
    from mapgen.compiler.parallel_state import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()
    megatron_cpu.prepare_cpu_megatron()
    module = testing.import_module_from_path(good["module"], "adversarial_llama")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
    return module, [model]


@pytest.mark.parametrize(("row", "kind", "spoil", "fragments"), CHECKPOINT_ROWS, ids=[r[0] for r in CHECKPOINT_ROWS])
def test_bad_checkpoint_is_refused_naming_file_and_tensor(
    good: dict[str, Any], llama: tuple[Any, list[Any]], tmp_path: Path,
    row: str, kind: str, spoil: Callable[[Path], None], fragments: tuple[str, ...],
) -> None:
    from mapgen.runtime.collectives import RankError
    from mapgen.runtime.drivers import load_hf_checkpoint

    folder = _copy(good, tmp_path, kind)
    spoil(folder)
    before = [p.clone() for p in llama[1][0].parameters()]
    with pytest.raises(RankError) as raised:
        load_hf_checkpoint(llama[0], llama[1], folder)
    message = str(raised.value)
    assert message.startswith(f"cannot load {folder} into llama_standin:"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in message
    # refused before any weight was written
    assert all(torch.equal(a, b) for a, b in zip(before, llama[1][0].parameters()))


def test_the_good_checkpoints_load(good: dict[str, Any], llama: tuple[Any, list[Any]]) -> None:
    """The rows above fail for their spoilt input, not for the checkpoints they start from."""
    from mapgen.runtime.drivers import load_hf_checkpoint

    for kind in ("single", "sharded"):
        assert load_hf_checkpoint(llama[0], llama[1], good[kind]) == len(llama[0].PARAMS)


# --- `mapgen verify`: everything known from the module's DIMS is said before a process starts ---


def _verify(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """`mapgen verify ARGS` in this process (click's runner); starting processes is an error."""
    from mapgen import cli
    from mapgen.verify import jobs as verify

    def no_spawn(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("mapgen verify started processes for a bad input")

    original = verify.spawn
    verify.spawn = no_spawn  # type: ignore[assignment]
    try:
        result = CliRunner().invoke(cli.main, ["verify", *args], env=env, catch_exceptions=False)
    finally:
        verify.spawn = original  # type: ignore[assignment]
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


# (row, flags, fragments of the message) for the Llama stand-in: 4 layers, 4 heads, 2 KV heads
LAYOUT_ROWS: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("tp8-heads", ["--tp", "8"], ("--tp 8 does not divide the 4 attention heads of llama_standin",)),
    ("tp4-query-groups", ["--tp", "4"], ("--tp 4 does not divide the 2 query groups (KV heads)",)),
    ("tp3-split-dims", ["--tp", "3"], ("--tp 3 does not divide the 4 attention heads", "--tp 3 does not divide dim 0 (128) of decoder.layers.0.self_attention.linear_qkv.weight and 3 more", "dim 1 (64) of decoder.layers.0.self_attention.linear_proj.weight")),
    ("etp-negative", ["--etp", "-1"], ("--etp must be a positive integer, got -1",)),
    ("dp-zero", ["--dp", "0"], ("--dp must be a positive integer, got 0",)),
    ("tp-zero", ["--tp", "0"], ("--tp must be a positive integer, got 0",)),
    ("first-stage-takes-all", ["--pp", "2", "--first-stage-layers", "4"], ("--pp 2 --first-stage-layers 4 on the 4 layers of llama_standin: leaves 0 layer(s) for 1 other stage(s)",)),
    ("pp3-layers", ["--pp", "3"], ("--pp 3 does not divide the 4 layers of llama_standin",)),
    ("vpp4-stage-layers", ["--pp", "2", "--vpp", "4"], ("--vpp 4 does not divide the 2 layers of each of the 2 pipeline stages",)),
    ("uneven-without-pp", ["--last-stage-layers", "1"], ("--last-stage-layers 1 needs --pp 2 or more",)),
    ("uneven-vpp", ["--pp", "2", "--vpp", "2", "--first-stage-layers", "1"], ("--first-stage-layers 1 is not a multiple of --vpp 2",)),
    ("ep-on-dense-model", ["--ep", "2"], ("--ep 2: llama_standin has no experts to distribute",)),
    ("expert-grid", ["--etp", "2", "--dp", "1"], ("--etp 2: llama_standin has no experts",)),
    ("too-many-processes", ["--dp", "100"], ("needs 100 processes; verify starts at most 64",)),
    ("vpp-without-pp", ["--vpp", "2"], ("--vpp 2 needs --pp 2 or more",)),
    ("dp-beyond-the-limit", ["--dp", str(10**12)], (f"--dp {10**12} is above mapgen's limit of 131,072 ranks",)),
    ("world-beyond-the-limit", ["--tp", "2", "--dp", "100000"], ("= 200,000 ranks is above mapgen's limit of 131,072 ranks",)),
    ("vocab-divisor-beyond-the-limit", ["--make-vocab-size-divisible-by", str(10**21)], (f"--make-vocab-size-divisible-by {10**21} is above mapgen's limit of 16,384",)),
]


@pytest.mark.parametrize(("row", "flags", "fragments"), LAYOUT_ROWS, ids=[r[0] for r in LAYOUT_ROWS])
def test_verify_refuses_a_bad_layout_before_starting_processes(
    good: dict[str, Any], row: str, flags: list[str], fragments: tuple[str, ...]
) -> None:
    started = time.perf_counter()
    code, output = _verify([str(good["module"]), str(good["single"]), *flags])
    assert code == 2, output
    for fragment in fragments:
        assert fragment in output, (fragment, output)
    assert "Traceback" not in output
    assert time.perf_counter() - started < 60


def test_verify_under_torchrun_checks_the_world_size(good: dict[str, Any]) -> None:
    code, output = _verify([str(good["module"]), str(good["single"]), "--tp", "2"], env={"RANK": "0", "WORLD_SIZE": "3"})
    assert code == 2 and "needs tp x pp x dp = 2 processes, torchrun started 3" in output, output


@pytest.fixture(scope="module")
def moe_module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Mixtral stand-in's module (8 experts, expert FFN 32): only its DIMS and PARAMS are used."""
    import transformers

    folder = tmp_path_factory.mktemp("moe")
    tiny = testing.standin_config(json.loads((testing.ROOT / "specs" / "configs" / "mixtral_8x7b.json").read_text()))
    config = transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    config.save_pretrained(folder)
    path = _compile(folder, "mixtral_standin", "specs/mixtral.yaml")
    return testing.import_module_from_path(path, "adversarial_mixtral")


MOE_LAYOUT_ROWS = [
    ("ep3-experts", ParallelLayout(ep=3, dp=3), "--ep 3 does not divide the 8 experts of mixtral_standin"),
    ("etp5-expert-ffn", ParallelLayout(ep=2, etp=5, dp=10), "--etp 5 does not divide dim 0 (192) of decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight and 31 more"),
    ("expert-grid-too-big", ParallelLayout(tp=2, ep=4), "expert-TP x EP = 8 does not divide"),
]


@pytest.mark.parametrize(("row", "layout", "fragment"), MOE_LAYOUT_ROWS, ids=[r[0] for r in MOE_LAYOUT_ROWS])
def test_expert_layouts_are_checked_against_the_module(moe_module: Any, row: str, layout: ParallelLayout, fragment: str) -> None:
    from mapgen.verify.jobs import layout_problems

    problems = layout_problems(moe_module, layout)
    assert any(fragment in p for p in problems), problems


def _config_heads(folder: Path) -> None:  # same tensor shapes, another model: 2 heads of 32
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 2
    config["head_dim"] = 32
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _config_rope(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10.0
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{\n  \"hidden_size\": 64,\n")


def _missing_tensor(folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(folder / MODEL_FILE)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})


def _not_python(folder: Path) -> Path:
    (folder / "notes.txt").write_text("not a module\n")
    return folder / "notes.txt"


def _not_a_mapping_module(folder: Path) -> Path:
    (folder / "helper.py").write_text("X = 1\n")
    return folder / "helper.py"


def _syntax_error(folder: Path) -> Path:
    (folder / "broken.py").write_text("TARGET = 'x'\nPARAMS = (\n")
    return folder / "broken.py"


# (row, checkpoint kind, how it is spoilt, the module given instead of the good one, fragments)
VERIFY_ROWS: list[tuple[str, str, Callable[[Path], None] | None, Callable[[Path], Path] | None, tuple[str, ...]]] = [
    ("config-heads-differ", "single", _config_heads, None, ("config.json does not describe the model", "gives num_attention_heads 2", "was built with 4")),
    ("config-rope-differs", "single", _config_rope, None, ("gives rotary_base 10.0", "was built with 500000.0")),
    ("config-not-json", "single", _config_not_json, None, ("config.json:", "JSON")),
    ("tensor-in-two-shards", "sharded", _tensor_in_two_shards, None, (K, "is in 2 files")),
    ("missing-tensor", "single", _missing_tensor, None, ("missing tensor 'model.layers.2.mlp.up_proj.weight'",)),
    ("module-not-python", "single", None, _not_python, ("notes.txt: not a mapgen mapping module: not a Python file",)),
    ("module-not-a-mapping", "single", None, _not_a_mapping_module, ("helper.py: not a mapgen mapping module", "lacks TARGET (missing)")),
    ("module-syntax-error", "single", None, _syntax_error, ("broken.py:2:", "not a mapgen mapping module")),
    ("module-not-found", "single", None, lambda folder: folder / "absent_module", ("absent_module: neither a file",)),
]


@pytest.mark.parametrize(("row", "kind", "spoil", "module", "fragments"), VERIFY_ROWS, ids=[r[0] for r in VERIFY_ROWS])
def test_verify_refuses_bad_input_before_starting_processes(
    good: dict[str, Any], tmp_path: Path, row: str, kind: str,
    spoil: Callable[[Path], None] | None, module: Callable[[Path], Path] | None, fragments: tuple[str, ...],
) -> None:
    folder = _copy(good, tmp_path, kind)
    if spoil is not None:
        spoil(folder)
    path = module(tmp_path) if module is not None else good["module"]
    code, output = _verify([str(path), str(folder)])
    assert code == 2, output
    for fragment in fragments:
        assert fragment in output, (fragment, output)
    assert "Traceback" not in output


@pytest.mark.parametrize("flags", [["--tp", "8"], ["--pp", "2", "--first-stage-layers", "4"]], ids=["tp8", "first-stage-takes-all"])
def test_verify_command_exits_2_at_once(good: dict[str, Any], flags: list[str]) -> None:
    """As users run it: a process of its own, exit code 2, the reason on stderr, in seconds
    (it took 79 s and a megatron-core traceback to refuse --tp 8)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mapgen.cli", "verify", str(good["module"]), str(good["single"]), *flags],
        capture_output=True, text=True, timeout=300, cwd=testing.ROOT,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not divide" in result.stderr or "leaves 0 layer(s)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert time.perf_counter() - started < 120


# --- the Python API given the wrong things ---------------------------------------------------


def _without_imports(module: Any) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(**{k: getattr(module, k) for k in ("TARGET", "PARAMS", "HF_TENSORS", "EXPORTS", "TIED")}, IMPORTS={})


# (row, call given (module, chunks, a good checkpoint folder), exception type name, fragments)
API_ROWS: list[tuple[str, Callable[[Any, list[Any], Path], Any], str, tuple[str, ...]]] = [
    ("converter-of-an-object", lambda m, c, hf: _converter(object(), c), "ModuleArgumentError", ("object is not a mapgen mapping module", "lacks TARGET (missing), PARAMS (missing)")),
    ("converter-of-a-namespace-without-imports", lambda m, c, hf: _converter(_without_imports(m), c), "ModuleArgumentError", ("no import or export function for embedding.word_embeddings.weight",)),
    ("chunks-not-a-list", lambda m, c, hf: _converter(m, c[0]).load(hf), "RankError", ("chunks must be a list of this rank's model chunks", "not a GPTModel")),
    ("chunk-not-a-model", lambda m, c, hf: _converter(m, [object()]).load(hf), "RankError", ("model chunk 0 is a object, not a megatron-core model",)),
    ("two-chunks-without-vpp", lambda m, c, hf: _converter(m, [c[0], c[0]]).load(hf), "RankError", ("2 model chunks given for virtual pipeline size 1",)),
    ("ctx-not-a-context", lambda m, c, hf: _converter(m, c, ctx="tp2"), "ModuleArgumentError", ("ctx must be a ParallelContext", "not a str")),
    ("vocab-divisor-zero", lambda m, c, hf: _converter(m, c, make_vocab_size_divisible_by=0), "ValueError", ("make_vocab_size_divisible_by must be positive, not 0",)),
    ("export-with-bad-chunks", lambda m, c, hf: list(_converter(m, [object()]).export()), "RankError", ("cannot export with llama_standin", "model chunk 0")),
    ("save-of-an-object", lambda m, c, hf: _save(object(), c, hf), "ModuleArgumentError", ("save_hf_checkpoint: object is not a mapgen mapping module",)),
]


def _converter(module: Any, chunks: Any, **kwargs: Any) -> Any:
    from mapgen.runtime.drivers import Converter

    return Converter(module, chunks, **kwargs)


def _save(module: Any, chunks: Any, hf: Path) -> None:
    from mapgen.runtime.save import save_hf_checkpoint

    save_hf_checkpoint(module, chunks, hf.parent / "never_written", {})


@pytest.mark.parametrize(("row", "call", "error", "fragments"), API_ROWS, ids=[r[0] for r in API_ROWS])
def test_python_api_refuses_wrong_arguments_clearly(
    good: dict[str, Any], llama: tuple[Any, list[Any]], row: str, call: Callable[[Any, list[Any], Path], Any],
    error: str, fragments: tuple[str, ...],
) -> None:
    with pytest.raises(Exception) as raised:
        call(*llama, good["single"])
    assert type(raised.value).__name__ == error, raised.value
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    if error == "ModuleArgumentError":
        assert isinstance(raised.value, TypeError)  # what Python code expects of a wrong argument
    assert not (good["single"].parent / "never_written").exists()


# --- saving to a bad target, one process ------------------------------------------------------


def _exists(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("the user's")
    return tmp_path / "out", {}


def _file_target(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    (tmp_path / "out").write_text("a file")
    return tmp_path / "out", {"overwrite": True}


# (row, the target and keywords, exception type name, fragments)
SAVE_ROWS: list[tuple[str, Callable[[Path], tuple[Path, dict[str, Any]]], str, tuple[str, ...]]] = [
    ("target-exists", _exists, "RankError", ("already exists (overwrite=True replaces it)",)),
    ("parent-missing", lambda t: (t / "no" / "such" / "out", {}), "RankError", ("parent folder", "/no/such does not exist")),
    ("target-is-a-file", _file_target, "RankError", ("exists and is not a folder",)),
    ("writer-rank-outside-world", lambda t: (t / "out", {"writer_rank": 3}), "ValueError", ("writer_rank 3 is not a rank of the 1 processes",)),
    ("max-shard-bytes-zero", lambda t: (t / "out", {"max_shard_bytes": 0}), "ValueError", ("max_shard_bytes must be a positive integer, not 0",)),
    ("config-not-json", lambda t: (t / "out", {"hf_config": {"torch_dtype": torch.float32}}), "RankError", ("hf_config cannot be written as config.json",)),
    ("config-not-a-dict", lambda t: (t / "out", {"hf_config": "config.json"}), "RankError", ("hf_config must be a dict", "not a str")),
]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(("row", "target", "error", "fragments"), SAVE_ROWS, ids=[r[0] for r in SAVE_ROWS])
def test_save_to_a_bad_target_is_refused_and_leaves_nothing(
    good: dict[str, Any], llama: tuple[Any, list[Any]], tmp_path: Path, row: str,
    target: Callable[[Path], tuple[Path, dict[str, Any]]], error: str, fragments: tuple[str, ...],
) -> None:
    from mapgen.runtime.save import save_hf_checkpoint

    out, keywords = target(tmp_path)
    config = keywords.pop("hf_config", json.loads((good["single"] / "config.json").read_text()))
    before = _listing(tmp_path)
    with pytest.raises(Exception) as raised:
        save_hf_checkpoint(llama[0], llama[1], out, config, **keywords)
    assert type(raised.value).__name__ == error, raised.value
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    assert str(out) in str(raised.value) or error == "ValueError"
    assert _listing(tmp_path) == before  # nothing written, nothing removed


def test_overwrite_replaces_a_checkpoint_only_once_the_new_one_is_whole(
    good: dict[str, Any], llama: tuple[Any, list[Any]], tmp_path: Path
) -> None:
    from mapgen.runtime.drivers import load_hf_checkpoint
    from mapgen.runtime.save import save_hf_checkpoint

    module, chunks = llama
    load_hf_checkpoint(module, chunks, good["single"])
    out, _ = _exists(tmp_path)
    save_hf_checkpoint(module, chunks, out, json.loads((good["single"] / "config.json").read_text()), overwrite=True, max_shard_bytes=100_000)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or set-aside folder left
    assert load_hf_checkpoint(module, chunks, out) == len(module.PARAMS)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_stale_partial_folders_of_dead_saves_are_removed_by_the_next_save(
    good: dict[str, Any], llama: tuple[Any, list[Any]], tmp_path: Path
) -> None:
    from mapgen.runtime import drivers, save

    module, chunks = llama
    drivers.load_hf_checkpoint(module, chunks, good["single"])
    from mapgen.common.files import host_tag

    host = host_tag()
    dead = tmp_path / f".out.partial-{host}-{_dead_pid()}-x1y2z3ab"
    live = tmp_path / f".out.partial-{host}-{os.getpid()}-x1y2z3ab"  # a save in progress elsewhere
    elsewhere = tmp_path / f".out.partial-otherhost-{_dead_pid()}-x1y2z3ab"  # another machine's
    other_target = tmp_path / f".other.partial-{host}-{_dead_pid()}-x1y2z3ab"
    for folder in (dead, live, elsewhere, other_target):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    save.save_hf_checkpoint(module, chunks, tmp_path / "out", json.loads((good["single"] / "config.json").read_text()))
    assert not dead.exists()
    assert live.exists() and elsewhere.exists() and other_target.exists()
    assert save.remove_stale_partials(tmp_path / "out") == []


KILLED_SAVE = """
import os, sys, time
from pathlib import Path
import torch
from mapgen.verify import megatron_cpu, testing
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.compiler.parallel_state import ensure_single_process_parallel_state
from mapgen.runtime import drivers, save

module_path, hf_dir, out = sys.argv[1:4]
module = testing.import_module_from_path(Path(module_path), "killed_save")
ensure_single_process_parallel_state()
megatron_cpu.prepare_cpu_megatron()
model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
drivers.load_hf_checkpoint(module, [model], hf_dir)
original, written = save.save_file, []

def save_then_wait(tensors, path, metadata=None):
    original(tensors, path, metadata=metadata)
    written.append(path)
    if len(written) == 2:  # two files on disk, the save half done: the signal comes now
        print("WRITING", path, flush=True)
        time.sleep(600)

save.save_file = save_then_wait
save.save_hf_checkpoint(module, [model], out, {"model_type": "llama"}, max_shard_bytes=100_000)
"""


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_save_killed_mid_write_is_cleaned_up_by_the_next_save(
    good: dict[str, Any], llama: tuple[Any, list[Any]], tmp_path: Path, kill: signal.Signals
) -> None:
    """A save killed while writing cannot remove its partial folder; the next save to the same
    target removes it (its process is gone), and the killed save never left a target."""
    from mapgen.runtime.drivers import load_hf_checkpoint
    from mapgen.runtime.save import save_hf_checkpoint

    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(good["module"]), str(good["single"]), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=testing.ROOT,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # the alarm bounds this wait
        assert line.startswith("WRITING"), line
        child.send_signal(kill)
        assert child.wait(timeout=60) == -kill
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    (partial,) = tmp_path.glob(".out.partial-*")
    assert len(list(partial.glob("*.safetensors"))) == 2 and not out.exists()
    module, chunks = llama
    load_hf_checkpoint(module, chunks, good["single"])
    save_hf_checkpoint(module, chunks, out, json.loads((good["single"] / "config.json").read_text()))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load_hf_checkpoint(module, chunks, out) == len(module.PARAMS)


# --- at TP2: the writer fails, for real and simulated; every rank agrees, none waits ----------
# One spawn of two gloo processes runs every row (its timeout_s turns a hang into a failure).
# The real failures: a parent folder made immutable (`chattr +i`: even root cannot create in
# it), a parent that does not exist, a file system that fills up (a 64 KiB tmpfs), and a
# file-size limit on the writing process (RLIMIT_FSIZE: the kernel refuses with EFBIG).


def _run(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(folder / MODEL_FILE)
    tensors["model.layers.0.mlp.up_proj.weight"][3, :5] = float("nan")
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})


# (row, what the target or checkpoint is, the fault the writer meets, fragments of the agreed error)
DIST_ROWS: list[tuple[str, str, str | None, tuple[str, ...]]] = [
    ("simulated-oserror", "fresh", "oserror", ("rank 0:", "writing", "model-00002-of-", "OSError: No space left on device (simulated)")),
    ("simulated-safetensor-error", "fresh", "safetensor_error", ("rank 0:", "writing", "SafetensorError:", "(simulated)")),
    ("immutable-parent", "immutable", None, ("rank 0:", "cannot create a folder in", "Operation not permitted")),
    ("missing-parent", "missing", None, ("rank 0:", "parent folder", "does not exist")),
    ("full-file-system", "full", None, ("rank 0:", "writing", "SafetensorError", "No space left on device")),
    ("file-size-limit", "fresh", "fsize", ("rank 0:", "writing", "SafetensorError", "File too large")),
    ("target-exists", "exists", None, ("rank 0:", "already exists")),
]
DIST_CHECKPOINT_ROWS: list[tuple[str, str, Callable[[Path], None], tuple[str, ...]]] = [
    ("overlapping-offsets", "single", _overlap, ("ranks 0,1:", "overlap", MODEL_FILE)),
    ("tensor-in-two-shards", "sharded", _tensor_in_two_shards, ("ranks 0,1:", K, "is in 2 files")),
]


@pytest.fixture(scope="module")
def distributed(good: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mapgen.verify.jobs import run_job
    from mapgen.verify.processes import spawn
    from mapgen.verify.verdict import Job

    root = tmp_path_factory.mktemp("distributed_bad")
    module, single = str(good["module"]), str(good["single"])
    tasks: list[tuple[Any, tuple[Any, ...]]] = []
    labels: list[str] = []
    targets: dict[str, Path] = {}
    immutable, full = root / "immutable", root / "full"
    immutable.mkdir()
    full.mkdir()
    (root / "exists" / "out").mkdir(parents=True)
    flagged = _run(["chattr", "+i", str(immutable)])
    try:
        available = {
            "immutable": flagged and not _run(["mkdir", str(immutable / "probe")]),
            "full": _run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)]),
        }
        for row, kind, fault, _ in DIST_ROWS:
            if not available.get(kind, True):
                continue
            parents = {"immutable": immutable, "full": full, "missing": root / "missing" / "nested", "exists": root / "exists"}
            parent = parents.get(kind) or root / row
            if kind == "fresh":
                parent.mkdir()
            targets[row] = parent / "out"
            tasks.append((dist_tasks.save_fails, (module, single, TP2, str(parent / "out"), fault)))
            labels.append(f"save {row}")
        for row, kind, spoil, _ in DIST_CHECKPOINT_ROWS:
            folder = root / f"checkpoint_{row}"
            shutil.copytree(good[kind], folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
            spoil(folder)
            tasks.append((dist_tasks.expect_error, (module, str(folder), TP2)))
            labels.append(f"checkpoint {row}")
        nan = root / "nan"
        shutil.copytree(good["single"], nan, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        _nan_weights(nan)
        tasks.append((run_job, (Job(module, str(nan), TP2),)))
        labels.append("verify nan")
        started = time.perf_counter()
        results = spawn(tasks, 2, timeout_s=900)
        seconds = time.perf_counter() - started
        # what each row left on disk, looked at before the immutable flag and the mount go
        leftovers = {
            row: sorted(p.name for p in target.parent.iterdir()) if target.parent.is_dir() else []
            for row, target in targets.items()
        }
    finally:
        if flagged:
            _run(["chattr", "-i", str(immutable)])
        if os.path.ismount(full):
            _run(["umount", str(full)])
    return {
        "by_label": {label: [results[r][i] for r in range(2)] for i, label in enumerate(labels)},
        "available": available, "leftovers": leftovers, "seconds": seconds, "nan": nan,
    }


def _outcome(distributed: dict[str, Any], label: str) -> list[Any]:
    """Both ranks' results of one row; a task that raised shows its traceback here."""
    from mapgen.verify.processes import TaskFailed

    results: list[Any] = distributed["by_label"][label]
    for result in results:
        assert not isinstance(result, TaskFailed), result.traceback
    return results


@pytest.mark.parametrize(("row", "kind", "fault", "fragments"), DIST_ROWS, ids=[r[0] for r in DIST_ROWS])
def test_failed_distributed_save_is_agreed_by_every_rank_and_leaves_nothing(
    distributed: dict[str, Any], row: str, kind: str, fault: str | None, fragments: tuple[str, ...]
) -> None:
    if not distributed["available"].get(kind, True):
        pytest.skip(f"this machine cannot make a {kind} folder (needs root, chattr and mount)")
    errors = [r["error"] for r in _outcome(distributed, f"save {row}")]
    assert all(e is not None for e in errors), errors
    assert errors[0] == errors[1]  # the same report on both ranks: rank 1 did not wait forever
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert errors[0].startswith("RankError: cannot save llama_standin to ") and "Traceback" not in errors[0]
    expected = ["out"] if kind == "exists" else []  # the user's folder stays; nothing else does
    assert distributed["leftovers"][row] == expected


@pytest.mark.parametrize(("row", "kind", "spoil", "fragments"), DIST_CHECKPOINT_ROWS, ids=[r[0] for r in DIST_CHECKPOINT_ROWS])
def test_bad_checkpoint_is_the_same_error_on_both_ranks(
    distributed: dict[str, Any], row: str, kind: str, spoil: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    messages = [message for message, _ in _outcome(distributed, f"checkpoint {row}")]
    assert messages[0] is not None and messages[0] == messages[1], messages
    for fragment in fragments:
        assert fragment in messages[0], (fragment, messages[0])


def test_nan_weights_are_reported_as_nan_and_export_bit_exact(distributed: dict[str, Any]) -> None:
    """NaN != NaN, but the exported bytes are the checkpoint's: every tensor bit-exact, the
    verdict FAILED because NaN logits prove nothing, and it says which tensor holds NaN."""
    from safetensors.torch import load_file

    result = _outcome(distributed, "verify nan")[0]
    assert result.error is None, result.error
    assert result.tensors == len(load_file(distributed["nan"] / MODEL_FILE))
    assert result.bit_exact == result.tensors and result.mismatched == []
    assert not result.ok
    summary = result.summary()
    assert "FAILED" in summary and "differ" not in summary
    assert "the checkpoint holds NaN or inf in model.layers.0.mlp.up_proj.weight (5 NaN, model.safetensors)" in summary


def test_the_distributed_rows_took_seconds_not_a_timeout(distributed: dict[str, Any]) -> None:
    for label in distributed["by_label"]:
        if label.startswith("save "):
            results = _outcome(distributed, label)
            assert max(r["seconds"] for r in results) < 60, (label, results)
    assert distributed["seconds"] < 600
