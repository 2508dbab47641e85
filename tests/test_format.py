"""The shape-memoized formatter gives exactly what black gives over the whole module."""

from __future__ import annotations

from typing import Any

import pytest

from mapgen.verify import testing
from mapgen.compiler.build import compile_target
from mapgen.compiler.format import ShapeFormatter, black_format, format_source


@pytest.mark.parametrize(
    ("family", "layout"),
    [
        ("llama3_2_1b", "te"),  # a real config: 16 layers, tied embeddings
        ("qwen2", "te"),  # biases
        ("qwen3_moe", "local"),  # SequentialMLP experts
        ("deepseek_v3", "te"),  # MLA, a dense layer, grouped experts, shared experts
    ],
)
def test_equals_black_over_the_whole_module(family: str, layout: str, tiny_checkpoint: Any) -> None:
    if family == "llama3_2_1b":
        spec, config = testing.ROOT / "specs/llama.yaml", testing.ROOT / "specs/configs/llama3_2_1b.json"
    else:
        spec, config = testing.ROOT / testing.FAMILY_SPECS[family], tiny_checkpoint(family)[0] / "config.json"
    rendered = compile_target("m", spec, config, layout, "test", formatted=False)
    expected = black_format(rendered)
    assert rendered != expected  # there is formatting to do
    assert format_source(rendered) == expected


def test_each_shape_goes_through_black_once() -> None:
    calls: list[str] = []
    formatter = ShapeFormatter()
    original = formatter.statement.__globals__["black_format"]

    def counting(source: str) -> str:
        calls.append(source)
        return str(original(source))

    formatter.statement.__globals__["black_format"] = counting
    try:
        text = "def f_{i}(a,b):\n  return g( 'layer.{i}', ( {i}, 7 ) )\n"
        outputs = [formatter.statement(text.format(i=i)) for i in range(10, 40)]
        three_digits = formatter.statement(text.format(i=123))
    finally:
        formatter.statement.__globals__["black_format"] = original
    assert len(calls) == 2  # one shape per digit count
    assert outputs[5] == black_format(text.format(i=15)) == 'def f_15(a, b):\n    return g("layer.15", (15, 7))\n'
    assert three_digits == black_format(text.format(i=123))
