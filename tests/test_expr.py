"""The spec expression language (`mapgen.compiler.expr`) evaluates as Python does (issue 12,
item 6): each row gives an expression and the value it must have, and checks it against both
mapgen and Python's own `eval` of the same source over the same fields. A row whose value is an
error expects MissingField where Python raises NameError or AttributeError (a field the config
lacks), ExprValueError where Python raises anything else. Then: `default`, which Python lacks;
the fields an expression reads; what the language refuses; and the bugs this file was written
for (`~5` was 5, `b or 3` was True, `false and x.y` raised).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from mapgen.common.limits import MAX_EXPR_LIST
from mapgen.compiler.config import spec_reads, translate
from mapgen.compiler.hfconfig import evaluate_in_context, read_hf_config
from mapgen.compiler.expr import Expr, ExprSyntaxError, ExprValueError, MissingField
from mapgen.compiler.spec import parse_spec

from spec_cases import BASE_CONFIG, BASE_SPEC

CONFIG: dict[str, Any] = {
    "a": 7,
    "b": 0,
    "c": -3,
    "f": 2.5,
    "n0": 0.0,
    "s": "ab",
    "t": True,
    "xs": [1, 2, 3],
    "empty": [],
    "words": ["x", "y"],
    "obj": {"k": 4, "inner": {"z": 1}},
}


@dataclass(frozen=True)
class Raises:
    error: type[Exception]
    field: str | None = None  # for MissingField: the field it names


MISSING = Raises(MissingField, "missing")


class _Object(dict[str, Any]):
    """A config object as Python sees it in these tests: its fields are attributes, as `a.b`
    reads them in the language."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _objects(value: Any) -> Any:
    if isinstance(value, dict):
        return _Object({k: _objects(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_objects(v) for v in value]
    return value


def python(source: str, config: dict[str, Any]) -> Any:
    """Python's value of `source`, with the language's names for True, False and None and its
    `range`, which gives a list. Everything is a global, so comprehensions see it."""
    names = {"true": True, "false": False, "null": None, "range": lambda *a: list(range(*a))}
    return eval(source, {"__builtins__": {}, **names, **_objects(config)})


def same(got: Any, want: Any) -> bool:
    """Equal and of the same type all the way down (True is not 1, (1,) is not [1])."""
    if type(got) is not type(want) and not (isinstance(got, dict) and isinstance(want, dict)):
        return False
    if isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return bool(got == want)


def check(source: str, expected: Any, config: dict[str, Any] = CONFIG) -> None:
    """`source` gives `expected` (a value, or Raises) in Python and in mapgen."""
    if isinstance(expected, Raises):
        python_errors: tuple[type[Exception], ...] = (
            (NameError, AttributeError) if expected.error is MissingField else (TypeError, ValueError, ArithmeticError, LookupError)
        )
        with pytest.raises(python_errors):
            python(source, config)
        with pytest.raises(expected.error) as raised:
            Expr.parse(source).evaluate(config)
        if expected.field is not None:
            assert isinstance(raised.value, MissingField) and raised.value.field == expected.field
        return
    want = python(source, config)
    assert same(want, expected), f"the row is wrong: Python gives {want!r}"
    got = Expr.parse(source).evaluate(config)
    assert same(got, expected), f"{source}: mapgen gives {got!r}, Python {want!r}"


def rows(*table: tuple[str, Any]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("source", "expected"), table, ids=[row[0] for row in table])


@rows(
    ("~5", -6),  # was 5
    ("~a", -8),
    ("~c", 2),
    ("~-1", 0),
    ("~t", -2),
    ("~~a", 7),
    ("~f", Raises(ExprValueError)),
    ("~s", Raises(ExprValueError)),
    ("-a", -7),
    ("-c", 3),
    ("-f", -2.5),
    ("-t", -1),
    ("- -a", 7),
    ("-s", Raises(ExprValueError)),
    ("+a", 7),
    ("+c", -3),
    ("+f", 2.5),
    ("+t", 1),
    ("+s", Raises(ExprValueError)),
    ("not a", False),
    ("not b", True),
    ("not n0", True),
    ("not s", False),
    ("not empty", True),
    ("not xs", False),
    ("not null", True),
    ("not not xs", True),
    ("-a + 1", -6),
    ("not a == 7", False),
    ("-missing", MISSING),
)
def test_unary_operators(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("b or 3", 3),  # was True
    ("a or 3", 7),  # was True
    ("b and 3", 0),  # was False
    ("a and 3", 3),  # was True
    ("c and f", 2.5),
    ("n0 or s", "ab"),
    ("empty or s", "ab"),
    ("s and xs", [1, 2, 3]),
    ("b or empty", []),
    ("empty and a", []),
    ("false or null", None),
    ("true and 'x'", "x"),
    ("a and b and c", 0),
    ("a and c and f", 2.5),
    ("b or n0 or empty", []),
    ("b or n0 or a or c", 7),
    ("not b and a", 7),
    ("b or a and c", -3),
    ("(b or a) and s", "ab"),
    ("a if b or c else f", 7),
)
def test_and_or_give_the_operand_that_decides(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("false and x.y", False),  # raised MissingField('x')
    ("false and missing", False),
    ("b and missing", 0),
    ("empty and missing.field", []),
    ("true or missing", True),
    ("a or missing", 7),
    ("s or missing.x", "ab"),
    ("b and missing or a", 7),
    ("a or missing and missing", 7),
    ("b and 1 // 0", 0),
    ("a or 1 // 0", 7),
    ("a or 'x' * 1000000000", 7),
    ("[i for i in xs if i < 5 or missing]", [1, 2, 3]),
    ("[i for i in xs if i > 5 and missing]", []),
    # where the side that would raise is evaluated, it raises
    ("true and missing", MISSING),
    ("b or missing", MISSING),
    ("a and b or missing", MISSING),
    ("b or 1 // 0", Raises(ExprValueError)),
    ("a and 1 // 0", Raises(ExprValueError)),
)
def test_and_or_short_circuit(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("a if t else c", 7),
    ("a if b else c", -3),
    ("s if xs else empty", "ab"),
    ("a if t else missing", 7),
    ("missing if b else c", -3),
    ("'ok' if true else 1 // 0", "ok"),
    ("1 // 0 if empty else 'ok'", "ok"),
    ("a if b else c if t else missing", -3),
    ("(a if b else c) if t else f", -3),
    ("missing if t else a", MISSING),
    ("a if missing else c", MISSING),
)
def test_conditional_evaluates_only_the_branch_it_takes(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("a > b", True),
    ("a < b", False),
    ("a == 7.0", True),
    ("a != 7", False),
    ("a >= 7", True),
    ("f <= 2", False),
    ("t == 1", True),
    ("s == 'ab'", True),
    ("s < 'b'", True),
    ("xs == [1, 2, 3]", True),
    ("xs < [1, 3]", True),
    ("xs == (1, 2, 3)", False),
    ("(1, 2) == (1, 2)", True),
    ("2 in xs", True),
    ("5 not in xs", True),
    ("'a' in s", True),
    ("'k' in obj", True),
    ("'z' not in obj", True),
    ("null == null", True),
    ("b < a < 10", True),
    ("1 < a < 5", False),
    ("1 < 2 > 1", True),
    ("a >= 7 >= f > c", True),
    ("b == n0 == false", True),
    ("1 in xs in [xs]", True),
    ("3 < 2 < missing", False),  # the chain stops at its first false link
    ("3 < 2 < 1 // 0", False),
    ("1 < 2 < missing", MISSING),
    ("s < 3", Raises(ExprValueError)),
    ("1 in a", Raises(ExprValueError)),
)
def test_comparisons(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("a + c", 4),
    ("a - c", 10),
    ("a - c - 1", 9),
    ("a * c", -21),
    ("a + c * 2", 1),
    ("(a + c) * 2", 8),
    ("a / 2", 3.5),
    ("a / 7", 1.0),
    ("a // 2", 3),
    ("c // 2", -2),
    ("a // -2", -4),
    ("c // -2", 1),
    ("f // 1", 2.0),
    ("-f // 1", -3.0),
    ("a // f", 2.0),
    ("c % 5", 2),
    ("a % -3", -2),
    ("c % -5", -3),
    ("f % 1", 0.5),
    ("-7.5 % 2", 0.5),
    ("7.5 % -2", -0.5),
    ("t + t", 2),
    ("a * t", 7),
    ("a + f", 9.5),
    ("s + 'c'", "abc"),
    ("s * 2", "abab"),
    ("2 * s", "abab"),
    ("s * -1", ""),
    ("xs + [4]", [1, 2, 3, 4]),
    ("xs * 2", [1, 2, 3, 1, 2, 3]),
    ("(1, 2) + (3,)", (1, 2, 3)),
    ("(1,) * 3", (1, 1, 1)),
    ("'%d-%s' % (a, s)", "7-ab"),  # was an error: the tuple was a list
    ("'%s' % s", "ab"),
    ("'%5.1f|' % f", "  2.5|"),
    ("'%(k)d' % obj", "4"),
    ("'x%%' % ()", "x%"),
    ("a / 0", Raises(ExprValueError)),
    ("a // 0", Raises(ExprValueError)),
    ("a % 0", Raises(ExprValueError)),
    ("f % 0", Raises(ExprValueError)),
    ("f // n0", Raises(ExprValueError)),
    ("s + 1", Raises(ExprValueError)),
    ("xs + (4,)", Raises(ExprValueError)),
    ("s - s", Raises(ExprValueError)),
    ("'%d' % s", Raises(ExprValueError)),
    ("a + missing", MISSING),
)
def test_arithmetic(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("xs[0]", 1),
    ("xs[-1]", 3),
    ("xs[t]", 2),
    ("s[1]", "b"),
    ("words[a - 6]", "y"),
    ("(1, 2)[1]", 2),
    ("[10, 20][b]", 10),
    ("obj['k']", 4),
    ("obj.k", 4),
    ("obj.inner.z", 1),
    ("obj.inner['z'] + obj.k", 5),
    ("xs[3]", Raises(ExprValueError)),
    ("obj['nope']", Raises(ExprValueError)),
    ("xs['a']", Raises(ExprValueError)),
    ("a[0]", Raises(ExprValueError)),
    ("obj.nope", Raises(MissingField, "obj.nope")),
    ("obj.inner.nope", Raises(MissingField, "obj.inner.nope")),
    ("missing.x", Raises(MissingField, "missing")),
    ("missing", MISSING),
)
def test_indexing_and_nested_fields(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("true", True),
    ("false", False),
    ("null", None),
    ("True", True),
    ("1.5e3", 1500.0),
    ("0x10", 16),
    ("1_000", 1000),
    ("'a' 'b'", "ab"),
    ("[1, 'x', null]", [1, "x", None]),
    ("[]", []),
    ("(a,)", (7,)),
    ("()", ()),
    ("(a, [s])", (7, ["ab"])),
)
def test_literals(source: str, expected: Any) -> None:
    check(source, expected)


@rows(
    ("[i * 2 for i in xs if i != 2]", [2, 6]),
    ("[i for i in range(a) if i % 2 if i > 2]", [3, 5]),
    ("[ch for ch in s]", ["a", "b"]),
    ("[k for k in obj]", ["k", "inner"]),
    ("[x for x in (1, 2)]", [1, 2]),
    ("[x for x in [null, 1]]", [None, 1]),  # raised MissingField('x'): a variable may hold null
    ("[x == null for x in [null, 1]]", [True, False]),
    ("[a for a in xs]", [1, 2, 3]),  # the variable shadows the config field
    ("[a + i for i in xs]", [8, 9, 10]),
    ("[i for i in range(a) if i in xs]", [1, 2, 3]),
    ("[[j for j in range(i)] for i in range(3)]", [[], [0], [0, 1]]),
    ("[[i + j for j in xs] for i in range(2)]", [[1, 2, 3], [2, 3, 4]]),
    ("[i for i in [i for i in xs] if i > 1]", [2, 3]),
    ("[o.z for o in [obj.inner]]", [1]),
    ("[i for i in range(3) if false and missing]", []),
    ("range(3)", [0, 1, 2]),
    ("range(2, 5)", [2, 3, 4]),
    ("range(c)", []),
    ("range(a)[-1]", 6),
    ("[i for i in a]", Raises(ExprValueError)),
    ("[missing for i in xs]", MISSING),
    ("[i for i in xs if missing]", MISSING),
    ("range(f)", Raises(ExprValueError)),
)
def test_comprehensions_and_range(source: str, expected: Any) -> None:
    check(source, expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("default(missing, 3)", 3),
        ("default(a, 3)", 7),
        ("default(b, 3)", 0),
        ("default(nothing, 3)", 3),  # a field the config holds as null is missing
        ("default(obj.nope, 'x')", "x"),
        ("default(obj.k, 'x')", 4),
        ("default(missing.x, default(also_missing, 5))", 5),
        ("default(false and missing, 1)", False),
        ("default(true and missing, 1)", 1),
        ("default(b or missing, 1)", 1),
        ("default(a or missing, 1)", 7),
        ("default(missing, a) + 1", 8),
        ("[default(x, 0) for x in [null, 2]]", [None, 2]),  # a variable holding null is not missing
    ],
)
def test_default(source: str, expected: Any) -> None:
    got = Expr.parse(source).evaluate({**CONFIG, "nothing": None})
    assert same(got, expected), got


def test_default_does_not_catch_other_errors() -> None:
    with pytest.raises(ExprValueError, match="integer division or modulo by zero"):
        Expr.parse("default(1 // 0, 1)").evaluate(CONFIG)


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("false and x.y", {"x.y"}),
        ("a or b.c", {"a", "b.c"}),
        ("a and b and c", {"a", "b", "c"}),
        ("a if c else d.e", {"a", "c", "d.e"}),
        ("default(a, b)", {"a", "b"}),
        ("[i for i in range(n) if i in xs or false and m]", {"n", "xs", "m"}),
        ("[o.z for o in objs]", {"objs"}),
        ("~a + -b.c", {"a", "b.c"}),
        ("true or null", set()),
    ],
)
def test_fields_are_what_either_side_reads(source: str, fields: set[str]) -> None:
    """An expression reads, statically, every field of either side of an `and`/`or` and of
    both branches of an `if`: evaluation that skips a side does not change what it reads."""
    assert Expr.parse(source).fields() == frozenset(fields)


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ("a or b", ["a"]),
        ("b or a", ["b", "a"]),
        ("b and a", ["b"]),
        ("a if t else c", ["t", "a"]),
        ("[i for i in range(a) if i > 5]", ["a"]),  # the comprehension variable is no field
        ("[o.z for o in [obj.inner]]", ["obj", "obj.inner"]),
        ("obj.inner.z", ["obj", "obj.inner", "obj.inner.z"]),
        ("default(missing, c)", ["c"]),
    ],
)
def test_reads_are_what_the_evaluation_read(source: str, reads: list[str]) -> None:
    found: list[str] = []
    Expr.parse(source).evaluate(CONFIG, found)
    assert found == reads


