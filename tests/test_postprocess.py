"""The gate on generated source: a generator bug is caught before anything is written."""

from __future__ import annotations

import pytest

from mapgen.compiler.postprocess import GeneratedCodeError, check

GOOD = "P = tuple\n\n\ndef import_a():\n    pass\n\n\nIMPORTS = {}\nPARAMS: tuple = (P('a', import_a),)\n"


def test_good_source_passes() -> None:
    check(GOOD, "t")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(:\n", "t: generated code does not parse"),
        ("def f():\n    pass\n\n\ndef f():\n    pass\n", "t: generated code defines twice: f"),
        ("X: int = 1\nX: int = 2\n", "t: generated code defines twice: X"),
        ("PARAMS: tuple = (P('a', import_a),)\n", "t: PARAMS names undefined functions: import_a"),
        ("def e():\n    pass\n\n\nPARAMS: tuple = (P('a', e, e), P('b', e, nope))\n", "t: PARAMS names undefined functions: nope"),
    ],
)
def test_bad_source_is_refused(source: str, message: str) -> None:
    with pytest.raises(GeneratedCodeError) as raised:
        check(source, "t")
    assert str(raised.value).startswith(message)
