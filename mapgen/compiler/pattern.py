"""Wildcard name patterns: `*` captures an index (digits), `**` captures anything.

A pattern round-trips through `str()`, matches concrete names with a compiled regex, and is
filled back in with the captures of a match on another pattern with the same wildcards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\*\*|\*")


@dataclass(frozen=True)
class Pattern:
    text: str
    wildcards: tuple[str, ...] = field(init=False, compare=False)
    regex: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        wildcards = tuple(_TOKEN.findall(self.text))
        parts = _TOKEN.split(self.text)
        body = re.escape(parts[0])
        for token, part in zip(wildcards, parts[1:]):
            body += ("(.+)" if token == "**" else "(\\d+)") + re.escape(part)
        object.__setattr__(self, "wildcards", wildcards)
        object.__setattr__(self, "regex", re.compile(body))

    def match(self, name: str) -> tuple[str, ...] | None:
        found = self.regex.fullmatch(name)
        return None if found is None else found.groups()

    def fill(self, captures: tuple[str, ...]) -> str:
        pieces = iter(captures)
        return _TOKEN.sub(lambda _m: next(pieces), self.text)

    def __str__(self) -> str:
        return self.text


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(text: str) -> list[str] | None:
    """`a.{q,k,v}_proj.w` -> [`a.q_proj.w`, `a.k_proj.w`, `a.v_proj.w`]; None if no braces.

    Only one brace group is allowed; more, or a brace outside the group, raise ValueError. The
    alternatives are taken as they are (stripped of spaces), not as regex replacements.
    """
    groups = list(_BRACES.finditer(text))
    if not groups:
        if "{" in text or "}" in text:
            raise ValueError(f"unmatched brace in pattern '{text}': a brace group is {{a,b,...}}")
        return None
    outside = _BRACES.sub("", text)
    if len(groups) > 1 or "{" in outside or "}" in outside:
        raise ValueError("only one {a,b,...} group is allowed in a pattern")
    head, tail = text[: groups[0].start()], text[groups[0].end() :]
    return [head + alt.strip() + tail for alt in groups[0].group(1).split(",")]
