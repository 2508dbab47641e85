"""Qwen3-Next (issue 11 item 1): the gated delta net layouts against transformers' own code, and
the stand-in of the published config (with the published checkpoint's MTP layer) through
megatron-core at TP2 x PP2 and TP2 x EP2 (expert-TP 1) in one spawn, with two deliberately wrong
norm conventions that must fail; the HybridModel target ('G' layers and its MTP layer) on
megatron-core 0.19, through `mapgen verify` too, and skipped by `mapgen build`/`check` where
megatron-core cannot build it (0.16.1). The MTP layer's own checks (enorm/hnorm swapped, eh_proj
halves, norm conventions) are tests/test_mtp.py's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mapgen import runtime as rt
from mapgen.compiler.build import compile_target
from mapgen.compiler.targets import read_targets
from mapgen.common.errors import MapgenError
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.hybrid_model import hybrid_model_has_gdn
from mapgen.runtime.context import Group
from mapgen.verify import testing
from mapgen.verify.jobs import run_job
from mapgen.verify.processes import spawn
from mapgen.verify.verdict import Job

TARGET = {entry.name: entry for entry in read_targets(testing.ROOT)}["qwen3_next_80b_a3b"]
KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, HIDDEN = 4, 8, 6, 10, 12
R = VALUE_HEADS // KEY_HEADS
ARGS = dict(key_dim=KEY_DIM, value_dim=VALUE_DIM, v_per_k=R)


def _transformers_gated_delta_net() -> Any:
    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = transformers.Qwen3NextConfig(
        hidden_size=HIDDEN, linear_num_key_heads=KEY_HEADS, linear_num_value_heads=VALUE_HEADS,
        linear_key_head_dim=KEY_DIM, linear_value_head_dim=VALUE_DIM, num_hidden_layers=1,
        layer_types=["linear_attention"],
    )
    return Qwen3NextGatedDeltaNet(config, 0)


def _megatron_rank_rows(sections: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """megatron-core's GatedDeltaNet.in_proj (or conv1d) rows on TP rank `rank`: the rank's
    block of each section, one section after the other (its forward's torch.split sizes are
    each section's size // TP)."""
    return torch.cat([section.chunk(size, dim=0)[rank] for section in sections], dim=0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_in_proj_is_transformers_split_in_megatron_core_sections(tp: int) -> None:
    """transformers' own fix_query_key_value_ordering, applied to the weights (rows as features),
    gives q, k, v, z, b, a per head; megatron-core's rank t holds each one's t-th block."""
    module = _transformers_gated_delta_net()
    generator = torch.Generator().manual_seed(0)
    qkvz = torch.randn(module.in_proj_qkvz.weight.shape, generator=generator)
    ba = torch.randn(module.in_proj_ba.weight.shape, generator=generator)
    # as activations [batch 1, "sequence" HIDDEN, features]: each feature is one HF row
    q, k, v, z, b, a = module.fix_query_key_value_ordering(qkvz.T[None], ba.T[None])
    sections = [t[0].reshape(HIDDEN, -1).T for t in (q, k, v, z, b, a)]  # [rows, HIDDEN] each
    assert [s.shape[0] for s in sections] == [KEY_HEADS * KEY_DIM] * 2 + [VALUE_HEADS * VALUE_DIM] * 2 + [VALUE_HEADS] * 2
    parts = []
    for rank in range(tp):
        shard = rt.gdn_in_proj_import(Group(rank, tp), qkvz, ba, **ARGS)
        assert torch.equal(shard, _megatron_rank_rows(sections, rank, tp))
        parts.append(shard)
    back_qkvz, back_ba = rt.gdn_in_proj_export(parts, **ARGS)
    assert torch.equal(back_qkvz, qkvz) and torch.equal(back_ba, ba)
    # export_local's case: one rank's shard alone gives its key heads' rows of both tensors
    rows = qkvz.shape[0] // tp, ba.shape[0] // tp
    alone_qkvz, alone_ba = rt.gdn_in_proj_export(parts[-1:], **ARGS)
    assert torch.equal(alone_qkvz, qkvz[-rows[0]:]) and torch.equal(alone_ba, ba[-rows[1]:])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_conv1d_channels_are_transformers_qkv_in_megatron_core_sections(tp: int) -> None:
    module = _transformers_gated_delta_net()
    weight = torch.randn(module.conv1d.weight.shape, generator=torch.Generator().manual_seed(1))
    # transformers splits the convolved channels as [key_dim, key_dim, value_dim] (its forward)
    sections = list(torch.split(weight, [module.key_dim, module.key_dim, module.value_dim], dim=0))
    parts = []
    for rank in range(tp):
        shard = rt.gdn_conv_import(Group(rank, tp), weight, **ARGS)
        assert torch.equal(shard, _megatron_rank_rows(sections, rank, tp))
        parts.append(shard)
    assert torch.equal(rt.gdn_conv_export(parts, **ARGS), weight)


def test_heads_that_do_not_split_are_refused() -> None:
    module = _transformers_gated_delta_net()
    with pytest.raises(ValueError, match="4 gated delta net key heads do not split over 3 TP ranks"):
        rt.gdn_in_proj_import(Group(0, 3), module.in_proj_qkvz.weight, module.in_proj_ba.weight, **ARGS)
    with pytest.raises(ValueError, match="in_proj_ba .* does not fit 4 key heads"):
        rt.gdn_in_proj_import(Group(0, 1), module.in_proj_qkvz.weight, module.in_proj_ba.weight[:-2], **ARGS)


def test_published_config_dims() -> None:
    """What the spec reads from the published config.json: every fourth layer full attention
    (full_attention_interval, as transformers derives layer_types), the gated delta net sizes,
    the gated shared expert, the zero-centred norms and the partial rope."""
    from mapgen.compiler.config import translate
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.compiler.spec import parse_spec

    spec = parse_spec(TARGET.spec, (testing.ROOT / TARGET.spec).read_text())
    dims = translate(spec, read_hf_config("config.json", (testing.ROOT / TARGET.config).read_text()))
    import transformers

    published = json.loads((testing.ROOT / TARGET.config).read_text())
    layer_types = transformers.AutoConfig.for_model(**published).layer_types  # transformers' own derivation
    assert dims.linear_attention_layers == tuple(i for i, t in enumerate(layer_types) if t == "linear_attention")
    assert len(dims.linear_attention_layers) == 36 and 3 not in dims.linear_attention_layers
    assert (dims.linear_num_key_heads, dims.linear_num_value_heads, dims.linear_key_head_dim, dims.linear_value_head_dim) == (16, 32, 128, 128)
    assert (dims.num_moe_experts, dims.moe_router_topk, dims.moe_shared_expert_intermediate_size) == (512, 10, 512)
    assert dims.moe_shared_expert_gate and dims.attention_output_gate and dims.layernorm_zero_centered_gamma
    assert (dims.rotary_percent, dims.kv_channels, dims.num_query_groups) == (0.25, 256, 2)
    assert dims.moe_layers == tuple(range(48))


def _spec_with(folder: Path, old: str, new: str) -> Path:
    text = (testing.ROOT / TARGET.spec).read_text()
    assert text.count(old) == 1, old
    path = folder / "qwen3_next.yaml"
    path.write_text(text.replace(old, new))
    return path


def _module(folder: Path, name: str, spec: Path, model: str = "gpt") -> str:
    path = folder / f"{name}.py"
    path.write_text(compile_target(name, spec, folder / "config.json", "local", "test", model=model))
    return str(path)


# two conventions that must fail: the gated norm copied as is (megatron-core's out_norm is
# zero-centred), and the (1 + w) input norms converted as if megatron-core stored the plain scale
WRONG = {
    "out_norm_direct": (
        "out_norm.weight\n    hf: model.layers.*.linear_attn.norm.weight\n    kind: zero_centered_rmsnorm",
        "out_norm.weight\n    hf: model.layers.*.linear_attn.norm.weight\n    kind: auto",
    ),
    "input_norm_shifted": (
        "in_proj.layer_norm_weight\n    hf: model.layers.*.input_layernorm.weight\n    kind: auto",
        "in_proj.layer_norm_weight\n    hf: model.layers.*.input_layernorm.weight\n    kind: zero_centered_rmsnorm",
    ),
}
GOOD = [ParallelLayout(tp=2, pp=2), ParallelLayout(tp=2, ep=2, etp=1, dp=2)]
# megatron-core's HybridModel (0.19.2; not 0.16.1) builds the gated delta net layers as 'G' layers
HAS_GDN_HYBRID = hybrid_model_has_gdn()
HYBRID = [ParallelLayout(tp=2, pp=2), ParallelLayout(pp=2, ep=2, dp=2)] if HAS_GDN_HYBRID else []
HYBRID_TARGET = {entry.name: entry for entry in read_targets(testing.ROOT)}["qwen3_next_80b_a3b_hybrid"]
MAPGEN = [sys.executable, "-m", "mapgen.cli"]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("qwen3_next")
    testing.save_standin(json.loads((testing.ROOT / TARGET.config).read_text()), folder)
    good = _module(folder, "qwen3_next_local", testing.ROOT / TARGET.spec)
    tasks: list[tuple[Any, tuple[Any, ...]]] = [(run_job, (Job(good, str(folder), layout),)) for layout in GOOD]
    for name, (old, new) in WRONG.items():
        sub = folder / name
        sub.mkdir()
        spec = _spec_with(sub, old, new)
        (sub / "config.json").write_text((folder / "config.json").read_text())
        tasks.append((run_job, (Job(_module(sub, name, spec), str(folder), ParallelLayout(dp=4)),)))
    if HYBRID:
        hybrid = _module(folder, "qwen3_next_hybrid", testing.ROOT / TARGET.spec, model="hybrid")
        tasks += [(run_job, (Job(hybrid, str(folder), layout),)) for layout in HYBRID]
    results = spawn(tasks, 4, timeout_s=1500)
    return {"folder": folder, "results": [[results[r][i] for r in range(4)] for i in range(len(tasks))]}


@pytest.mark.parametrize("index", range(len(GOOD)), ids=[str(layout) for layout in GOOD])
def test_standin_logits_match_transformers_and_export_is_bit_exact(outcome: dict[str, Any], index: int) -> None:
    results = outcome["results"][index]
    for result in results:
        assert result.error is None, result.error
    rank0 = results[0]
    assert rank0.tensors == len(load_file(outcome["folder"] / "model.safetensors"))
    assert rank0.bit_exact == rank0.tensors, rank0.mismatched
    assert rank0.max_logit_diff <= 1e-5
    assert rank0.ok


@pytest.mark.parametrize("index", range(len(WRONG)), ids=list(WRONG))
def test_a_wrong_norm_convention_fails_the_forward_check(outcome: dict[str, Any], index: int) -> None:
    rank0 = outcome["results"][len(GOOD) + index][0]
    assert rank0.error is None, rank0.error
    # (the shifted input norms do not even round-trip: HF's weights near 0 lose bits in w - 1 + 1)
    assert rank0.max_logit_diff > 1e-3 and not rank0.ok


def test_hybrid_model_builds_gdn_layers_on_0_19_and_is_refused_before(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """megatron-core 0.19.2: the HybridModel module ('G' layers, and the MTP layer after '/') at
    TP2 x PP2 and PP2 x EP2 against transformers (main and MTP logits), export bit-exact; 0.16's
    MambaModel has no 'G' layer: the build says so."""
    if not HAS_GDN_HYBRID:
        (tmp_path / "config.json").write_text(testing.tiny_hf_config("qwen3_next").to_json_string())
        with pytest.raises(MapgenError, match=r"gated delta net layers \('G'\) needs a megatron-core HybridModel that builds them \(0.19.2 does\); this is megatron-core 0.16"):
            compile_target("h", testing.ROOT / TARGET.spec, tmp_path / "config.json", "local", "test", model="hybrid")
        return
    outcome: dict[str, Any] = request.getfixturevalue("outcome")
    assert 'HYBRID_LAYER_PATTERN: Final = "GE*EGE*E/*E"' in (outcome["folder"] / "qwen3_next_hybrid.py").read_text()
    for index in range(len(HYBRID)):
        results = outcome["results"][len(GOOD) + len(WRONG) + index]
        for result in results:
            assert result.error is None, result.error
        rank0 = results[0]
        assert rank0.bit_exact == rank0.tensors == len(load_file(outcome["folder"] / "model.safetensors"))
        assert rank0.max_logit_diff <= 1e-5 and rank0.ok


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAPGEN, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_build_and_check_skip_the_hybrid_target_where_megatron_core_cannot_build_it(tmp_path: Path) -> None:
    """The target list's `mapgen build` and `mapgen check` with the Qwen3-Next HybridModel target
    beside its GPTModel one (a stand-in's config): on megatron-core 0.16.1 both say, for that
    target, which megatron-core it needs and skip it, exit 0, and build or check the other; on
    0.19.2 both targets are built and checked as any other."""
    (tmp_path / "specs" / "configs").mkdir(parents=True)
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "__init__.py").write_text("")
    (tmp_path / "specs" / "qwen3_next.yaml").write_text((testing.ROOT / TARGET.spec).read_text())
    tiny = testing.standin_config(json.loads((testing.ROOT / TARGET.config).read_text()))
    (tmp_path / "specs" / "configs" / "tiny.json").write_text(json.dumps(tiny, indent=2))
    entry = "{spec: specs/qwen3_next.yaml, config: specs/configs/tiny.json, layout: te"
    (tmp_path / "specs" / "targets.yaml").write_text(
        f"targets:\n  tiny: {entry}}}\n  tiny_hybrid: {entry}, model: hybrid}}\n"
    )
    built = _run(["build"], tmp_path)
    assert built.returncode == 0, built.stderr
    assert "of generated/tiny/ (" in built.stderr
    checked = _run(["check"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    hybrid = tmp_path / "generated" / "tiny_hybrid" / "__init__.py"
    if HAS_GDN_HYBRID:
        assert "of generated/tiny_hybrid/ (" in built.stderr and "skipped" not in built.stderr
        assert 'HYBRID_LAYER_PATTERN: Final = "GE*EGE*E/*E"' in hybrid.read_text()
        assert "generated/ is up to date (2 targets)" in checked.stderr
        hybrid.write_text(hybrid.read_text().replace('"GE*EGE*E/*E"', '"*E*EGE*E/*E"', 1))
        assert _run(["check"], tmp_path).returncode == 1  # checked: a stale hybrid module fails
        return
    needs = (
        "a hybrid model with gated delta net layers ('G') needs a megatron-core HybridModel that builds "
        "them (0.19.2 does); this is megatron-core 0.16.1, which has none"
    )
    assert f"skipped generated/tiny_hybrid (target tiny_hybrid): {needs}" in " ".join(built.stderr.split())
    assert not hybrid.exists()
    assert f"skipped generated/tiny_hybrid (target tiny_hybrid), not checked: {needs}" in " ".join(checked.stderr.split())
    assert "up to date (1 targets; 1 skipped, which this megatron-core cannot build: generated/tiny_hybrid)" in " ".join(checked.stderr.split())
    hybrid.parent.mkdir()
    hybrid.write_text("# built by megatron-core 0.19\n")  # checked in from the other stack: left alone
    assert _run(["check"], tmp_path).returncode == 0 and _run(["build"], tmp_path).returncode == 0
    assert hybrid.read_text() == "# built by megatron-core 0.19\n"


def test_hybrid_standin_through_the_cli(tmp_path: Path) -> None:
    """`mapgen standin` of the published config (with its MTP layer), `mapgen build --model hybrid`
    of the stand-in's config, `mapgen verify --tp 2` of that module: on megatron-core 0.19.2 the
    HybridModel's logits (main and MTP) match transformers and the export is bit-exact; on
    0.16.1 the build refuses, saying what it needs."""
    standin = tmp_path / "standin"
    made = _run(["standin", str(testing.ROOT / TARGET.config), str(standin)], tmp_path)
    assert made.returncode == 0, made.stderr
    assert "mtp.fc.weight" in load_file(standin / "model.safetensors")
    module = tmp_path / "qwen3_next_hybrid.py"
    built = _run(
        ["build", str(testing.ROOT / TARGET.spec), str(standin / "config.json"), "-o", str(module), "--layout", "local",
         "--model", "hybrid"],
        tmp_path,
    )
    if not HAS_GDN_HYBRID:
        assert built.returncode == 2 and not module.exists()
        assert "gated delta net layers ('G') needs a megatron-core HybridModel that builds them" in built.stderr
        return
    assert built.returncode == 0, built.stderr
    verified = _run(["verify", str(module), str(standin), "--tp", "2"], tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    tensors = len(load_file(standin / "model.safetensors"))
    assert f"{tensors} tensors checked, {tensors} bit-exact" in verified.stdout and verified.stdout.rstrip().endswith("OK")
