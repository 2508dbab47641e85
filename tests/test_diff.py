"""`mapgen diff`: the semantic summary of two builds, on tiny modules built here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mapgen.compiler.build import compile_target
from mapgen.verify import testing
from mapgen.compiler.write import stale_diff
from mapgen.compiler.diff import abstract, diff_paths, diff_revision, report, shown, split_module, summarize

from spec_cases import BASE_CONFIG, BASE_SPEC

MAPGEN = [sys.executable, "-m", "mapgen.cli"]
FC2 = "  - megatron: decoder.layers.*.mlp.linear_fc2.weight\n    hf: model.layers.*.mlp.down_proj.weight\n    kind: auto\n"
NORM = (
    "  - megatron: decoder.layers.*.self_attention.linear_qkv.layer_norm_weight\n"
    "    hf: model.layers.*.input_layernorm.weight\n    kind: auto\n"
)
FC2_ROW = BASE_SPEC.replace(FC2, FC2.replace("kind: auto", "kind: row"))
NORM_ZERO = BASE_SPEC.replace(NORM, NORM.replace("kind: auto", "kind: zero_centered_rmsnorm"))
Build = Callable[..., str]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12] + "…"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The module `tiny` built from a spec text and BASE_CONFIG with overrides (cached); every
    build names its inputs spec.yaml and config.json, so only their hashes tell them apart."""
    cache: dict[tuple[str, str], str] = {}

    def build_(spec: str = BASE_SPEC, **overrides: object) -> str:
        config = json.dumps({**BASE_CONFIG, **overrides}, indent=2)
        if (spec, config) not in cache:
            folder = tmp_path_factory.mktemp("build")
            (folder / "spec.yaml").write_text(spec)
            (folder / "config.json").write_text(config)
            cache[(spec, config)] = compile_target(
                "tiny", folder / "spec.yaml", folder / "config.json", "te", "mapgen build",
                shown_paths=("spec.yaml", "config.json"),
            )
        return cache[(spec, config)]

    return build_


def test_one_rule_kind_change_is_one_group(build: Build) -> None:
    lines = summarize(build(), build(FC2_ROW), "tiny.py")
    assert lines == [
        "tiny.py: 2 parameters changed, 0 added, 0 removed (of 15)",
        f"  header Spec: spec.yaml sha256:{sha(BASE_SPEC)} -> spec.yaml sha256:{sha(FC2_ROW)}",
        "  RULES 'decoder.layers.*.mlp.linear_fc2.weight': kind 'auto' -> 'row'",
        "  rule decoder.layers.*.mlp.linear_fc2.weight: 2 parameters changed (layers 0-1)",
        "    kind: 'auto -> row' -> 'row'",
        "    e.g. decoder.layers.<L>.mlp.linear_fc2.weight",
        '      - """auto -> row: decoder.layers.*.mlp.linear_fc2.weight."""',
        '      + """row: decoder.layers.*.mlp.linear_fc2.weight."""',
    ]


def test_a_new_transform_names_the_calls_that_changed(build: Build) -> None:
    lines = summarize(build(), build(NORM_ZERO), "tiny.py")
    assert lines[2:] == [
        "  RULES 'decoder.layers.*.self_attention.linear_qkv.layer_norm_weight': kind 'auto' -> 'zero_centered_rmsnorm'",
        "  rule decoder.layers.*.self_attention.linear_qkv.layer_norm_weight: 2 parameters changed (layers 0-1)",
        "    kind: 'auto -> replicated' -> 'zero_centered_rmsnorm'",
        "    import transform: rt.whole_import -> rt.zero_centered_from_hf",
        "    export value 1: parts[0] -> rt.zero_centered_to_hf(parts[0])",
        "    e.g. decoder.layers.<L>.self_attention.linear_qkv.layer_norm_weight",
        '      - """auto -> replicated: decoder.layers.*.self_attention.linear_qkv.layer_norm_weight."""',
        '      + """zero_centered_rmsnorm: decoder.layers.*.self_attention.linear_qkv.layer_norm_weight."""',
        "      - import: rt.whole_import(load('model.layers.<L>.input_layernorm.weight'), out=out)",
        "      + import: rt.zero_centered_from_hf(load('model.layers.<L>.input_layernorm.weight'), out=out)",
        "      - export: {'model.layers.<L>.input_layernorm.weight': parts[0]}",
        "      + export: {'model.layers.<L>.input_layernorm.weight': rt.zero_centered_to_hf(parts[0])}",
    ]


