"""`mapgen convert` (issue 15): HF checkpoints to and from megatron-core distributed checkpoints
in Megatron-LM's layout, against truths mapgen did not produce.

- megatron-core's own `dist_checkpointing.load` of a checkpoint mapgen wrote at TP1, into a model
  at TP2xPP2 (Llama) and TP2xPP2xEP2 (Qwen3-MoE), gives exactly the parameters of mapgen's
  direct import at that layout;
- a checkpoint megatron-core wrote itself (`dist_checkpointing.save`, seeded weights set without
  mapgen) converts to HF, and transformers' logits of it are the megatron-core model's;
- HF -> Megatron -> HF, written at one layout and read at another, gives the original
  safetensors bit for bit (Llama, Qwen3-MoE, the DeepSeek-V3 and GLM-4.5 stand-ins; bfloat16;
  a padded vocabulary), and the TE-spec tensor names are the te module's parameter names;
- bad input is refused with the CLI's clear errors before any process starts, or agreed on by
  every rank before megatron-core reads a byte; a failed write leaves nothing.

Everything distributed runs in one spawn of 4 gloo processes.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mapgen.compiler.build import compile_target
from mapgen.common.parallel import ParallelLayout
from mapgen.convert_job import ConvertJob, ConvertResult
from mapgen.convert_rank import run_convert
from mapgen.megatron_checkpoint import read_megatron_checkpoint
from mapgen.verify import forward, testing
from mapgen.verify.processes import TaskFailed, spawn
from mapgen.verify.verdict import same_bits

import convert_tasks

WORLD = 4
STANDINS = {  # stand-in name: (config of a checked-in target, spec)
    "llama": ("llama3_1_8b.json", "specs/llama.yaml"),
    "qwen3_moe": ("qwen3_30b_a3b.json", "specs/qwen3_moe.yaml"),
    "deepseek": ("deepseek_v3.json", "specs/deepseek_v3.yaml"),
    "moonlight": ("moonlight_16b_a3b.json", "specs/deepseek_v3.yaml"),  # MLA without a q down-projection
    "glm": ("glm4_5.json", "specs/glm4_moe.yaml"),  # GLM-4.5: q/k norms, qkv biases, MTP layer
    # Qwen3.5 as published: the vision-language config and names (model.language_model.*, mtp.*)
    "qwen3_5": ("qwen3_5_0_8b.json", "specs/qwen3_5.yaml"),
    # Nemotron 3 Nano: Mamba, attention, MLP and expert layers (megatron-core's Mamba/Hybrid model)
    "nemotron": ("nemotron_3_nano_30b_a3b.json", "specs/nemotron_h.yaml"),
}


def _layout(**sizes: int) -> ParallelLayout:
    """A layout on the 4 processes: dp takes what tp x pp leaves."""
    tp, pp = sizes.get("tp", 1), sizes.get("pp", 1)
    return ParallelLayout(**sizes, dp=WORLD // (tp * pp))


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _bit_exact(original: Path, converted: Path, dtype: torch.dtype | None = None) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) between two HF checkpoints; with `dtype`, the
    original cast to it first (float tensors of the model's dtype only: the router bias stays)."""
    ours, theirs = _hf_tensors(converted), _hf_tensors(original)
    differ = sorted(set(ours) ^ set(theirs))
    for name in set(ours) & set(theirs):
        expected = theirs[name]
        if dtype is not None and expected.dtype == torch.float32 and ours[name].dtype == dtype:
            expected = expected.to(dtype)
        if not same_bits(ours[name], expected):
            differ.append(name)
    return len(theirs), differ


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Each stand-in's HF folder, its local module and its te module."""
    root = tmp_path_factory.mktemp("convert_standins")
    found: dict[str, dict[str, Path]] = {}
    for name, (config, spec) in STANDINS.items():
        folder = root / name
        testing.save_standin(json.loads((testing.ROOT / "specs" / "configs" / config).read_text()), folder)
        paths = {"hf": folder}
        for layout in ("local", "te"):
            module = root / f"{name}_{layout}.py"
            module.write_text(compile_target(f"{name}_{layout}", testing.ROOT / spec, folder / "config.json", layout, "test"))
            paths[layout] = module
        found[name] = paths
    return found