REFUSED = [
    ("2 ** 3", "invalid expression '2 ** 3': operator '**' not allowed"),
    ("a & 1", "invalid expression 'a & 1': operator '&' not allowed"),
    ("a | 1", "operator '|' not allowed"),
    ("a ^ 1", "operator '^' not allowed"),
    ("a << 1", "operator '<<' not allowed"),
    ("a >> 1", "operator '>>' not allowed"),
    ("a @ b", "operator '@' not allowed"),
    ("a is null", "invalid expression 'a is null': comparison 'is' not allowed"),
    ("1 < a is not null", "comparison 'is not' not allowed"),
    ("xs[0:1]", "invalid expression 'xs[0:1]': a slice not allowed"),
    ("{'a': 1}", "a dict not allowed"),
    ("{1}", "a set not allowed"),
    ("{i: i for i in xs}", "a dict comprehension not allowed"),
    ("{i for i in xs}", "a set comprehension not allowed"),
    ("sum(i for i in xs)", "the only calls allowed are default(expr, fallback) and range(n) / range(a, b)"),
    ("lambda: 1", "a lambda not allowed"),
    ("f'{a}'", "an f-string not allowed"),
    ("(x := 1)", "':=' not allowed"),
    ("[*xs]", "'*' unpacking not allowed"),
    ("len(xs)", "the only calls allowed are default(expr, fallback) and range(n) / range(a, b)"),
    ("range(1, 2, 3)", "the only calls allowed are"),
    ("default(a)", "the only calls allowed are"),
    ("range(*xs)", "the only calls allowed are"),
    ("default(a, fallback=1)", "the only calls allowed are"),
    ("obj.get('k')", "the only calls allowed are"),
    ("[i for i in xs for j in xs]", "a list comprehension takes one 'for <name> in ...'"),
    ("[i for i, j in xs]", "a list comprehension takes one 'for <name> in ...'"),
    ("[true for true in xs]", "invalid expression '[true for true in xs]': 'true' cannot be a comprehension variable"),
    ("[i for range in xs]", "'range' cannot be a comprehension variable"),
    ("b'x'", "invalid expression \"b'x'\": literal b'x' not allowed (literals are numbers, strings, true, false and null)"),
    ("1j", "literal 1j not allowed"),
    ("...", "literal ... not allowed"),
    ("a if b", "invalid expression 'a if b': "),
    ("a = 1", "invalid expression 'a = 1': "),
    ("a +", "invalid expression 'a +': invalid syntax"),
    ("await a", "Await not allowed"),
]