def test_summary_does_not_grow_with_the_layers(build: Build) -> None:
    two = summarize(build(), build(NORM_ZERO), "tiny.py")
    sixteen = summarize(build(num_hidden_layers=16), build(NORM_ZERO, num_hidden_layers=16), "tiny.py")
    assert len(two) == len(sixteen) == 14
    assert sixteen[0] == "tiny.py: 16 parameters changed, 0 added, 0 removed (of 99)"
    assert sixteen[3].endswith(": 16 parameters changed (layers 0-15)")
    digits = re.compile(r"\d+")
    assert [digits.sub("N", line) for line in two] == [digits.sub("N", line) for line in sixteen]


def test_parameters_added_and_removed_are_counted_per_rule(build: Build) -> None:
    two, three = build(), build(num_hidden_layers=3)
    config2 = json.dumps(BASE_CONFIG, indent=2)
    config3 = json.dumps({**BASE_CONFIG, "num_hidden_layers": 3}, indent=2)
    per_rule = [
        "1 decoder.layers.<L>.self_attention.linear_qkv.layer_norm_weight (layer 2): auto -> replicated",
        "1 decoder.layers.<L>.self_attention.linear_proj.weight (layer 2): auto -> row",
        "1 decoder.layers.<L>.self_attention.linear_qkv.weight (layer 2): qkv",
        "1 decoder.layers.<L>.mlp.linear_fc1.layer_norm_weight (layer 2): auto -> replicated",
        "1 decoder.layers.<L>.mlp.linear_fc1.weight (layer 2): gated_mlp",
        "1 decoder.layers.<L>.mlp.linear_fc2.weight (layer 2): auto -> row",
    ]
    assert summarize(two, three, "tiny.py") == [
        "tiny.py: 0 parameters changed, 6 added, 0 removed (15 -> 21)",
        f"  header Config: config.json sha256:{sha(config2)} -> config.json sha256:{sha(config3)}",
        '  docstring: …layout) for tiny: 15 Megatron parameters, 21 HF tensors."""'
        ' -> …layout) for tiny: 21 Megatron parameters, 30 HF tensors."""',
        "  DIMS.num_layers: 2 -> 3",
        "  HF_TENSORS added: 9 model.layers.<L>.* (layer 2)",
        "  added: 6 parameters",
        *[f"    {line}" for line in per_rule],
    ]
    removed = summarize(three, two, "tiny.py")
    assert removed[0] == "tiny.py: 0 parameters changed, 0 added, 6 removed (21 -> 15)"
    assert "  HF_TENSORS removed: 9 model.layers.<L>.* (layer 2)" in removed
    assert removed[-7:] == ["  removed: 6 parameters", *[f"    {line}" for line in per_rule]]