def _job(standins: dict[str, dict[str, Path]], name: str, direction: str, source: Path, out: Path, layout: ParallelLayout, **settings: Any) -> ConvertJob:
    config = json.loads((standins[name]["hf"] / "config.json").read_text())
    return ConvertJob(direction, str(standins[name]["local"]), str(source), str(out), layout, config, progress=False, **settings)


@pytest.fixture(scope="module")
def outcome(standins: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every distributed check, in one spawn of 4 processes: (label, task) in order."""
    root = tmp_path_factory.mktemp("convert_runs")
    s = standins
    (root / "existing").mkdir()
    (root / "existing" / "old.txt").write_text("the checkpoint an overwrite replaces\n")
    tasks: list[tuple[str, Any, tuple[Any, ...]]] = [
        # 1. written at TP1 by mapgen, read by megatron-core itself at TP2xPP2 (and EP2)
        ("llama tp1", run_convert, (_job(s, "llama", "hf-to-megatron", s["llama"]["hf"], root / "llama_tp1", _layout()),)),
        ("llama load tp2xpp2", convert_tasks.megatron_core_load, (str(s["llama"]["local"]), str(s["llama"]["hf"]), str(root / "llama_tp1" / "release"), _layout(tp=2, pp=2))),
        ("moe tp1", run_convert, (_job(s, "qwen3_moe", "hf-to-megatron", s["qwen3_moe"]["hf"], root / "moe_tp1", _layout()),)),
        ("moe load tp2xpp2xep2", convert_tasks.megatron_core_load, (str(s["qwen3_moe"]["local"]), str(s["qwen3_moe"]["hf"]), str(root / "moe_tp1" / "release"), ParallelLayout(tp=2, pp=2, ep=2, etp=1))),
        # 2. written by megatron-core (seeded weights), converted to HF by mapgen at another layout
        ("mcore llama write", convert_tasks.megatron_core_write, (str(s["llama"]["local"]), _layout(tp=2), str(root / "mcore_llama"), 11, None)),
        ("mcore llama to hf", run_convert, (_job(s, "llama", "megatron-to-hf", root / "mcore_llama", root / "mcore_llama_hf", _layout(pp=2)),)),
        ("mcore moe write", convert_tasks.megatron_core_write, (str(s["qwen3_moe"]["local"]), _layout(ep=2), str(root / "mcore_moe"), 12, 7)),
        ("mcore moe to hf", run_convert, (_job(s, "qwen3_moe", "megatron-to-hf", root / "mcore_moe", root / "mcore_moe_hf", _layout(tp=2)),)),
        # 3. HF -> Megatron -> HF, written at one layout, read at another
        ("llama back", run_convert, (_job(s, "llama", "megatron-to-hf", root / "llama_tp1", root / "llama_back", _layout(tp=2, pp=2)),)),
        ("moe te", run_convert, (_job(s, "qwen3_moe", "hf-to-megatron", s["qwen3_moe"]["hf"], root / "moe_te", _layout(ep=2), key_style="te"),)),
        ("moe te back", run_convert, (_job(s, "qwen3_moe", "megatron-to-hf", root / "moe_te", root / "moe_back", ParallelLayout(tp=2, pp=2, ep=2, etp=1), key_style="te"),)),
        ("deepseek te", run_convert, (_job(s, "deepseek", "hf-to-megatron", s["deepseek"]["hf"], root / "deepseek_te", _layout(tp=2), key_style="te", iteration=5),)),
        ("deepseek te back", run_convert, (_job(s, "deepseek", "megatron-to-hf", root / "deepseek_te", root / "deepseek_back", _layout(pp=2, ep=2), key_style="te"),)),
        ("deepseek local back", run_convert, (_job(s, "deepseek", "megatron-to-hf", root / "deepseek_te", root / "deepseek_back_local", _layout(ep=2)),)),
        ("moonlight te", run_convert, (_job(s, "moonlight", "hf-to-megatron", s["moonlight"]["hf"], root / "moonlight_te", _layout(tp=2), key_style="te"),)),
        ("moonlight te back", run_convert, (_job(s, "moonlight", "megatron-to-hf", root / "moonlight_te", root / "moonlight_back", _layout(pp=2, ep=2), key_style="te"),)),
        ("glm te", run_convert, (_job(s, "glm", "hf-to-megatron", s["glm"]["hf"], root / "glm_te", _layout(tp=2), key_style="te"),)),
        ("glm te back", run_convert, (_job(s, "glm", "megatron-to-hf", root / "glm_te", root / "glm_back", _layout(pp=2, ep=2), key_style="te"),)),
        ("qwen3_5 te", run_convert, (_job(s, "qwen3_5", "hf-to-megatron", s["qwen3_5"]["hf"], root / "qwen3_5_te", _layout(tp=2), key_style="te"),)),
        ("nemotron te", run_convert, (_job(s, "nemotron", "hf-to-megatron", s["nemotron"]["hf"], root / "nemotron_te", _layout(tp=2), key_style="te"),)),
        ("nemotron te back", run_convert, (_job(s, "nemotron", "megatron-to-hf", root / "nemotron_te", root / "nemotron_back", ParallelLayout(pp=2, ep=2, dp=2), key_style="te"),)),
        ("qwen3_5 te back", run_convert, (_job(s, "qwen3_5", "megatron-to-hf", root / "qwen3_5_te", root / "qwen3_5_back", _layout(), key_style="te"),)),
        # bfloat16 out of a float32 checkpoint, a padded vocabulary, --overwrite, vpp
        ("llama bf16 vocab", run_convert, (_job(s, "llama", "hf-to-megatron", s["llama"]["hf"], root / "existing", _layout(tp=2), dtype="bfloat16", make_vocab_size_divisible_by=128, overwrite=True),)),
        ("llama bf16 back", run_convert, (_job(s, "llama", "megatron-to-hf", root / "existing", root / "llama_bf16_back", _layout(pp=2, vpp=2)),)),
        # agreed errors inside the ranks, and a failed write
        ("another model", run_convert, (_job(s, "qwen3_moe", "megatron-to-hf", root / "mcore_llama", root / "never", _layout()),)),
        ("failed write", convert_tasks.failing_write, (_job(s, "llama", "hf-to-megatron", s["llama"]["hf"], root / "failed", _layout(tp=2)),)),
        ("one rank's save fails", convert_tasks.failing_on_one_rank, (_job(s, "llama", "hf-to-megatron", s["llama"]["hf"], root / "one_save", _layout(tp=2)), "save")),
        ("one rank's load fails", convert_tasks.failing_on_one_rank, (_job(s, "llama", "megatron-to-hf", root / "llama_tp1", root / "one_load", _layout(tp=2)), "load")),
    ]
    started = time.perf_counter()
    results = spawn([(task, args) for _, task, args in tasks], WORLD, timeout_s=1500)
    seconds = time.perf_counter() - started
    by_label = {label: [results[rank][i] for rank in range(WORLD)] for i, (label, _, _) in enumerate(tasks)}
    return {"root": root, "by_label": by_label, "seconds": seconds, "leftovers": sorted(p.name for p in root.iterdir())}


def _results(outcome: dict[str, Any], label: str) -> list[Any]:
    results: list[Any] = outcome["by_label"][label]
    for result in results:
        assert not isinstance(result, TaskFailed), result.traceback
    return results


def _converted(outcome: dict[str, Any], label: str) -> ConvertResult:
    results = _results(outcome, label)
    for result in results:
        assert result.error is None, result.error
    first: ConvertResult = results[0]
    return first


def test_megatron_core_loads_a_tp1_checkpoint_at_tp2_pp2_as_the_direct_import(outcome: dict[str, Any], standins: dict[str, dict[str, Path]]) -> None:
    for written, loaded, name in (("llama tp1", "llama load tp2xpp2", "llama"), ("moe tp1", "moe load tp2xpp2xep2", "qwen3_moe")):
        result = _converted(outcome, written)
        assert result.job.layout == _layout() and result.tensors > 0
        checks = _results(outcome, loaded)
        assert all(c["compared"] > 0 and c["differ"] == [] for c in checks), checks
        # every rank compared its own parameters: together, every parameter of the module
        module = testing.import_module_from_path(standins[name]["local"], f"convert_count_{name}")
        assert sum(c["compared"] for c in checks) >= len(module.PARAMS)


def test_megatron_layout_of_the_checkpoint(outcome: dict[str, Any], standins: dict[str, dict[str, Path]]) -> None:
    root = outcome["root"]
    folder = root / "llama_tp1"
    assert (folder / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "latest_checkpointed_iteration.txt", "mapgen.json", "release"]
    assert json.loads((folder / "config.json").read_text()) == json.loads((standins["llama"]["hf"] / "config.json").read_text())
    record = json.loads((folder / "mapgen.json").read_text())
    assert record["target"] == "llama_local" and record["dims"]["num_layers"] == 4 and record["checkpoint"] == "release"
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(folder / "release"))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0 and "args" not in common
    assert dist_checkpointing.load_content_metadata(preloaded_state_dict=common) == {
        "singleton_local_shards": False, "chained_optim_avoid_prefix": True,
    }
    deepseek = root / "deepseek_te"  # --iteration 5: iter_0000005/, the tracker says 5
    assert (deepseek / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert read_megatron_checkpoint(deepseek).folder.name == "iter_0000005"
    assert dist_checkpointing.load_common_state_dict(str(deepseek / "iter_0000005"))["iteration"] == 5


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_a_megatron_core_checkpoint_converts_to_hf_with_the_models_logits(outcome: dict[str, Any], name: str) -> None:
    import transformers

    label = "mcore llama" if name == "llama" else "mcore moe"
    logits = _results(outcome, f"{label} write")[0]
    result = _converted(outcome, f"{label} to hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(result.job.out, dtype=torch.float32).eval()
    expected = forward.hf_logits(model, convert_tasks.INPUT_IDS)
    assert logits.shape == expected.shape
    assert float((logits - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    ("name", "back"),
    [("llama", "llama back"), ("qwen3_moe", "moe te back"), ("deepseek", "deepseek te back"), ("deepseek", "deepseek local back"),
     ("moonlight", "moonlight te back"),
     ("glm", "glm te back")],
)
def test_hf_to_megatron_to_hf_is_bit_exact(outcome: dict[str, Any], standins: dict[str, dict[str, Path]], name: str, back: str) -> None:
    result = _converted(outcome, back)
    count, differ = _bit_exact(standins[name]["hf"], Path(result.job.out))
    assert count == result.tensors and differ == []
    written = json.loads((Path(result.job.source) / "mapgen.json").read_text())
    assert written["layout"] != str(result.job.layout)  # read back at another layout
    index = json.loads((Path(result.job.out) / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_hf_tensors(standins[name]["hf"]))


def test_bfloat16_and_a_padded_vocabulary(outcome: dict[str, Any], standins: dict[str, dict[str, Path]]) -> None:
    written = _converted(outcome, "llama bf16 vocab")
    assert written.vocab_rows == 256 and written.dtype == "bfloat16"  # 128 rows padded to 128 x TP2
    checkpoint = read_megatron_checkpoint(outcome["root"] / "existing")
    assert checkpoint.vocab_rows == 256 and checkpoint.dtype == torch.bfloat16
    assert not (outcome["root"] / "existing" / "old.txt").exists()  # --overwrite replaced the folder
    back = _converted(outcome, "llama bf16 back")  # read at PP2 x VPP2: the rows dropped again
    count, differ = _bit_exact(standins["llama"]["hf"], Path(back.job.out), torch.bfloat16)
    assert count == back.tensors and differ == []
    assert json.loads((Path(back.job.out) / "config.json").read_text())["dtype"] == "bfloat16"  # what it holds


def _tail(name: str) -> str:
    return re.sub(r"^decoder\.layers\.\d+\.", "", name)


@pytest.mark.parametrize(
    ("name", "label"), [("qwen3_moe", "moe te"), ("deepseek", "deepseek te"), ("moonlight", "moonlight te"), ("glm", "glm te")],
)
def test_te_checkpoint_names_are_the_te_modules_parameter_names(outcome: dict[str, Any], standins: dict[str, dict[str, Path]], name: str, label: str) -> None:
    """The te module's parameters (megatron-core's TE layer spec, per mapgen's compiler) are
    the checkpoint's tensors, experts aside (TEGroupedMLP keys them as SequentialMLP does)."""
    _converted(outcome, label)
    module = testing.import_module_from_path(standins[name]["te"], f"convert_te_{name}")
    checkpoint = read_megatron_checkpoint(outcome["root"] / label.replace(" ", "_"))
    keys = {k for k in checkpoint.model_tensors() if ".experts.experts." not in k}
    names = {p.megatron_name for p in module.PARAMS if p.expert is None}
    assert keys == names
    experts = {k for k in checkpoint.model_tensors() if ".experts.experts." in k}
    # per MoE layer, the decoder's and the MTP block's transformer layer's (DeepSeek-V3)
    moe_layers = {p.megatron_name.partition(".mlp.experts.")[0] for p in module.PARAMS if p.expert is not None}
    assert experts == {f"{layer}.mlp.experts.experts.linear_fc{j}.weight" for layer in moe_layers for j in (1, 2)}


def test_another_models_checkpoint_is_the_same_error_on_every_rank(outcome: dict[str, Any]) -> None:
    results = _results(outcome, "another model")
    errors = [r.error for r in results]
    assert errors[0] is not None and all(e == errors[0] for e in errors) and all(r.bad_input for r in results)
    assert "a checkpoint of another model?" in errors[0] and "Traceback" not in errors[0]
    assert not (outcome["root"] / "never").exists()


def test_a_failed_write_is_agreed_and_leaves_nothing(outcome: dict[str, Any]) -> None:
    results = _results(outcome, "failed write")
    errors = [r.error for r in results]
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert "No space left on device (simulated)" in errors[0] and "Traceback" not in errors[0]
    assert not any(name.startswith((".failed", "failed")) for name in outcome["leftovers"])


def test_nemotron_h_round_trips_bit_for_bit(outcome: dict[str, Any], standins: dict[str, dict[str, Path]]) -> None:
    """Nemotron 3 Nano's stand-in (Mamba, attention, MLP and expert layers) written at TP2 with
    TransformerEngine names and read back at PP2 x EP2: every tensor bit for bit."""
    _converted(outcome, "nemotron te")
    _converted(outcome, "nemotron te back")
    compared, differ = _bit_exact(standins["nemotron"]["hf"], outcome["root"] / "nemotron_back")
    assert compared > 0 and differ == [], differ


def test_a_published_qwen3_5_round_trip_keeps_its_names(outcome: dict[str, Any], standins: dict[str, dict[str, Path]]) -> None:
    """Qwen3.5's published layout (vision-language config, `model.language_model.*` and `mtp.*`
    names) through a Megatron checkpoint and back: the text model's tensors under their published
    names, bit for bit, and the config recorded; the vision tower is not the module's (left out)."""
    _converted(outcome, "qwen3_5 te")
    back = _converted(outcome, "qwen3_5 te back")
    assert back.job.layout == _layout()
    original, converted = _hf_tensors(standins["qwen3_5"]["hf"]), _hf_tensors(outcome["root"] / "qwen3_5_back")
    text = {n: t for n, t in original.items() if not n.startswith("model.visual.")}
    assert len(text) < len(original) and any(n.startswith("model.language_model.layers.") for n in text)
    assert sorted(converted) == sorted(text)
    assert [n for n in text if not same_bits(converted[n], text[n])] == []
    saved = json.loads((outcome["root"] / "qwen3_5_back" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3_5ForConditionalGeneration"] and "text_config" in saved


@pytest.mark.parametrize("label,step", [("one rank's save fails", "save"), ("one rank's load fails", "load")])
def test_a_failure_inside_megatron_core_on_one_rank_stops_every_rank(outcome: dict[str, Any], label: str, step: str) -> None:
    """megatron-core's save or load raising on rank 1 alone: every rank returns the same error,
    naming rank 1 and its failure (no rank waits in a later collective), and nothing is written."""
    results = _results(outcome, label)
    errors = [r.error for r in results]
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert "rank 1:" in errors[0] and f"simulated failure inside megatron-core's {step} on rank 1" in errors[0], errors[0]
    assert "Traceback" not in errors[0]
    assert not any(name.startswith(("one_", ".one_")) for name in outcome["leftovers"]), outcome["leftovers"]


def test_the_spawn_took_minutes_not_a_timeout(outcome: dict[str, Any]) -> None:
    assert outcome["seconds"] < 900
    assert not any(name.startswith(".") for name in outcome["leftovers"])  # no staging folder left


# --- bad input: refused by the CLI before any process starts ------------------------------


def _cli(args: list[str]) -> tuple[int, str]:
    from mapgen import cli
    from mapgen import convert as convert_module

    def no_spawn(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("mapgen convert started processes for a bad input")

    original = convert_module.spawn
    convert_module.spawn = no_spawn  # type: ignore[assignment]
    try:
        result = CliRunner().invoke(cli.main, ["convert", *args], catch_exceptions=False)
    finally:
        convert_module.spawn = original  # type: ignore[assignment]
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


@pytest.fixture(scope="module")
def written(outcome: dict[str, Any]) -> Path:
    return Path(outcome["root"]) / "llama_tp1"


def _copy(written: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(written, folder)
    return folder


def _no_tracker(folder: Path) -> None:
    (folder / "latest_checkpointed_iteration.txt").unlink()


def _bad_tracker(folder: Path) -> None:
    (folder / "latest_checkpointed_iteration.txt").write_text("latest\n")


def _tracker_names_missing(folder: Path) -> None:
    (folder / "latest_checkpointed_iteration.txt").write_text("100")


def _no_metadata(folder: Path) -> None:
    (folder / "release" / "metadata.json").unlink()


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


BAD_CHECKPOINTS = [
    ("no-tracker", _no_tracker, ("no latest_checkpointed_iteration.txt", "not a Megatron-LM checkpoint folder")),
    ("bad-tracker", _bad_tracker, ("holds 'latest', neither 'release' nor an iteration number",)),
    ("tracker-names-a-missing-folder", _tracker_names_missing, ("names iter_0000100", "is not a folder")),
    ("not-a-distributed-checkpoint", _no_metadata, ("not a megatron-core distributed checkpoint (metadata.json",)),
    ("no-config", _no_config, ("no config.json beside the checkpoint", "--hf-config")),
]


@pytest.mark.parametrize(("row", "spoil", "fragments"), BAD_CHECKPOINTS, ids=[r[0] for r in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_folder_is_refused_before_any_process_starts(
    standins: dict[str, dict[str, Path]], written: Path, tmp_path: Path, row: str, spoil: Any, fragments: tuple[str, ...]
) -> None:
    folder = _copy(written, tmp_path)
    spoil(folder)
    code, output = _cli(["megatron-to-hf", str(standins["llama"]["local"]), str(folder), str(tmp_path / "out")])
    assert code == 2, output
    for fragment in fragments:
        assert fragment in output, (fragment, output)
    assert "Traceback" not in output and not (tmp_path / "out").exists()


def test_a_missing_checkpoint_folder_is_refused(standins: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    code, output = _cli(["megatron-to-hf", str(standins["llama"]["local"]), str(tmp_path / "absent"), str(tmp_path / "out"),
                         "--hf-config", str(standins["llama"]["hf"] / "config.json")])
    assert code == 2 and "absent: no such folder" in output and "Traceback" not in output, output


def test_a_checkpoint_of_another_model_is_refused(standins: dict[str, dict[str, Path]], written: Path, tmp_path: Path) -> None:
    """The MoE module on the Llama checkpoint: its recorded dims, and the config beside it."""
    code, output = _cli(["megatron-to-hf", str(standins["qwen3_moe"]["local"]), str(written), str(tmp_path / "out"),
                         "--hf-config", str(standins["qwen3_moe"]["hf"] / "config.json")])
    assert code == 2, output
    assert "a checkpoint of another model: written for llama_local, whose dims differ from qwen3_moe_local's" in output
    assert "Traceback" not in output and not (tmp_path / "out").exists()
    code, output = _cli(["megatron-to-hf", str(standins["qwen3_moe"]["local"]), str(written), str(tmp_path / "out")])
    assert code == 2 and "does not describe the model" in output, output  # the Llama config.json beside it


LAYOUT_ROWS = [
    ("tp4-query-groups", "llama", ["--tp", "4"], "--tp 4 does not divide the 2 query groups (KV heads)"),
    ("pp3-layers", "llama", ["--pp", "3"], "--pp 3 does not divide the 4 layers"),
    ("ep3-experts", "qwen3_moe", ["--ep", "3"], "--ep 3 does not divide the 8 experts"),
    ("ep-dense", "llama", ["--ep", "2"], "--ep 2: llama_local has no experts to distribute"),
    # Qwen3.5-0.8B: tied embeddings and an MTP layer, which megatron-core cannot checkpoint at PP > 1
    ("tied-mtp-pp2", "qwen3_5", ["--pp", "2"], "megatron-core's GPTModel cannot checkpoint such a model at PP > 1"),
]


@pytest.mark.parametrize(("row", "name", "flags", "fragment"), LAYOUT_ROWS, ids=[r[0] for r in LAYOUT_ROWS])
def test_a_layout_that_cannot_hold_the_model_is_refused(
    standins: dict[str, dict[str, Path]], written: Path, tmp_path: Path, row: str, name: str, flags: list[str], fragment: str
) -> None:
    module, hf = str(standins[name]["local"]), str(standins[name]["hf"])
    for args in (["hf-to-megatron", module, hf, str(tmp_path / "a")], ["megatron-to-hf", module, str(written), str(tmp_path / "b")]):
        if name != "llama" and args[0] == "megatron-to-hf":
            continue  # the Llama checkpoint is not this model's
        code, output = _cli([*args, *flags])
        assert code == 2 and fragment in output and "Traceback" not in output, output


def test_an_existing_output_folder_is_refused_without_overwrite(standins: dict[str, dict[str, Path]], written: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    module, hf = str(standins["llama"]["local"]), str(standins["llama"]["hf"])
    for args in (["hf-to-megatron", module, hf, str(existing)], ["megatron-to-hf", module, str(written), str(existing)]):
        code, output = _cli(args)
        assert code == 2 and "existing already exists (--overwrite replaces it" in output, output
    (tmp_path / "a_file").write_text("")  # a missing parent is created; a file in the way is refused
    code, output = _cli(["hf-to-megatron", module, hf, str(tmp_path / "a_file" / "out")])
    assert code == 2 and f"{tmp_path / 'a_file'} is not a folder" in output, output


def test_an_hf_checkpoint_of_another_model_is_refused(standins: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    code, output = _cli(["hf-to-megatron", str(standins["qwen3_moe"]["local"]), str(standins["llama"]["hf"]), str(tmp_path / "out")])
    assert code == 2 and "does not describe the model" in output and "Traceback" not in output, output


def test_tensors_no_rank_reads_and_optimizer_state_are_told_apart(tmp_path: Path) -> None:
    """A checkpoint with a layer more than the model (per-layer keys, as megatron-core writes
    DeepSeek's): the extra layer's tensors are named; optimizer tensors of a training
    checkpoint are not the model's and are left alone."""
    from mapgen.megatron_checkpoint import MegatronCheckpoint
    from mapgen.sharded_state import unused_tensors

    f32 = torch.float32
    tensors = {
        "embedding.word_embeddings.weight": ((128, 64), f32),
        "decoder.layers.0.input_layernorm.weight": ((64,), f32),
        "decoder.layers.1.input_layernorm.weight": ((64,), f32),
        "optimizer.state.exp_avg.decoder.layers.0.input_layernorm.weight": ((64,), f32),
    }
    checkpoint = MegatronCheckpoint(tmp_path, tmp_path / "release", None, tensors, frozenset(), None, None)
    used = {"embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight"}
    assert unused_tensors(checkpoint, used) == ["decoder.layers.1.input_layernorm.weight"]
    assert checkpoint.vocab_rows == 128 and checkpoint.dtype == f32