@pytest.mark.parametrize(("source", "message"), REFUSED, ids=[row[0] for row in REFUSED])
def test_what_the_language_refuses_does_not_parse(source: str, message: str) -> None:
    with pytest.raises(ExprSyntaxError) as raised:
        Expr.parse(source)
    assert message in str(raised.value)


def test_limits_count_tuples() -> None:
    """A tuple (now a literal's value, and the per-layer dims a `when` sees) is held to the
    list limit as a list is."""
    with pytest.raises(ExprValueError, match=f"gives a list of 1,000,000 elements, over the limit of {MAX_EXPR_LIST:,}"):
        Expr.parse("(1,) * 1000000").evaluate({})
    with pytest.raises(ExprValueError, match="gives a list of 3,000,000,000 elements"):
        Expr.parse("layers * 1000000000").evaluate({"layers": (0, 1, 2)})


def test_a_spec_reads_a_field_its_expressions_skip() -> None:
    """A field read only on the side of an `and` an evaluation skips still counts as read (the
    config may hold it), and a `when` whose skipped side names a field the config lacks builds."""
    spec_text = BASE_SPEC.replace(
        "share_embeddings_and_output_weights: tie_word_embeddings",
        "share_embeddings_and_output_weights: false and tie_word_embeddings",
    ).replace(
        "    hf: model.layers.*.mlp.down_proj.weight\n",
        "    hf: model.layers.*.mlp.down_proj.weight\n    when: num_layers > 0 or no_such_field.x\n",
        1,
    )
    assert "false and tie_word_embeddings" in spec_text and "no_such_field.x" in spec_text
    spec = parse_spec("bad.yaml", spec_text)
    reads = spec_reads(spec)
    assert "tie_word_embeddings" in reads and "no_such_field.x" in reads
    config = read_hf_config("config.json", json.dumps({**BASE_CONFIG, "tie_word_embeddings": True}))
    dims = translate(spec, config)
    assert dims.share_embeddings_and_output_weights is False
    (when,) = [rule.when for rule in spec.rules if rule.when is not None]
    assert evaluate_in_context(when, dims, config) is True


def test_nested_lists_count_every_element_they_hold() -> None:
    """A list of one shared list is as big as it prints: `[[0] * 50000] * 100000` is refused,
    not 5e9 elements handed to repr."""
    from mapgen.compiler.expr import Expr, ExprValueError

    with pytest.raises(ExprValueError, match="a list of"):
        Expr.parse("[[0] * 50000] * 100000").evaluate({}, [])
    assert Expr.parse("[[0] * 3] * 4").evaluate({}, []) == [[0] * 3] * 4