def test_experts_are_one_group_per_rule(tmp_path: Path) -> None:
    """Qwen3-MoE, 3 layers of 4 experts: per-expert HF tensors against stacked ones."""
    config = json.loads((testing.ROOT / "specs/configs/qwen3_30b_a3b.json").read_text())
    config.update(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    per_expert, stacked = (
        compile_target(
            "moe", testing.ROOT / "specs/qwen3_moe.yaml", tmp_path / "config.json", "local", "mapgen build",
            shown_paths=("spec.yaml", "config.json"), hf_experts=experts,
        )
        for experts in ("per_expert", "stacked")
    )
    lines = summarize(per_expert, stacked, "moe.py")
    assert lines[0] == "moe.py: 24 parameters changed, 0 added, 0 removed (of 48)"
    assert "  HF_TENSORS removed: 36 model.layers.<L>.mlp.experts.<E>.* (layers 0-2, experts 0-3)" in lines
    start = lines.index(
        "  rule decoder.layers.*.mlp.experts.linear_fc2.weight*: 12 parameters changed (layers 0-2, experts 0-3)"
    )
    assert lines[start + 1 : start + 5] == [
        "    HF names: ('model.layers.<L>.mlp.experts.<E>.down_proj.weight',)"
        " -> ('model.layers.<L>.mlp.experts.down_proj[<E>]',)",
        "    import rt.row_import(argument 2): load('model.layers.<L>.mlp.experts.<E>.down_proj.weight')"
        " -> load('model.layers.<L>.mlp.experts.down_proj')[<E>]",
        "    export key 1: 'model.layers.<L>.mlp.experts.<E>.down_proj.weight'"
        " -> 'model.layers.<L>.mlp.experts.down_proj[<E>]'",
        "    e.g. decoder.layers.<L>.mlp.experts.local_experts.<E>.linear_fc2.weight",
    ]
    assert len([line for line in lines if line.startswith("  rule ")]) == 2  # fc1 and fc2, nothing else


def test_identical_builds_give_no_difference(build: Build, tmp_path: Path) -> None:
    assert summarize(build(), build(), "tiny.py") == []
    (tmp_path / "a.py").write_text(build())
    (tmp_path / "b.py").write_text(build())
    assert report(diff_paths(tmp_path / "a.py", tmp_path / "b.py")) == "no difference\n"
    result = subprocess.run([*MAPGEN, "diff", "a.py", "b.py"], cwd=tmp_path, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "no difference\n")


def test_a_change_of_layout_only_is_said_so(build: Build) -> None:
    old = build()
    wrapped = old.replace(
        '    return {"model.layers.1.mlp.down_proj.weight": rt.row_export(parts)}\n',
        '    return {\n        "model.layers.1.mlp.down_proj.weight": rt.row_export(\n            parts\n        )\n    }\n',
    )
    assert wrapped != old
    assert summarize(old, wrapped, "tiny.py") == [
        "tiny.py: 0 parameters changed, 0 added, 0 removed (of 15)",
        "  1 parameter differs only in layout (the same Python)",
    ]


def test_folders_pair_modules_by_name(build: Build, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "tiny.py").write_text(build())
    (new / "tiny.py").write_text(build(FC2_ROW))
    for folder in (old, new):
        (folder / "__init__.py").write_text("")
        (folder / "same.py").write_text(build(num_hidden_layers=3))
    (old / "gone.py").write_text(build())
    expected = (
        "gone.py: removed (15 parameters, 9 rules)\n"
        + "\n".join(summarize(build(), build(FC2_ROW), "tiny.py"))
        + "\n"
    )
    assert report(diff_paths(old, new)) == expected
    result = subprocess.run([*MAPGEN, "diff", str(old), str(new)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, expected)


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def test_working_tree_against_a_revision(build: Build, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "generated").mkdir(parents=True)
    (repo / "docs").mkdir()
    git(repo, "init", "-q")
    (repo / "generated" / "tiny.py").write_text(build())
    (repo / "generated" / "other.py").write_text(build(num_hidden_layers=3))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first build")
    (repo / "generated" / "tiny.py").write_text(build(FC2_ROW))
    (repo / "generated" / "new.py").write_text(build())
    expected = (
        "generated/new.py: added (15 parameters, 9 rules)\n"
        + "\n".join(summarize(build(), build(FC2_ROW), "generated/tiny.py"))
        + "\n"
    )
    assert report(diff_revision("HEAD", [], repo)) == expected  # default: generated/
    assert report(diff_revision("HEAD", [Path("../generated/other.py")], repo / "docs")) == "no difference\n"
    for cwd, args in ((repo, []), (repo / "docs", ["../generated"]), (repo, ["generated/tiny.py", "generated/new.py"])):
        result = subprocess.run([*MAPGEN, "diff", "--rev", "HEAD", *args], cwd=cwd, capture_output=True, text=True)
        assert (result.returncode, result.stdout) == (1, expected), args
    bad = subprocess.run([*MAPGEN, "diff", "--rev", "nosuchrev"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("nosuchrev: not a git revision of"), bad.stderr


def test_usage_needs_two_paths_or_a_revision(tmp_path: Path) -> None:
    result = subprocess.run([*MAPGEN, "diff", "a.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "give OLD and NEW" in result.stderr
    result = subprocess.run([*MAPGEN, "diff", "a.py", "b.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("a.py: no such file or folder")


@pytest.mark.parametrize(
    ("text", "expected", "layers", "experts"),
    [
        ("decoder.layers.3.mlp.experts.local_experts.15.linear_fc1.weight",
         "decoder.layers.<L>.mlp.experts.local_experts.<E>.linear_fc1.weight", (3,), (15,)),
        ("decoder.layers.12.mlp.experts.linear_fc2.weight255", "decoder.layers.<L>.mlp.experts.linear_fc2.weight<E>",
         (12,), (255,)),
        ("import_decoder_layers_12_mlp_experts_linear_fc2_weight255(",
         "import_decoder_layers_<L>_mlp_experts_linear_fc2_weight<E>(", (12,), (255,)),
        ("model.layers.7.block_sparse_moe.experts.3.w1.weight", "model.layers.<L>.block_sparse_moe.experts.<E>.w1.weight",
         (7,), (3,)),
        ('load("model.layers.4.mlp.experts.down_proj")[9]', 'load("model.layers.<L>.mlp.experts.down_proj")[<E>]',
         (4,), (9,)),
        ('("model.layers.4.mlp.experts.gate_up_proj[9]",)', '("model.layers.<L>.mlp.experts.gate_up_proj[<E>]",)',
         (4,), (9,)),
        ("rt.qkv_export(parts, heads=32, groups=8, head_dim=64) + parts[0]",
         "rt.qkv_export(parts, heads=32, groups=8, head_dim=64) + parts[0]", (), ()),
    ],
)
def test_layer_and_expert_numbers_are_abstracted(
    text: str, expected: str, layers: tuple[int, ...], experts: tuple[int, ...]
) -> None:
    abstracted, found_layers, found_experts = abstract(text)
    assert (shown(abstracted), found_layers, found_experts) == (expected, layers, experts)


def test_blocks_are_cut_without_parsing(build: Build) -> None:
    module = split_module(build())
    assert list(module.header) == ["line 1", "Target", "Spec", "Config", "Regenerate"]
    assert list(module.tables) == ["DIMS", "RULES", "PARAMS", "HF_TENSORS"]  # IGNORED_HF and TIED are empty: `{}`
    assert len(module.params) == 15 and len(module.functions) == 30 and len(module.rule_ids) == 9
    assert module.params["decoder.layers.1.mlp.linear_fc2.weight"].startswith(
        'ParamPlan(\n        "decoder.layers.1.mlp.linear_fc2.weight",'
    )


def test_check_cuts_a_long_raw_diff(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("".join(f"x{i} = {i}\n" for i in range(100)))
    new = "".join(f"x{i} = {i + 1}\n" for i in range(100))
    whole = stale_diff(tmp_path / "m.py", new, "m.py")
    assert len(whole.splitlines()) == 203  # 2 file lines, 1 hunk header, 200 lines
    cut = stale_diff(tmp_path / "m.py", new, "m.py", limit=10)
    assert cut.splitlines() == [
        *whole.splitlines()[:10],
        "... 193 more lines of this diff (`mapgen build`, then `git diff m.py`, shows them all)",
    ]


def test_diff_imports_neither_torch_nor_the_runtime() -> None:
    code = (
        "import sys, mapgen.compiler.diff\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers')"
        " or m.startswith('mapgen.runtime')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
