"""`mapgen explain`: exact output for a small case, names it cannot find, HF names that feed
several parameters, tied copies, a spec it cannot find."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mapgen.cli import main
from mapgen.compiler.build import compile_target
from mapgen.verify import testing

ROOT = testing.ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny te-layout modules built from the repository's specs (named relative to it, as
    `mapgen build` run in the repository names them); cached per family."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(family: str, hf_experts: str = "per_expert", **overrides: Any) -> Path:
        key = (family, hf_experts, *sorted(overrides.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"explain_{family}")
            testing.tiny_hf_config(family, **overrides).to_json_file(folder / "config.json")
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(ROOT)
                source = compile_target(family, Path(f"specs/{family}.yaml"), folder / "config.json", "te", "test",
                                        hf_experts=hf_experts)
            (folder / f"{family}.py").write_text(source)
            cache[key] = folder / f"{family}.py"
        return cache[key]

    return make


def explain(*args: str) -> Any:
    return CliRunner().invoke(main, ["explain", *args])


def rule_line(spec: str, megatron: str) -> int:
    lines = (ROOT / "specs" / spec).read_text().splitlines()
    return 1 + lines.index(f"  - megatron: {megatron}")


def test_qkv_at_tp2(built: Any) -> None:
    module = built("llama", tie_word_embeddings=True)
    result = explain(str(module), "decoder.layers.0.self_attention.linear_qkv.weight", "--tp", "2")
    assert result.exit_code == 0, result.output
    line = rule_line("llama.yaml", "decoder.layers.*.self_attention.linear_qkv.weight")
    assert result.stdout.splitlines() == [
        "decoder.layers.0.self_attention.linear_qkv.weight: Megatron [128, 64] float32, layer 0",
        f"rule:   decoder.layers.*.self_attention.linear_qkv.weight (qkv), specs/llama.yaml:{line}",
        "kind:   qkv: per query group g, rows [q heads of g, k_g, v_g]; weights and 1-D biases alike; then",
        "        column-split.",
        "        4 heads, 2 query groups, head_dim 16",
        "HF:     model.layers.0.self_attn.q_proj.weight [64, 64] (q)",
        "        model.layers.0.self_attn.k_proj.weight [32, 64] (k)",
        "        model.layers.0.self_attn.v_proj.weight [32, 64] (v)",
        "layout: tp2xpp1 (dp 1, world size 2)",
        "stage:  pp rank 0",
        "split:  dim 0 over 2 TP ranks, [64, 64] each",
        "  tp rank 0 (global rank 0): Megatron rows 0:64",
        "    model.layers.0.self_attn.q_proj.weight rows 0:32",
        "    model.layers.0.self_attn.k_proj.weight rows 0:16",
        "    model.layers.0.self_attn.v_proj.weight rows 0:16",
        "  tp rank 1 (global rank 1): Megatron rows 64:128",
        "    model.layers.0.self_attn.q_proj.weight rows 32:64",
        "    model.layers.0.self_attn.k_proj.weight rows 16:32",
        "    model.layers.0.self_attn.v_proj.weight rows 16:32",
        "export: all-gather over TP (2 ranks), joined along Megatron dim 0",
        "        then split per query group back into q, k, v",
    ]


def test_expert_at_tp2_pp2_ep2(built: Any) -> None:
    module = built("qwen3_moe")
    result = explain(str(module), "decoder.layers.1.mlp.experts.linear_fc1.weight3", "--tp", "2", "--pp", "2", "--ep", "2")
    assert result.exit_code == 0, result.output
    line = rule_line("qwen3_moe.yaml", "decoder.layers.*.mlp.experts.linear_fc1.weight*")
    assert result.stdout.splitlines() == [
        "decoder.layers.1.mlp.experts.linear_fc1.weight3: Megatron [96, 64] float32, layer 1, expert 3",
        f"rule:   decoder.layers.*.mlp.experts.linear_fc1.weight* (gated_mlp), specs/qwen3_moe.yaml:{line}",
        "kind:   gated_mlp: rank r holds [gate_r; up_r], the r-th TP blocks of each.",
        "HF:     model.layers.1.mlp.experts.3.gate_proj.weight [48, 64] (gate)",
        "        model.layers.1.mlp.experts.3.up_proj.weight [48, 64] (up)",
        "layout: tp2xpp2xep2 (dp 2, expert-TP 2, world size 8)",
        "stage:  pp rank 1, as decoder.layers.0.mlp.experts.linear_fc1.weight1",
        "expert: EP rank 1, local expert 1 of 2",
        "split:  dim 0 over 2 expert-TP ranks, [48, 64] each",
        "  etp rank 0 (global rank 6): Megatron rows 0:48",
        "    model.layers.1.mlp.experts.3.gate_proj.weight rows 0:24",
        "    model.layers.1.mlp.experts.3.up_proj.weight rows 0:24",
        "  etp rank 1 (global rank 7): Megatron rows 48:96",
        "    model.layers.1.mlp.experts.3.gate_proj.weight rows 24:48",
        "    model.layers.1.mlp.experts.3.up_proj.weight rows 24:48",
        "export: all-gather over expert-TP (2 ranks), joined along Megatron dim 0",
        "        then each rank's [gate_r; up_r] halved, the gates joined into gate, the ups into up",
        "        all-gather over EP (2 ranks), from EP rank 1, which holds it",
        "        broadcast over PP from pp rank 1 to the other stage",
    ]


def test_replicated_parameter_by_its_hf_name(built: Any) -> None:
    result = explain(str(built("qwen3_moe")), "model.layers.0.self_attn.q_norm.weight", "--tp", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "HF model.layers.0.self_attn.q_norm.weight [32] feeds 1 Megatron parameter"
    assert "split:  none: every TP rank holds it whole (2 TP ranks)" in lines
    assert "  tp ranks 0-1 (global ranks 0, 1): each the whole parameter" in lines
    assert "export: no TP gather: every TP rank holds it whole and exports its own copy" in lines


def test_stacked_tensor_lists_every_expert(built: Any) -> None:
    module = built("qwen3_moe", "stacked")
    result = explain(str(module), "model.layers.0.mlp.experts.gate_up_proj", "--tp", "2", "--ep", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        "HF model.layers.0.mlp.experts.gate_up_proj [4, 96, 64] feeds 4 Megatron parameters",
        "  decoder.layers.0.mlp.experts.linear_fc1.weight0 (pp rank 0, EP rank 0 expert 0)",
        "  decoder.layers.0.mlp.experts.linear_fc1.weight1 (pp rank 0, EP rank 0 expert 1)",
        "  decoder.layers.0.mlp.experts.linear_fc1.weight2 (pp rank 0, EP rank 1 expert 0)",
        "  decoder.layers.0.mlp.experts.linear_fc1.weight3 (pp rank 0, EP rank 1 expert 1)",
    ]
    assert "    model.layers.0.mlp.experts.gate_up_proj[0] rows 24:48 + 72:96" in lines  # etp rank 1's
    assert lines[-1] == "(3 more: mapgen explain MODULE <Megatron name> for each)"
    one = explain(str(module), "model.layers.0.mlp.experts.gate_up_proj[2]", "--tp", "2", "--ep", "2")
    assert one.exit_code == 0 and "expert: EP rank 1, local expert 0 of 2" in one.stdout.splitlines()


def test_tied_copy(built: Any) -> None:
    module = built("llama", tie_word_embeddings=True)
    result = explain(str(module), "output_layer.weight", "--tp", "2", "--pp", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("output_layer.weight is a tied copy of embedding.word_embeddings.weight")
    assert "tied:   output_layer.weight on pp rank 1 is a copy, imported from the same HF tensor, not exported" in lines


def test_unknown_name_exits_2_with_close_matches(built: Any) -> None:
    result = explain(str(built("qwen3_moe")), "decoder.layers.0.mlp.expert.linear_fc1.weight3")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "decoder.layers.0.mlp.expert.linear_fc1.weight3: neither a Megatron parameter nor an HF tensor of "
        "qwen3_moe; did you mean decoder.layers.0.mlp.experts.linear_fc1.weight3"
    )
    assert "Traceback" not in result.output
    missing = explain(str(built("qwen3_moe", "stacked")), "model.layers.0.mlp.experts.gate_up_proj[7]")
    assert missing.exit_code == 2 and "has no slice [7] (4 experts)" in missing.stderr


def test_layout_that_does_not_fit_exits_2(built: Any) -> None:
    result = explain(str(built("qwen3_moe")), "embedding.word_embeddings.weight", "--tp", "4")
    assert result.exit_code == 2
    assert "TP 4 does not divide the 2 query groups" in result.stderr and "Traceback" not in result.output


def test_spec_with_another_hash_is_not_cited(built: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = built("llama", tie_word_embeddings=True).read_text()
    digest = text.split("sha256:", 1)[1][:64]
    changed = tmp_path / "changed.py"
    changed.write_text(text.replace(digest, "0" * 64, 1))
    monkeypatch.chdir(tmp_path)
    result = explain(str(changed), "decoder.final_layernorm.weight")
    assert result.exit_code == 0, result.output
    assert (
        "rule:   decoder.final_layernorm.weight (auto), spec specs/llama.yaml not found (none with the module's sha256)"
        in result.stdout.splitlines()
    )
