"""TP/PP/VPP/DP/EP/ETP conversion on CPU over gloo, in one spawn of 4 processes: tiny stand-ins
of every checked-in target, logits against transformers, export bit-exact, collective counts,
bad input on every rank, save and reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mapgen.verify import forward, testing
from mapgen.compiler.build import compile_target
from mapgen.compiler.targets import read_targets
from mapgen.common.errors import MapgenError
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.hybrid_model import hybrid_model_class
from mapgen.compiler.dsa_model import dsa_supported
from mapgen.runtime.vocab import padded_vocab_size
from mapgen.verify.jobs import run_job
from mapgen.verify.processes import spawn
from mapgen.verify.verdict import Job

import dist_tasks

WORLD = 4
LAYOUTS = [
    ParallelLayout(tp=2, dp=2),
    ParallelLayout(pp=2, dp=2),
    ParallelLayout(tp=2, pp=2),
    ParallelLayout(pp=2, dp=2, first_stage_layers=1),  # uneven: 1 + 3 layers
    ParallelLayout(pp=2, dp=2, last_stage_layers=1),  # uneven: 3 + 1 layers
    ParallelLayout(pp=2, vpp=2, dp=2),
]
# mixture-of-experts targets: expert parallelism (EP), expert-TP (ETP) apart from TP, with PP;
# the first four for every MoE family, all of them for DeepSeek-V3 (MLA, dense layer, shared experts)
EP_LAYOUTS = [
    ParallelLayout(ep=2, dp=4),
    ParallelLayout(tp=2, ep=2, dp=2),  # expert-TP = TP = 2
    ParallelLayout(tp=2, ep=2, etp=1, dp=2),  # experts whole, the rest TP-split
    ParallelLayout(pp=2, ep=2, dp=2),
    ParallelLayout(tp=2, pp=2, ep=2, etp=1),
    ParallelLayout(pp=2, vpp=2, ep=2, dp=2),
]
MOE_LAYOUTS = {"deepseek_v3": EP_LAYOUTS, "qwen3_235b_a22b": EP_LAYOUTS[:2]}  # 235B: Qwen3-30B's family
# experts with biases (gpt-oss): megatron-core builds them at expert-TP 1 only
MOE_LAYOUTS["gpt_oss_20b"] = [EP_LAYOUTS[0], EP_LAYOUTS[2], EP_LAYOUTS[3]]
# Kimi-K2: DeepSeek-V3's architecture (moonlight_16b_a3b, checked in, runs the first four)
MOE_LAYOUTS["kimi_k2"] = EP_LAYOUTS[:2]
# GLM-4.5: GLM-4.5-Air's family (glm4_5_air runs the first four), with per-head q/k norms
MOE_LAYOUTS["glm4_5"] = EP_LAYOUTS[:2]
# Qwen3.5's larger members: stand-ins of the smaller members' shapes, one layout each
MOE_LAYOUTS["qwen3_5_397b_a17b"] = EP_LAYOUTS[1:2]
DENSE_LAYOUTS = {"qwen3_5_27b": LAYOUTS[2:3]}
# DeepSeek-V3.2 (DSA indexers on DeepSeek-V3): TP 2, PP 2, EP 2, TP 2 x EP 2
MOE_LAYOUTS["deepseek_v3_2"] = [LAYOUTS[0], LAYOUTS[1], EP_LAYOUTS[0], EP_LAYOUTS[1]]
# Nemotron 3 Nano (model mamba: Mamba-2, attention, MLP and expert layers): TP 2, PP 2, EP 2, TP 2 x EP 2
MOE_LAYOUTS["nemotron_3_nano_30b_a3b"] = [LAYOUTS[0], LAYOUTS[1], EP_LAYOUTS[0], EP_LAYOUTS[1]]
# every checked-in GPTModel target (and Mamba-hybrid one), through a tiny stand-in of its own config (mapgen standin);
# a HybridModel target repeats a GPTModel target's spec and config (its HybridModel: HYBRID_CASES
# below, and Qwen3-Next's in tests/test_qwen3_next.py); LLaVAModel's, image and prompt, are
# tests/test_llava.py's
# (DeepSeek-V3.2's DSA layers where megatron-core builds them: 0.19+; tests/test_deepseek_v3_2.py)
TARGETS = {
    entry.name: entry for entry in read_targets(testing.ROOT)
    if entry.model in ("gpt", "mamba") and (dsa_supported() is None or entry.spec != "specs/deepseek_v3_2.yaml")
}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
MOE = {name for name, e in TARGETS.items() if any(k in json.loads((testing.ROOT / e.config).read_text()) for k in MOE_KEYS)}
CASES = [
    (name, layout)
    for name in TARGETS
    for layout in (MOE_LAYOUTS.get(name, EP_LAYOUTS[:4]) if name in MOE else DENSE_LAYOUTS.get(name, LAYOUTS))
]
# HybridModel modules of four stand-ins (attention and MLP as layers of their own); multi-latent
# attention needs megatron-core's HybridModel (0.17+): on older releases the build must refuse it
HAS_HYBRID_MODEL = hybrid_model_class()[0].__name__ == "HybridModel"
HYBRID_CASES = [
    ("llama3_1_8b", ParallelLayout(tp=2, dp=2)),
    ("llama3_1_8b", ParallelLayout(pp=2, dp=2)),
    ("llama3_1_8b", ParallelLayout(tp=2, pp=2)),
    ("qwen3_30b_a3b", ParallelLayout(ep=2, dp=4)),
    ("qwen3_30b_a3b", ParallelLayout(tp=2, ep=2, dp=2)),
    ("qwen3_30b_a3b", ParallelLayout(pp=2, ep=2, dp=2)),
    ("glm4_5", ParallelLayout(tp=2, ep=2, dp=2)),  # q/k norms, qkv biases, partial rope, shared experts
] + [
    ("deepseek_v3", layout)
    for layout in (ParallelLayout(ep=2, dp=4), ParallelLayout(tp=2, ep=2, dp=2), ParallelLayout(pp=2, ep=2, dp=2))
    if HAS_HYBRID_MODEL
]


def _module(folder: Path, spec: str, name: str, model: str = "gpt") -> Path:
    path = folder / f"{name}.py"
    source = compile_target(name, testing.ROOT / spec, folder / "config.json", "local", "test", model=model)
    path.write_text(source)
    return path


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything the tests below check, run in a single spawn."""
    root = tmp_path_factory.mktemp("distributed")
    tasks: list[tuple[Any, tuple[Any, ...]]] = []
    labels: list[str] = []
    cases: dict[str, tuple[Path, Path]] = {}
    for label, entry in TARGETS.items():
        folder = root / label
        testing.save_standin(json.loads((testing.ROOT / entry.config).read_text()), folder)
        module = _module(folder, entry.spec, label, model=entry.model)
        cases[label] = (folder, module)
    for label, layout in CASES:
        folder, module = cases[label]
        tasks.append((run_job, (Job(str(module), str(folder), layout),)))
        labels.append(f"verify {label} {layout}")

    hybrid_dirs: dict[str, Path] = {}
    for label, layout in HYBRID_CASES:
        folder = cases[label][0]
        if TARGETS[label].config and json.loads((testing.ROOT / TARGETS[label].config).read_text()).get("num_nextn_predict_layers"):
            # the decoder as a HybridModel, without the MTP layer (Qwen3-Next's HybridModel
            # target checks the HybridModel's MTP block, tests/test_qwen3_next.py)
            folder = root / f"{label}_no_mtp"
            if not folder.exists():
                fields = json.loads((testing.ROOT / TARGETS[label].config).read_text())
                testing.save_standin({**fields, "num_nextn_predict_layers": 0}, folder)
        hybrid_dirs[label] = folder
        module = folder / f"{label}_hybrid.py"
        if not module.exists():
            _module(folder, TARGETS[label].spec, f"{label}_hybrid", model="hybrid")
        tasks.append((run_job, (Job(str(module), str(folder), layout),)))
        labels.append(f"verify {label}_hybrid {layout}")

    llama_dir, llama_module = cases["llama3_1_8b"]
    for bucket_bytes in (1, 2**30):
        tasks.append((dist_tasks.count_collectives, (str(llama_module), str(llama_dir), ParallelLayout(tp=2, pp=2), bucket_bytes)))
        labels.append(f"count {bucket_bytes}")
    # a checkpoint that stacks each layer's experts, at TP2 x EP2 x PP2 with whole experts
    stacked_dir = root / "stacked"
    stacked_model = testing.save_standin(json.loads((testing.ROOT / TARGETS["qwen3_30b_a3b"].config).read_text()), root / "stacked_src")
    stacked_dir.mkdir()
    save_file({k: v.contiguous() for k, v in stacked_model.state_dict().items()}, str(stacked_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(root / "stacked_src" / "config.json", stacked_dir / "config.json")
    stacked_module = stacked_dir / "stacked.py"
    stacked_module.write_text(compile_target("stacked", testing.ROOT / TARGETS["qwen3_30b_a3b"].spec, stacked_dir / "config.json", "local", "test", hf_experts="stacked"))
    cases["stacked"] = (stacked_dir, stacked_module)
    tasks.append((run_job, (Job(str(stacked_module), str(stacked_dir), ParallelLayout(tp=2, pp=2, ep=2, etp=1)),)))
    labels.append("verify stacked")

    deepseek_dir, deepseek_module = cases["deepseek_v3"]
    tasks.append((dist_tasks.count_collectives, (str(deepseek_module), str(deepseek_dir), ParallelLayout(tp=2, ep=2, dp=2), 2**30)))
    labels.append("count moe")

    bad = _bad_inputs(root, llama_dir, llama_module)
    for name, (hf_dir, layout, model_module) in bad.items():
        tasks.append((dist_tasks.expect_error, (str(llama_module), str(hf_dir), layout, model_module)))
        labels.append(f"bad {name}")

    tied_dir, tied_module = cases["llama3_2_1b"]
    for name, fail_on in (("saved", None), ("interrupted", 2)):
        tasks.append((dist_tasks.save, (str(tied_module), str(tied_dir), ParallelLayout(tp=2, pp=2), str(root / name), fail_on)))
        labels.append(f"save {name}")

    _add_vocab_and_bf16_tasks(root, tasks, labels)
    for task, label, case in _config_field_tasks(root):  # the block at the end of this file
        tasks.append(task)
        labels.append(label)
        cases.update(case)

    # expert-parallel checks in processes of their own, after the dense ones
    moe_labels = MOE | {"stacked", "moe"} | CONFIG_MOE
    moe = [i for i, label in enumerate(labels) if label.split()[1].removesuffix("_hybrid") in moe_labels]
    by_label: dict[str, list[Any]] = {}
    for group in ([i for i in range(len(tasks)) if i not in moe], moe):
        results = spawn([tasks[i] for i in group], WORLD, timeout_s=1200)
        by_label.update({labels[i]: [results[r][k] for r in range(WORLD)] for k, i in enumerate(group)})
    return {"root": root, "cases": cases, "by_label": by_label, "hybrid_dirs": hybrid_dirs}


def _bad_inputs(root: Path, good: Path, module: Path) -> dict[str, tuple[Path, ParallelLayout, str | None]]:
    def copy(name: str) -> Path:
        target = root / f"bad_{name}"
        shutil.copytree(good, target)
        return target

    tensors = load_file(good / "model.safetensors")
    missing = copy("missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.mlp.up_proj.weight"}, missing / "model.safetensors")
    wrong = copy("shape")
    save_file({**tensors, "model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 32)}, wrong / "model.safetensors")
    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])

    other = root / "other_config"
    testing.save_tiny_model("llama", other, num_hidden_layers=2, intermediate_size=128)
    other_module = _module(other, "specs/llama.yaml", "other")
    tp2 = ParallelLayout(tp=2, pp=2)
    return {
        "missing-tensor": (missing, tp2, None),
        "wrong-shape": (wrong, tp2, None),
        "truncated-shard": (truncated, tp2, None),
        "module-for-another-config": (good, tp2, str(other_module)),
        "tp-does-not-divide-heads": (good, ParallelLayout(tp=4), None),
    }


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{n}-{layout}" for n, layout in CASES])
def test_logits_match_transformers_and_export_is_bit_exact(outcome: dict[str, Any], family: str, layout: ParallelLayout) -> None:
    _assert_verified(outcome["by_label"][f"verify {family} {layout}"], outcome["cases"][family][0])


def _assert_verified(results: list[Any], checkpoint_dir: Path) -> None:
    """Every rank ran the job; rank 0 exported every tensor of the checkpoint bit for bit and
    its logits match transformers' (fp32)."""
    for result in results:
        assert result.error is None, result.error
    rank0 = results[0]
    assert rank0.tensors == len(load_file(checkpoint_dir / "model.safetensors"))
    assert rank0.bit_exact == rank0.tensors, rank0.mismatched
    assert rank0.max_logit_diff <= 1e-5
    assert rank0.ok


@pytest.mark.parametrize(("family", "layout"), HYBRID_CASES, ids=[f"{n}-{layout}" for n, layout in HYBRID_CASES])
def test_hybrid_model_logits_match_transformers_and_export_is_bit_exact(
    outcome: dict[str, Any], family: str, layout: ParallelLayout
) -> None:
    _assert_verified(outcome["by_label"][f"verify {family}_hybrid {layout}"], outcome["hybrid_dirs"][family])


def test_hybrid_model_with_mla_needs_megatron_core_hybrid_model(outcome: dict[str, Any]) -> None:
    folder = outcome["cases"]["deepseek_v3"][0]
    if HAS_HYBRID_MODEL:  # built and verified above (from a stand-in without the MTP layer)
        assert (outcome["hybrid_dirs"]["deepseek_v3"] / "deepseek_v3_hybrid.py").exists()
        return
    with pytest.raises(MapgenError, match="multi-latent attention needs megatron-core 0.17 or later"):
        _module(folder, TARGETS["deepseek_v3"].spec, "deepseek_v3_hybrid", model="hybrid")


def test_stacked_experts_checkpoint_round_trips(outcome: dict[str, Any]) -> None:
    results = outcome["by_label"]["verify stacked"]
    assert all(r.error is None for r in results), results[0].error
    assert results[0].ok and results[0].tensors == len(load_file(outcome["cases"]["stacked"][0] / "model.safetensors"))


def test_no_object_collectives_and_bucketed_counts(outcome: dict[str, Any]) -> None:
    per_tensor = outcome["by_label"]["count 1"]
    bucketed = outcome["by_label"]["count 1073741824"]
    for result in per_tensor + bucketed:
        for phase in ("import", "export"):
            for name in dist_tasks.OBJECT_COLLECTIVES:
                assert result["counts"].get(phase, {}).get(name, 0) == 0, (phase, name)
        # import: only the one agreement all_gather before any weight is written
        assert result["counts"]["import"] == {"all_gather": 1, "all_gather_bytes": result["counts"]["import"]["all_gather_bytes"]}
        assert result["exported"] == result["tensors"]
    one_bucket = bucketed[0]["counts"]["export"]
    many = per_tensor[0]["counts"]["export"]
    # with one bucket per pipeline stage: 2 broadcasts (one per stage) and far fewer gathers
    assert one_bucket["broadcast"] == 2
    assert many["broadcast"] > one_bucket["broadcast"]
    assert many["all_gather"] > one_bucket["all_gather"]


def test_expert_parallel_export_is_three_gathers(outcome: dict[str, Any]) -> None:
    """TP2 x EP2, one bucket: a TP gather, an expert-TP gather and an EP gather, whatever the
    number of experts, after the agreement gather a fresh Converter makes; import makes only
    the agreement gather."""
    for result in outcome["by_label"]["count moe"]:
        assert result["exported"] == result["tensors"]
        # and the one status all_reduce per bucket that makes a failing export function stop every rank
        assert {k: v for k, v in result["counts"]["export"].items() if not k.endswith("_bytes")} == {
            "all_gather": 1 + 3, "all_reduce": 1
        }
        assert result["counts"]["import"]["all_gather"] == 1


BAD_EXPECTED = {
    "missing-tensor": "missing tensor 'model.layers.2.mlp.up_proj.weight'",
    "wrong-shape": "tensor 'model.layers.1.self_attn.o_proj.weight' has shape [64, 32], llama3_1_8b expects [64, 64]",
    "truncated-shard": "truncated:",
    "module-for-another-config": "the model has 2 decoder layers, llama3_1_8b has 4",
    "tp-does-not-divide-heads": "TP size 4 does not divide the 2 query groups (KV heads) of llama3_1_8b",
}


@pytest.mark.parametrize("case", list(BAD_EXPECTED))
def test_bad_input_is_the_same_clear_error_on_every_rank(outcome: dict[str, Any], case: str) -> None:
    results = outcome["by_label"][f"bad {case}"]
    messages = [message for message, _ in results]
    assert all(message is not None for message in messages), messages
    assert len(set(messages)) == 1, messages  # the same report on every rank
    assert BAD_EXPECTED[case] in messages[0]
    assert "ranks 0,1,2,3" in messages[0] or "rank 0" in messages[0]
    assert "Traceback" not in messages[0]


def test_saved_checkpoint_reloads_in_transformers_with_identical_logits(outcome: dict[str, Any]) -> None:
    import transformers

    assert outcome["by_label"]["save saved"] == [None] * WORLD
    saved = outcome["root"] / "saved"
    original_dir = outcome["cases"]["llama3_2_1b"][0]
    files = sorted(p.name for p in saved.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 1  # sharded
    original = transformers.AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(forward.hf_logits(original, ids), forward.hf_logits(reloaded, ids))


def test_interrupted_save_leaves_nothing_behind(outcome: dict[str, Any]) -> None:
    errors = outcome["by_label"]["save interrupted"]
    assert all(e is not None and "disk full (simulated)" in e for e in errors), errors
    root: Path = outcome["root"]
    assert not (root / "interrupted").exists()
    assert not list(root.glob(".interrupted.partial-*"))


# --- vocabulary padding and bfloat16 checkpoints ------------------------------------------------
# Run inside the two spawns above (labels: kind, target, ...; MoE targets go with the MoE group).
# Padded: a stand-in whose vocabulary (192) Megatron-LM pads to a multiple of 128 x TP (256 at
# TP2), tied (Llama-3.2-1B) and untied (Llama-3.1-8B), with and without PP; bf16: stand-ins saved
# in bfloat16, the model built in bfloat16, logits against transformers' own bfloat16 forward.

DIVISIBLE_BY = 128
PADDED_CASES = [
    (name, layout)
    for name in ("llama3_1_8b", "llama3_2_1b")
    for layout in (ParallelLayout(tp=2, dp=2), ParallelLayout(tp=2, pp=2))
]
BF16_CASES = [
    ("llama3_1_8b", ParallelLayout(tp=2, dp=2)),
    ("llama3_1_8b", ParallelLayout(tp=2, pp=2)),
    ("qwen3_30b_a3b", ParallelLayout(ep=2, dp=4)),
    ("qwen3_30b_a3b", ParallelLayout(tp=2, ep=2, dp=2)),
]
# a model built with this many vocabulary rows, loaded as padded by 128 x TP2: expected message
BAD_VOCAB = {
    "not-the-padded-size": (200, "the model has 200 vocabulary rows (100 per TP rank); expected 256"),
    "smaller-than-hf": (128, "the model has 128 vocabulary rows (64 per TP rank), fewer than the HF vocabulary of 192; expected 256"),
}


def _standin(root: Path, target: str, kind: str, **options: Any) -> tuple[Path, Path]:
    folder = root / f"{kind}_{target}"
    testing.save_standin(json.loads((testing.ROOT / TARGETS[target].config).read_text()), folder, **options)
    return folder, _module(folder, TARGETS[target].spec, f"{kind}_{target}")


def _add_vocab_and_bf16_tasks(root: Path, tasks: list[tuple[Any, tuple[Any, ...]]], labels: list[str]) -> None:
    padded = {t: _standin(root, t, "padded", vocab_size=testing.standin_vocab_size(DIVISIBLE_BY)) for t, _ in PADDED_CASES}
    for target, layout in PADDED_CASES:
        folder, module = padded[target]
        tasks.append((run_job, (Job(str(module), str(folder), layout, DIVISIBLE_BY),)))
        labels.append(f"padded {target} {layout}")
    bf16 = {t: _standin(root, t, "bf16", dtype=torch.bfloat16) for t, _ in BF16_CASES}
    for target, layout in BF16_CASES:
        folder, module = bf16[target]
        tasks.append((run_job, (Job(str(module), str(folder), layout),)))
        labels.append(f"bf16 {target} {layout}")
    folder, module = padded["llama3_1_8b"]
    for case, (rows, _) in BAD_VOCAB.items():
        tasks.append((dist_tasks.expect_vocab_error, (str(module), str(folder), ParallelLayout(tp=2, pp=2), rows, DIVISIBLE_BY)))
        labels.append(f"badvocab llama3_1_8b {case}")


@pytest.mark.parametrize(("target", "layout"), PADDED_CASES, ids=[f"{t}-{layout}" for t, layout in PADDED_CASES])
def test_padded_vocabulary_matches_transformers_and_exports_the_hf_rows(outcome: dict[str, Any], target: str, layout: ParallelLayout) -> None:
    results = outcome["by_label"][f"padded {target} {layout}"]
    assert all(r.error is None for r in results), results[0].error
    rank0 = results[0]
    original = load_file(outcome["root"] / f"padded_{target}" / "model.safetensors")
    embedding = original["model.embed_tokens.weight"]
    assert rank0.vocab == (embedding.shape[0], padded_vocab_size(embedding.shape[0], DIVISIBLE_BY, 2)) == (192, 256)
    assert rank0.tensors == len(original) and rank0.bit_exact == rank0.tensors, rank0.mismatched
    assert rank0.max_logit_diff <= 1e-5  # on the 192 real logits
    assert rank0.max_pad_logit == 0.0  # the pad rows are zeros, so their logits are exactly 0
    assert rank0.ok


@pytest.mark.parametrize(("target", "layout"), BF16_CASES, ids=[f"{t}-{layout}" for t, layout in BF16_CASES])
def test_bfloat16_checkpoint_matches_transformers_and_exports_bit_exact(outcome: dict[str, Any], target: str, layout: ParallelLayout) -> None:
    results = outcome["by_label"][f"bf16 {target} {layout}"]
    assert all(r.error is None for r in results), results[0].error
    rank0 = results[0]
    original = load_file(outcome["root"] / f"bf16_{target}" / "model.safetensors")
    assert {t.dtype for t in original.values()} == {torch.bfloat16}
    assert rank0.dtype == "bfloat16"
    assert rank0.tensors == len(original) and rank0.bit_exact == rank0.tensors, rank0.mismatched  # dtype too
    # 16 bfloat16 epsilons of the largest reference logit (see verify.logit_tolerance)
    assert rank0.max_logit_diff <= rank0.tolerance < 0.1
    assert rank0.ok


@pytest.mark.parametrize("case", list(BAD_VOCAB))
def test_wrong_padded_vocabulary_is_the_same_clear_error_on_every_rank(outcome: dict[str, Any], case: str) -> None:
    messages = [message for message, _ in outcome["by_label"][f"badvocab llama3_1_8b {case}"]]
    assert all(message is not None for message in messages), messages
    assert len(set(messages)) == 1, messages
    expected = BAD_VOCAB[case][1]
    tail = ": the HF vocabulary of 192 padded to a multiple of make_vocab_size_divisible_by 128 x TP 2"
    # PP2: the first stage holds the embedding, the last the output layer; each names its own
    assert f"ranks 0,1:\n  'embedding.word_embeddings.weight': {expected}{tail}" in messages[0]
    assert f"ranks 2,3:\n  'output_layer.weight': {expected}{tail}" in messages[0]
    assert "Traceback" not in messages[0]


# ---------------------------------------------------------------------------------------------
# Config fields that change the model's structure (issue 9, part 6): Qwen3-MoE's dense layers
# (mlp_only_layers, decoder_sparse_step) and sliding windows (Mixtral's sliding_window, Qwen2's
# use_sliding_window with max_window_layers), each a stand-in of a checked-in target's config
# with the field set, against transformers' logits and the checkpoint's bytes.
# name: (target whose config is the base, fields set on its stand-in config, the Megatron dims
# they must give, layouts)
CONFIG_FIELD_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], list[ParallelLayout]]] = {
    "qwen3_moe_mlp_only_layers": (
        "qwen3_30b_a3b", {"mlp_only_layers": [0]}, {"moe_dense_layers": (0,)}, [EP_LAYOUTS[0]],
    ),
    "qwen3_moe_decoder_sparse_step": (
        "qwen3_30b_a3b", {"decoder_sparse_step": 2}, {"moe_dense_layers": (0, 2)}, [EP_LAYOUTS[0], EP_LAYOUTS[3]],
    ),
    "mixtral_sliding_window": (
        "mixtral_8x7b", {"sliding_window": 3}, {"sliding_window": 3, "sliding_window_layers": (0, 1, 2, 3)}, [EP_LAYOUTS[0]],
    ),
    "qwen2_sliding_window": (
        "qwen2_5_7b",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2},
        {"sliding_window": 3, "sliding_window_layers": (2, 3)},
        [ParallelLayout(tp=2, pp=2)],
    ),
}
CONFIG_MOE = {name for name, (target, *_) in CONFIG_FIELD_CASES.items() if target in MOE}
CONFIG_FIELD_JOBS = [(name, layout) for name, (*_, layouts) in CONFIG_FIELD_CASES.items() for layout in layouts]


