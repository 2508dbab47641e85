"""black, in one pinned mode, so the same IR always gives the same bytes; memoized by shape.

A generated module repeats a few statement shapes tens of thousands of times (one function per
expert parameter, one table row per parameter), differing only in their digits. Running black
over the whole text costs about 5 s per megabyte; instead each top-level statement, and each
row of a large table, is formatted by black once per shape (its text with every digit read as
0: equal shapes have equal lengths, so black breaks their lines alike) and the digits are put
back. black never adds, drops or reorders digits, so this gives black's own output;
`tests/test_format.py` checks it against black over whole modules.
"""

from __future__ import annotations

import ast
import re

import black
from black.mode import Mode, TargetVersion

MODE = Mode(
    target_versions={TargetVersion.PY311},
    line_length=100,
    string_normalization=True,
    magic_trailing_comma=True,
)

_DIGITS = re.compile(r"\d")
_TABLE_ROWS = 8  # tables longer than this are formatted row by row
# the generated tables (PARAMS, HF_TENSORS) stand between these, one row a line, as rendered
FMT_OFF, FMT_ON = "# fmt: off", "# fmt: on"


def black_format(source: str) -> str:
    return black.format_str(source, mode=MODE)


class ShapeFormatter:
    """black for one statement (or table row) at a time, once per shape."""

    def __init__(self) -> None:
        self._formatted: dict[str, list[str]] = {}  # shape -> formatted text split at digits

    def statement(self, text: str) -> str:
        shape = _DIGITS.sub("0", text)
        pieces = self._formatted.get(shape)
        if pieces is None:
            pieces = _DIGITS.split(black_format(shape))
            self._formatted[shape] = pieces
        digits = _DIGITS.findall(text)
        if len(digits) != len(pieces) - 1:  # black changed the digits: never seen, but be exact
            return black_format(text)
        out = [pieces[0]]
        for digit, piece in zip(digits, pieces[1:]):
            out.append(digit)
            out.append(piece)
        return "".join(out)

    def row(self, text: str, brackets: str) -> str:
        """One element of a collection written one element per line (4 spaces in)."""
        opening, closing = brackets[0], brackets[1]
        wrapped = self.statement(f"x = {opening}\n    {text},\n{closing}\n")
        return wrapped.split("\n", 1)[1].rsplit(closing, 1)[0]


def format_source(source: str, module: ast.Module | None = None) -> str:
    """`black_format(source)`, statement by statement. The text between top-level statements
    (blank lines, comments) is kept as the template wrote it, which the test checks is black's;
    statements between `# fmt: off` and `# fmt: on` are kept as written, as black keeps them."""
    tree = module or ast.parse(source)
    lines = source.splitlines(keepends=True)
    formatter = ShapeFormatter()
    out: list[str] = []
    position = 0
    verbatim = False  # inside `# fmt: off` ... `# fmt: on`, which black leaves as written
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        last = node.end_lineno or node.lineno
        between = lines[position:first]
        out.extend(between)
        for line in between:
            if line.strip() in (FMT_OFF, FMT_ON):
                verbatim = line.strip() == FMT_OFF
        out.append("".join(lines[first:last]) if verbatim else _format_statement(formatter, node, lines[first:last]))
        position = last
    out.extend(lines[position:])
    return "".join(out)


def _format_statement(formatter: ShapeFormatter, node: ast.stmt, lines: list[str]) -> str:
    """A statement through black; a long table row by row, between its opening line and its
    closing bracket (the template writes each row on lines of its own)."""
    value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    if isinstance(value, ast.Dict):
        spans = [(k, v) for k, v in zip(value.keys, value.values)]
    elif isinstance(value, (ast.Tuple, ast.List)):
        spans = [(e, e) for e in value.elts]
    else:
        spans = []
    if len(spans) <= _TABLE_ROWS or any(k is None or k.lineno == node.lineno for k, _ in spans):
        return formatter.statement("".join(lines))
    assert value is not None
    # rows of a tuple are formatted as rows of a list: a one-element tuple's comma is not black's
    # "magic" trailing comma, which keeps a collection one row per line
    brackets = "{}" if isinstance(value, ast.Dict) else "[]"
    out = [lines[0]]
    for first, last in spans:
        assert first is not None and last.end_lineno is not None
        text = "".join(lines[first.lineno - node.lineno : last.end_lineno - node.lineno + 1])
        out.append(formatter.row(text.strip().rstrip(","), brackets))
    out.append(lines[-1])
    return "".join(out)
