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

from mapgen.common.errors import MapgenError
from mapgen.compiler.build import compile_package, compile_target
from mapgen.verify import testing
from mapgen.compiler.write import stale_diff
from mapgen.compiler.diff import diff_paths, diff_revision, report, summarize, summarize_builds, summarize_modules
from mapgen.compiler.diffmatch import abstract, shown
from mapgen.compiler.diffread import read_package, split_module

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
Package = Callable[..., dict[str, str]]


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


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    """The target `tiny` as a package (file name -> text), built as `build` builds the module."""
    cache: dict[tuple[str, str], dict[str, str]] = {}

    def package_(spec: str = BASE_SPEC, **overrides: object) -> dict[str, str]:
        config = json.dumps({**BASE_CONFIG, **overrides}, indent=2)
        if (spec, config) not in cache:
            folder = tmp_path_factory.mktemp("package")
            (folder / "spec.yaml").write_text(spec)
            (folder / "config.json").write_text(config)
            cache[(spec, config)] = compile_package(
                "tiny", folder / "spec.yaml", folder / "config.json", "te", "mapgen build",
                shown_paths=("spec.yaml", "config.json"),
            )
        return cache[(spec, config)]

    return package_


def write_package(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_one_rule_kind_change_is_one_group(build: Build) -> None:
    lines = summarize(build(), build(FC2_ROW), "tiny.py")
    assert lines == [
        "tiny.py: 2 parameters changed, 0 added, 0 removed (of 15)",
        f"  header Spec: spec.yaml sha256:{sha(BASE_SPEC)} -> spec.yaml sha256:{sha(FC2_ROW)}",
        "  RULES 'decoder.layers.*.mlp.linear_fc2.weight': kind 'auto' -> 'row'",
        "  rule decoder.layers.*.mlp.linear_fc2.weight: 2 parameters changed (layers 0-1)",
        "    kind: 'auto -> row' -> 'row'",
        "    e.g. decoder.layers.<L>.mlp.linear_fc2.weight",
        '      - """auto -> row: rule 6."""',
        '      + """row: rule 6."""',
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
        '      - """auto -> replicated: rule 1."""',
        '      + """zero_centered_rmsnorm: rule 1."""',
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


def test_a_revision_s_module_against_the_working_tree_s_package(build: Build, package: Package, tmp_path: Path) -> None:
    """generated/tiny.py at REV and the package generated/tiny/ now are one target."""
    repo = tmp_path / "repo"
    (repo / "generated").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "generated" / "__init__.py").write_text("")
    (repo / "generated" / "tiny.py").write_text(build())
    (repo / "generated" / "cut.py").write_text(build()[:5000])
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one-file modules")
    (repo / "generated" / "tiny.py").unlink()
    (repo / "generated" / "cut.py").unlink()
    write_package(repo / "generated" / "tiny", package(NORM_ZERO))
    write_package(repo / "generated" / "cut", package())
    lines = report(diff_revision("HEAD", [], repo)).splitlines()
    assert lines[:2] == [
        "generated/cut: changed form (one-file module -> package); HEAD:generated/cut.py: not a generated module"
        " (it is cut short: its last line has no newline)",
        "generated/tiny: 2 parameters changed, 0 added, 0 removed (of 15)",
    ]
    assert lines[2] == "  form: one-file module (format 2) -> package of 4 parts (format 2)"
    assert rule_lines(lines) == rule_lines(summarize_builds(package(), package(NORM_ZERO), "generated/tiny"))
    for args in (["generated/tiny"], ["generated/tiny.py"], ["generated"]):
        only = report(diff_revision("HEAD", [Path(a) for a in args], repo)).splitlines()
        assert only == (lines if args == ["generated"] else lines[1:]), args
    result = subprocess.run(
        [*MAPGEN, "diff", "--rev", "HEAD", "generated/tiny"], cwd=repo, capture_output=True, text=True
    )
    assert (result.returncode, result.stdout.splitlines()) == (1, lines[1:])


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
    assert (module.form, module.format) == ("module", 2)
    assert module.params["decoder.layers.1.mlp.linear_fc2.weight"] == (
        'ParamPlan("decoder.layers.1.mlp.linear_fc2.weight", (64, 96), "float32", 1, False, 1, None, 6,'
        ' ("model.layers.1.mlp.down_proj.weight",), import_decoder_layers_1_mlp_linear_fc2_weight,'
        " export_decoder_layers_1_mlp_linear_fc2_weight)"
    )


def test_a_package_reads_as_the_module_of_the_same_build(build: Build, package: Package, tmp_path: Path) -> None:
    """Each part's rows become the one-file module's rows (HF indices resolved to names, the
    functions named `part.function`), its H rows the module's HF_TENSORS, in HF order."""
    module = split_module(build(num_hidden_layers=3))
    files = package(num_hidden_layers=3)
    joined = read_package(write_package(tmp_path / "tiny", files))
    assert (joined.form, joined.parts, joined.format) == ("package", 5, 2)
    assert list(joined.params) == list(module.params)  # parts in PARTS order: the module's order here
    assert list(joined.tables["HF_TENSORS"].rows.values()) == list(module.tables["HF_TENSORS"].rows.values())
    plan = joined.params["decoder.layers.2.mlp.linear_fc1.weight"]
    assert plan == (
        'ParamPlan("decoder.layers.2.mlp.linear_fc1.weight", (192, 64), "float32", 0, False, 2, None, 5,'
        ' ("model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"),'
        " layer_002.import_mlp_linear_fc1_weight, layer_002.export_mlp_linear_fc1_weight)"
    )
    assert joined.functions["layer_002.export_mlp_linear_fc1_weight"].startswith(
        "def export_mlp_linear_fc1_weight(parts: Parts) -> HFOut:\n    return rt.named("
    )
    assert (joined.tables["RULES"].rows, joined.tables["DIMS"].rows) == (
        module.tables["RULES"].rows, module.tables["DIMS"].rows,
    )


def rule_lines(lines: list[str]) -> list[str]:
    """A summary's groups of changed parameters: each rule's line and its changes, without the
    example (whose rows name the functions, which a package names within their part)."""
    out, keep = [], False
    for line in lines:
        if line.startswith("  rule "):
            keep = True
        elif not line.startswith("    ") or line.startswith("    e.g. "):
            keep = False
        if keep:
            out.append(line)
    return out


def with_whole_names(files: dict[str, str]) -> dict[str, str]:
    """A package as the first packages wrote their parts: whole names, every field of a row
    (`P(name, shape, dtype, split, expert-parallel, layer, expert, rule, hf, import, export)`),
    `H(name, shape, at=N)`, no PREFIX or HF_PREFIX."""
    layers = dict(re.findall(r'PartPlan\("(\w+)", (\w+),', files["__init__.py"]))
    out = {"__init__.py": files["__init__.py"]}
    for name, text in files.items():
        if name == "__init__.py":
            continue
        prefix = re.search(r'^PREFIX: Final = "(.*)"$', text, re.MULTILINE).group(1)  # type: ignore[union-attr]
        hf_prefix = re.search(r'^HF_PREFIX: Final = "(.*)"$', text, re.MULTILINE).group(1)  # type: ignore[union-attr]
        text = re.sub(r"^(HF_)?PREFIX: .*\n", "", text, flags=re.MULTILINE)
        text = re.sub(
            r'^    P\("(.*?)", (\(.*?\)), (\w+), (\w+), (\d+), (\(.*?\)), (\w+), (\w+)\),$',
            lambda m: f'    P("{prefix}{m[1]}", {m[2]}, "float32", {m[3]}, {m[4] != "None"}, {layers[name[:-3]]},'
            f" {m[4]}, {m[5]}, {m[6]}, {m[7]}, {m[8]}),",
            text, flags=re.MULTILINE,
        )
        out[name] = re.sub(
            r'^    H\("(.*?)", (\(.*?\)), (\d+)\),$', lambda m: f'    H("{hf_prefix}{m[1]}", {m[2]}, at={m[3]}),',
            text, flags=re.MULTILINE,
        )
    return out


def test_parts_with_whole_names_read_the_same(package: Package, tmp_path: Path) -> None:
    files = package()
    old = with_whole_names(files)
    assert "\nPREFIX" not in old["layer_001.py"] and "\nHF_PREFIX" not in old["layer_001.py"]
    assert '    H("model.layers.1.self_attn.q_proj.weight", (64, 64), at=10),' in old["layer_001.py"]
    assert summarize_builds(old, files, "tiny") == [
        "tiny: 0 parameters changed, 0 added, 0 removed (of 15)",
        "  the texts differ only in layout (the same Python)",
    ]
    new = read_package(write_package(tmp_path / "tiny", files))
    assert read_package(write_package(tmp_path / "old", old)).tables == new.tables


def test_packages_differing_by_config_are_summarized_by_rule(build: Build, package: Package, tmp_path: Path) -> None:
    old = write_package(tmp_path / "old" / "tiny", package())
    new = write_package(tmp_path / "new" / "tiny", package(intermediate_size=128))
    lines = report(diff_paths(old, new)).splitlines()
    assert lines[:3] == [
        f"{new.as_posix()}: 4 parameters changed, 0 added, 0 removed (of 15)",
        f"  header Config: config.json sha256:{sha(json.dumps(BASE_CONFIG, indent=2))}"
        f" -> config.json sha256:{sha(json.dumps({**BASE_CONFIG, 'intermediate_size': 128}, indent=2))}",
        "  DIMS.ffn_hidden_size: 96 -> 128",
    ]
    assert "  HF_TENSORS reshaped: 2 model.layers.<L>.mlp.down_proj.weight (layers 0-1): (64, 96) -> (64, 128)" in lines
    assert rule_lines(lines) == [
        "  rule decoder.layers.*.mlp.linear_fc1.weight: 2 parameters changed (layers 0-1)",
        "    shape: (192, 64) -> (256, 64)",
        "  rule decoder.layers.*.mlp.linear_fc2.weight: 2 parameters changed (layers 0-1)",
        "    shape: (64, 96) -> (64, 128)",
    ]
    # the one-file modules of the same builds say the same, rule by rule
    assert rule_lines(summarize(build(), build(intermediate_size=128), "tiny.py")) == rule_lines(lines)


def test_packages_with_a_layer_more_count_its_parameters_per_rule(package: Package, tmp_path: Path) -> None:
    old = write_package(tmp_path / "old" / "tiny", package())
    new = write_package(tmp_path / "new" / "tiny", package(num_hidden_layers=3))
    lines = report(diff_paths(tmp_path / "old", tmp_path / "new")).splitlines()  # two folders of targets
    assert lines[0] == "tiny: 0 parameters changed, 6 added, 0 removed (15 -> 21)"
    assert "  DIMS.num_layers: 2 -> 3" in lines
    assert "  PARTS added: 1 part: layer_002" in lines
    assert "  HF_TENSORS added: 9 model.layers.<L>.* (layer 2)" in lines
    added = lines.index("  added: 6 parameters")
    assert lines[added + 1 :] == [  # a package's functions have no docstring: the kinds are RULES'
        "    1 decoder.layers.<L>.self_attention.linear_qkv.layer_norm_weight (layer 2): auto",
        "    1 decoder.layers.<L>.self_attention.linear_proj.weight (layer 2): auto",
        "    1 decoder.layers.<L>.self_attention.linear_qkv.weight (layer 2): qkv",
        "    1 decoder.layers.<L>.mlp.linear_fc1.layer_norm_weight (layer 2): auto",
        "    1 decoder.layers.<L>.mlp.linear_fc1.weight (layer 2): gated_mlp",
        "    1 decoder.layers.<L>.mlp.linear_fc2.weight (layer 2): auto",
    ]
    removed = summarize_modules(read_package(new), read_package(old), "tiny")
    assert removed[0] == "tiny: 0 parameters changed, 0 added, 6 removed (21 -> 15)"
    assert "  PARTS removed: 1 part: layer_002" in removed


def test_a_new_transform_in_a_package_is_grouped_as_in_a_module(build: Build, package: Package, tmp_path: Path) -> None:
    old = write_package(tmp_path / "a" / "tiny", package())
    new = write_package(tmp_path / "b" / "tiny", package(NORM_ZERO))
    lines = report(diff_paths(old, new)).splitlines()
    assert lines[0] == f"{new.as_posix()}: 2 parameters changed, 0 added, 0 removed (of 15)"
    assert rule_lines(lines) == [
        "  rule decoder.layers.*.self_attention.linear_qkv.layer_norm_weight: 2 parameters changed (layers 0-1)",
        "    import transform: rt.whole_import -> rt.zero_centered_from_hf",
        "    export value 1: parts[0] -> rt.zero_centered_to_hf(parts[0])",
    ]
    module_lines = rule_lines(summarize(build(), build(NORM_ZERO), "tiny.py"))
    kind = "    kind: 'auto -> replicated' -> 'zero_centered_rmsnorm'"  # a module's docstrings say it
    assert module_lines == [*rule_lines(lines)[:1], kind, *rule_lines(lines)[1:]]


def test_identical_packages_give_no_difference(package: Package, tmp_path: Path) -> None:
    old = write_package(tmp_path / "a" / "tiny", package())
    new = write_package(tmp_path / "b" / "tiny", package())
    assert report(diff_paths(old, new)) == "no difference\n"
    assert report(diff_paths(tmp_path / "a", tmp_path / "b")) == "no difference\n"
    result = subprocess.run([*MAPGEN, "diff", "a/tiny", "b/tiny"], cwd=tmp_path, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "no difference\n")


def test_a_module_and_a_package_of_one_build_differ_only_in_form(
    build: Build, package: Package, tmp_path: Path
) -> None:
    (tmp_path / "tiny.py").write_text(build())
    folder = write_package(tmp_path / "pkg" / "tiny", package())
    assert report(diff_paths(tmp_path / "tiny.py", folder)).splitlines() == [
        f"{folder.as_posix()}: 0 parameters changed, 0 added, 0 removed (of 15)",
        "  form: one-file module (format 2) -> package of 4 parts (format 2)",
        "  15 parameters differ only in form (the same fields, rules and expressions)",
    ]
    changed = summarize_builds(build(), package(FC2_ROW), "tiny")
    assert changed[:3] == [
        "tiny: 0 parameters changed, 0 added, 0 removed (of 15)",
        "  form: one-file module (format 2) -> package of 4 parts (format 2)",
        f"  header Spec: spec.yaml sha256:{sha(BASE_SPEC)} -> spec.yaml sha256:{sha(FC2_ROW)}",
    ]
    # `auto` decided as `row` writes the same code: only the rule says so
    assert "  RULES 'decoder.layers.*.mlp.linear_fc2.weight': kind 'auto' -> 'row'" in changed


def as_format_1(text: str) -> str:
    """A format-2 module as format 1 wrote it: no FORMAT line, the rule's id in the docstrings,
    `dict(zip(names, values))` for an export of several HF tensors, one field a line in PARAMS."""
    rule_ids = split_module(text).rule_ids
    text = text.replace("FORMAT: Final = 2\n", "").replace("# fmt: off\n", "").replace("# fmt: on\n", "")
    text = re.sub(r'(""".*?): rule (\d+)\."""', lambda m: f'{m.group(1)}: {rule_ids[int(m.group(2))]}."""', text)
    text = re.sub(
        r"rt\.named\(\n        (.*),\n((?:        \".*\",\n)+)    \)",
        lambda m: f"dict(zip(({', '.join(n.strip().rstrip(',') for n in m.group(2).splitlines())}), {m.group(1)}))",
        text,
    )
    return re.sub(
        r"^    ParamPlan\((.*)\),$",
        lambda m: "    ParamPlan(\n" + "".join(f"        {f},\n" for f in re.split(r", (?![^()]*\))", m.group(1)))
        + "    ),",
        text,
        flags=re.MULTILINE,
    )


def test_a_format_1_module_against_a_package(build: Build, package: Package, tmp_path: Path) -> None:
    """The module generated/ held before packages, against the package of the same build."""
    old = as_format_1(build())
    assert "dict(zip((" in old and '"""qkv: decoder.layers.*.self_attention.linear_qkv.weight."""' in old
    assert split_module(old).format == 1 and len(split_module(old).params) == 15
    assert summarize_builds(old, package(), "tiny") == [
        "tiny: 0 parameters changed, 0 added, 0 removed (of 15)",
        "  form: one-file module (format 1) -> package of 4 parts (format 2)",
        "  15 parameters differ only in form (the same fields, rules and expressions)",
    ]
    lines = summarize_builds(old, package(NORM_ZERO), "tiny")
    assert rule_lines(lines) == [
        "  rule decoder.layers.*.self_attention.linear_qkv.layer_norm_weight: 2 parameters changed (layers 0-1)",
        "    import transform: rt.whole_import -> rt.zero_centered_from_hf",
        "    export value 1: parts[0] -> rt.zero_centered_to_hf(parts[0])",
    ]


def test_files_that_are_not_modules_are_refused(build: Build, package: Package, tmp_path: Path) -> None:
    module = build()
    (tmp_path / "tiny.py").write_text(module)
    (tmp_path / "notes.py").write_text("x = 1\n")
    (tmp_path / "half.py").write_text(module[: len(module) // 2])
    (tmp_path / "rows.py").write_text(module[: module.index("ParamPlan(", module.index("PARAMS")) + 40] + "\n")
    expected = {
        "notes.py": "notes.py: not a generated module (no mapgen header and no PARAMS table)",
        "half.py": "half.py: not a generated module (it is cut short: its last line has no newline)",
        "rows.py": "rows.py: not a generated module (it is cut short: PARAMS is not closed)",
    }
    for name, message in expected.items():
        for pair in ((name, "tiny.py"), ("tiny.py", name)):
            with pytest.raises(MapgenError) as caught:
                list(diff_paths(*(tmp_path / p for p in pair)))
            assert str(caught.value) == f"{tmp_path / name}: {message.split(': ', 1)[1]}"
        result = subprocess.run([*MAPGEN, "diff", name, "tiny.py"], cwd=tmp_path, capture_output=True, text=True)
        assert (result.returncode, result.stdout, result.stderr.strip()) == (2, "", message)
    # in folders of targets: said, naming the file, and the other targets summarised
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "tiny.py").write_text(module[: len(module) // 3].rsplit("\n", 1)[0] + "\n")
    (new / "tiny.py").write_text(module)
    lines = report(diff_paths(old, new)).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"tiny.py: {old / 'tiny.py'}: not a generated module (it is cut short")
    # a package with a part cut short, or missing
    files = package()
    write_package(old / "pk", files)
    write_package(new / "pk", {**files, "layer_001.py": files["layer_001.py"][:-200]})
    cut = f"pk: {new / 'pk'}/layer_001.py: not a whole part of the package (it is cut short"
    assert cut in report(diff_paths(old, new))
    (new / "pk" / "layer_001.py").unlink()
    with pytest.raises(MapgenError, match=f"^{new / 'pk'}/layer_001.py: missing \\(PARTS lists it\\)$"):
        list(diff_paths(old / "pk", new / "pk"))


def test_two_empty_folders_are_refused_as_rev_refuses_them(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    result = subprocess.run([*MAPGEN, "diff", "a", "b"], cwd=tmp_path, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip() == "a, b: no .py file there, in either folder"
    git(tmp_path, "init", "-q")
    (tmp_path / "c.txt").write_text("")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "nothing generated")
    result = subprocess.run([*MAPGEN, "diff", "--rev", "HEAD", "a"], cwd=tmp_path, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip() == "a: no .py file there, in the working tree or at HEAD"


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