def _config_field_tasks(root: Path) -> list[tuple[tuple[Any, tuple[Any, ...]], str, dict[str, tuple[Path, Path]]]]:
    import transformers

    found = []
    for name, (target, fields, _, layouts) in CONFIG_FIELD_CASES.items():
        folder = root / name
        tiny = testing.standin_config(json.loads((testing.ROOT / TARGETS[target].config).read_text()))
        tiny.update(fields)
        testing.save_random_model(transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny), folder)
        module = _module(folder, TARGETS[target].spec, name)
        for layout in layouts:
            job = (run_job, (Job(str(module), str(folder), layout),))
            found.append((job, f"verify {name} {layout}", {name: (folder, module)}))
    return found


@pytest.mark.parametrize(("name", "layout"), CONFIG_FIELD_JOBS, ids=[f"{n}-{layout}" for n, layout in CONFIG_FIELD_JOBS])
def test_structural_config_fields_match_transformers(outcome: dict[str, Any], name: str, layout: ParallelLayout) -> None:
    folder, module_path = outcome["cases"][name]
    dims = testing.import_module_from_path(module_path).DIMS
    for field, value in CONFIG_FIELD_CASES[name][2].items():
        assert getattr(dims, field) == value, field
    _assert_verified(outcome["by_label"][f"verify {name} {layout}"], folder)
