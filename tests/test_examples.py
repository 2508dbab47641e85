"""examples/ runs as examples/README.md says: each script under torchrun (two gloo processes on
CPU, TP2) or, for convert.sh, through the `mapgen convert` CLI, on a tiny Llama stand-in and its
local-layout package, built once. What each example claims is checked here from its outputs, not
from its printout alone: the files' tensors through safetensors, the trained checkpoint through
transformers, the Megatron checkpoint through torch.distributed.checkpoint's metadata. The
README's quick start must be examples/quickstart.py, byte for byte.

Time: about 15 s per torchrun start on the 2-core machine, 4 example runs."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mapgen
from mapgen.compiler.build import compile_package
from mapgen.compiler.write import write_package
from mapgen.verify import testing

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EVAL_TOKENS = list(range(1, 17))  # examples/train.py's EVAL_TOKENS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(module folder, HF folder): what examples/README.md's `mapgen standin` and `mapgen build
    --layout local` make, made in-process by the functions those commands call."""
    folder = tmp_path_factory.mktemp("examples")
    hf = folder / "llama_hf"
    testing.save_standin(json.loads((ROOT / "specs/configs/llama3_2_1b.json").read_text()), hf)
    files = compile_package("llama_local", ROOT / "specs/llama.yaml", hf / "config.json", "local", "test")
    write_package(folder / "llama_local", files)
    return folder / "llama_local", hf


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _env() -> dict[str, str]:
    """The venv's python and mapgen first on PATH, the repository importable, one thread per rank."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], timeout: int = 400) -> str:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def _torchrun(script: str, *args: str | Path) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(EXAMPLES / script), *map(str, args),
    ]
    return _run(command)


def test_quickstart_loads_runs_and_feeds_the_engine(prepared: tuple[Path, Path]) -> None:
    module, hf = prepared
    out = _torchrun("quickstart.py", module, hf)
    count = len(load_file(hf / "model.safetensors"))
    # 128 rows padded to 128 x TP2; every tensor of the checkpoint handed over, once
    assert f"logits (1, 8, 256); the engine got {count} tensors" in out, out


def test_quickstart_is_under_20_lines_of_code() -> None:
    """From install to import, forward, export and engine hand-off in under 20 lines of a
    user's own code: the quick start's lines that are not blank, a comment or its docstring."""
    source = (EXAMPLES / "quickstart.py").read_text()
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    lines = source.splitlines()[docstring.end_lineno :]
    code = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) < 20, "\n".join(code)


def test_train_saves_a_trained_checkpoint_that_transformers_loads(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """The saved checkpoint has the input's names, shapes and dtypes and different values; it
    loads in transformers with no key missing or unexpected, whose loss on the evaluation
    tokens is the trained megatron-core model's (over the unpadded vocabulary)."""
    import transformers

    module, hf = prepared
    saved = tmp_path / "trained"
    out = _torchrun("train.py", "--module", module, "--hf", hf, "--out", saved, "--steps", "4")
    assert re.findall(r"^step (\d+): loss \d", out, re.M) == ["1", "2", "3", "4"], out
    original, trained = _tensors(hf), _tensors(saved)
    assert {n: (t.dtype, t.shape) for n, t in trained.items()} == {n: (t.dtype, t.shape) for n, t in original.items()}
    changed = [name for name in original if not torch.equal(original[name], trained[name])]
    assert len(changed) == len(original), sorted(set(original) - set(changed))  # Adam moves every tensor
    assert json.loads((saved / "config.json").read_text()) == json.loads((hf / "config.json").read_text())

    model, info = transformers.AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    for name, parameter in model.state_dict().items():  # what transformers holds is the file's
        assert torch.equal(parameter, trained[name if name in trained else "model.embed_tokens.weight"]), name
    tokens = torch.tensor([EVAL_TOKENS])
    with torch.no_grad():
        logits = model(tokens).logits
    hf_loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).item()
    megatron_loss = float(re.findall(r"^eval loss (\S+)$", out, re.M)[0])
    assert abs(hf_loss - megatron_loss) < 1e-5, (hf_loss, megatron_loss)


def test_rl_refit_feeds_the_engine_the_models_weights(prepared: tuple[Path, Path]) -> None:
    module, hf = prepared
    out = _torchrun("rl_refit.py", "--module", module, "--hf", hf, "--steps", "4", "--refit-every", "2")
    count = len(load_file(hf / "model.safetensors"))
    refits = re.findall(r"^step (\d+): loss \S+; refit: (\d+) tensors \((\d+) changed\), bit-exact with the model$", out, re.M)
    assert refits == [("2", str(count), str(count)), ("4", str(count), str(count))], out


def test_convert_round_trips_through_a_megatron_checkpoint(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    module, hf = prepared
    out = _run(["bash", str(EXAMPLES / "convert.sh"), str(module), str(hf), str(tmp_path / "convert")])
    original = _tensors(hf)
    assert f"round trip: {len(original)} tensors bit-exact" in out, out
    back = _tensors(tmp_path / "convert" / "hf")
    assert sorted(back) == sorted(original)
    assert all(_same_bytes(back[name], original[name]) for name in original)
    # the Megatron-LM checkpoint between: a release, its embedding padded to 128 x TP2 rows
    megatron = tmp_path / "convert" / "megatron"
    assert (megatron / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    metadata = FileSystemReader(str(megatron / "release")).read_metadata().state_dict_metadata
    assert list(metadata["embedding.word_embeddings.weight"].size) == [256, original["model.embed_tokens.weight"].shape[1]]
    assert any(key.startswith("decoder.layers.") for key in metadata)


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, re.M | re.S)


def test_the_readme_quick_start_is_examples_quickstart() -> None:
    """README.md's quick start carries examples/quickstart.py verbatim as a ```python block."""
    pasted = (EXAMPLES / "quickstart.py").read_text() in _python_blocks((ROOT / "README.md").read_text())
    assert pasted, "README.md has no ```python block equal to examples/quickstart.py: update its quick start"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_use_only_the_public_api(script: str) -> None:
    """No `_private` name of mapgen, no mapgen submodule (mapgen.verify, mapgen.compiler, ...):
    only what `mapgen.__all__` names. The first docstring line says the file's job."""
    tree = ast.parse((EXAMPLES / script).read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.splitlines()[0].strip(), f"{script}: no docstring"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module is None or not node.module.startswith("mapgen"), f"{script}: from {node.module} import"
        if isinstance(node, ast.Import):
            assert all(alias.name == "mapgen" or not alias.name.startswith("mapgen") for alias in node.names), script
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mapgen":
            assert node.attr in mapgen.__all__, f"{script}: mapgen.{node.attr} is not public"
