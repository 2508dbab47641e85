"""Issue 12, item 1: generated code depends on what the spec says, not on how it is laid out.
A comment, a blank line, a reordering of rules or of dims changes nothing but the header's hash."""

from __future__ import annotations

import re
from pathlib import Path

from mapgen.compiler.build import compile_target
from mapgen.verify import testing


def _rule_blocks(text: str) -> tuple[str, list[str], str]:
    head, rest = text.split("rules:\n", 1)
    tail_at = re.search(r"^\S", rest, flags=re.M)
    rules, tail = (rest[: tail_at.start()], rest[tail_at.start():]) if tail_at else (rest, "")
    blocks = ["  - " + block for block in rules.split("  - ")[1:]]
    return head, blocks, tail


def _shuffled(text: str) -> str:
    """The same spec with comments added everywhere, the rules reversed and the dims reversed."""
    head, blocks, tail = _rule_blocks(text)
    dims_head, dims = head.split("dims:\n", 1)
    dim_lines = dims.splitlines(keepends=True)
    commented = [f"  # dim {i}\n{line}" for i, line in enumerate(reversed(dim_lines))]
    rules = "".join(f"\n  # rule {i}: moved\n{block}" for i, block in enumerate(reversed(blocks)))
    return "# a comment above everything\n\n" + dims_head + "dims:\n" + "".join(commented) + "rules:\n" + rules + "\n# the end\n" + tail


def _config(folder: Path, family: str, **overrides: object) -> Path:
    testing.tiny_hf_config(family, **overrides).save_pretrained(folder)
    return folder / "config.json"


def _build(spec: Path, config: Path) -> list[str]:
    source = compile_target("stable", spec, config, "te", "test", ("spec.yaml", "config.json"))
    return source.splitlines()


def test_comments_and_rule_order_change_only_the_spec_hash(tmp_path: Path) -> None:
    config = _config(tmp_path, "qwen3_moe", num_hidden_layers=3)
    original = (testing.ROOT / "specs/qwen3_moe.yaml").read_text()
    shuffled = _shuffled(original)
    order = lambda text: re.findall(r"^  - megatron: (.*)$", text, flags=re.M)  # noqa: E731
    assert order(shuffled) == list(reversed(order(original))) and len(order(original)) > 10
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(original)
    second.write_text(shuffled)
    before, after = _build(first, config), _build(second, config)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after)
    assert len(changed) == 1 and changed[0][0].startswith("# Spec:   spec.yaml sha256:"), changed[:3]


def test_docstrings_cite_rules_by_index_and_rules_table_lists_their_ids(tmp_path: Path) -> None:
    config = _config(tmp_path, "llama")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        (testing.ROOT / "specs/llama.yaml").read_text().replace(
            "    hf: model.layers.*.self_attn.{q,k,v}_proj.weight\n",
            "    id: attention-qkv\n    hf: model.layers.*.self_attn.{q,k,v}_proj.weight\n",
        )
    )
    source = compile_target("stable", spec, config, "te", "test", ("spec.yaml", "config.json"))
    assert '    """qkv: rule 3."""' in source  # RULES[3] is the rule of id attention-qkv
    assert '    """auto -> row: rule 6."""' in source
    assert "spec.yaml:" not in source.replace("# Spec:   spec.yaml", "")  # no line numbers
    table = source.split("RULES: Final[tuple[RulePlan, ...]] = (\n", 1)[1].split("\n)\n", 1)[0]
    ids = re.findall(r'^    RulePlan\(\n?\s*"([^"]+)"', table, flags=re.M)
    assert ids == [
        "embedding.word_embeddings.weight",
        "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.*.self_attention.linear_proj.weight",
        "attention-qkv",
        "decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.*.mlp.linear_fc1.weight",
        "decoder.layers.*.mlp.linear_fc2.weight",
        "decoder.final_layernorm.weight",
        "output_layer.weight",
    ]
