"""Name patterns (`mapgen.compiler.pattern`): `*` captures an index (digits only), `**` captures
anything (at least one character); everything else matches itself, regex characters included;
a pattern fills back in from another's captures and is its own text; `expand_braces` expands one
`{a,b,...}` group and refuses more, or a brace outside the group."""

from __future__ import annotations

import pytest

from mapgen.compiler.pattern import Pattern, expand_braces


@pytest.mark.parametrize(
    ("text", "name", "captures"),
    [
        ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ()),
        ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", None),
        ("model.layers.*.mlp.down_proj.weight", "model.layers.12.mlp.down_proj.weight", ("12",)),
        ("model.layers.*.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight", ("0",)),
        # `*` is digits only: not a letter, a sign, a dot, nothing
        ("model.layers.*.w", "model.layers.x.w", None),
        ("model.layers.*.w", "model.layers.-1.w", None),
        ("model.layers.*.w", "model.layers.1.2.w", None),
        ("model.layers.*.w", "model.layers..w", None),
        ("model.layers.*.w", "model.layers.1a.w", None),
        # `**` is anything, dots included, but not nothing
        ("**.weight", "model.layers.3.mlp.weight", ("model.layers.3.mlp",)),
        ("**.weight", ".weight", None),
        ("a.**", "a.b.c", ("b.c",)),
        ("**.**.w", "a.b.c.w", ("a.b", "c")),  # the first `**` takes what it can
        ("layers.*.experts.**", "layers.3.experts.7.w", ("3", "7.w")),
        ("layers.**.experts.*", "layers.3.x.experts.17", ("3.x", "17")),
        ("w*", "w17", ("17",)),
        # the whole name, not part of it
        ("model.layers.*", "model.layers.1.w", None),
        ("layers.*", "model.layers.1", None),
    ],
)
def test_match(text: str, name: str, captures: tuple[str, ...] | None) -> None:
    assert Pattern(text).match(name) == captures


@pytest.mark.parametrize(
    ("text", "matches", "does_not_match"),
    [
        # `.` is a dot, not any character
        ("a.b", "a.b", "axb"),
        ("a+b.*", "a+b.1", "aab.1"),
        ("a?.*", "a?.2", "a.2"),
        ("x.(y)|z", "x.(y)|z", "x.y"),
        ("fused[*]", "fused[3]", "fused3"),
        ("a^$.b\\c", "a^$.b\\c", "a.b"),
        ("n{2}.*", "n{2}.5", "nn.5"),
    ],
)
def test_regex_characters_in_names_are_themselves(text: str, matches: str, does_not_match: str) -> None:
    pattern = Pattern(text)
    assert pattern.match(matches) is not None
    assert pattern.match(does_not_match) is None


@pytest.mark.parametrize(
    ("text", "wildcards"),
    [
        ("a.b", ()),
        ("a.*.b", ("*",)),
        ("a.**", ("**",)),
        ("layers.*.experts.*.w", ("*", "*")),
        ("**.layers.*.w", ("**", "*")),
    ],
)
def test_wildcards_in_order(text: str, wildcards: tuple[str, ...]) -> None:
    assert Pattern(text).wildcards == wildcards


def test_fill_from_another_patterns_match() -> None:
    hf = Pattern("model.layers.*.mlp.experts.*.gate_proj.weight")
    megatron = Pattern("decoder.layers.*.mlp.experts.linear_fc1.weight*")
    captures = hf.match("model.layers.3.mlp.experts.17.gate_proj.weight")
    assert captures == ("3", "17")
    assert megatron.fill(captures) == "decoder.layers.3.mlp.experts.linear_fc1.weight17"
    assert Pattern("**.w.*").fill(("a.b", "4")) == "a.b.w.4"
    assert Pattern("plain.name").fill(()) == "plain.name"


@pytest.mark.parametrize(
    "name",
    ["model.layers.5.self_attn.q_proj.weight", "a.b+c.7.(x)", "model.x.y.layers.12.w"],
)
def test_fill_undoes_match(name: str) -> None:
    for text in ("model.layers.*.self_attn.q_proj.weight", "a.b+c.*.(x)", "**.layers.*.w"):
        pattern = Pattern(text)
        captures = pattern.match(name)
        if captures is not None:
            assert pattern.fill(captures) == name
            break
    else:
        pytest.fail(f"no pattern matches {name}")


@pytest.mark.parametrize("text", ["a.b", "model.layers.*.w", "**.x.**", "fused[*]", "a+b.{}"])
def test_str_is_the_text(text: str) -> None:
    pattern = Pattern(text)
    assert str(pattern) == text
    assert Pattern(str(pattern)) == pattern
    assert Pattern(str(pattern)).regex.pattern == pattern.regex.pattern


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("model.layers.*.self_attn.{q,k,v}_proj.weight", [
            "model.layers.*.self_attn.q_proj.weight",
            "model.layers.*.self_attn.k_proj.weight",
            "model.layers.*.self_attn.v_proj.weight",
        ]),
        ("mlp.{gate, up}_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
        ("{a,b}", ["a", "b"]),
        ("x.{only}", ["x.only"]),
        # an alternative is text, not a regex replacement
        ("a.{x\\1,y\\z}", ["a.x\\1", "a.y\\z"]),
        ("model.layers.*.w", None),
        ("", None),
    ],
)
def test_expand_braces(text: str, expanded: list[str] | None) -> None:
    assert expand_braces(text) == expanded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.{q,k}.{x,y}", "only one {a,b,...} group is allowed in a pattern"),
        ("a.{q,k}.w}", "only one {a,b,...} group is allowed in a pattern"),
        ("a.{q,{k}}", "only one {a,b,...} group is allowed in a pattern"),
        ("{a.{q,k}", "only one {a,b,...} group is allowed in a pattern"),
        ("a.{q,k.w", "unmatched brace in pattern 'a.{q,k.w': a brace group is {a,b,...}"),
        ("a.q}.w", "unmatched brace in pattern 'a.q}.w': a brace group is {a,b,...}"),
    ],
)
def test_expand_braces_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        expand_braces(text)
    assert str(raised.value) == message
