"""Matching two builds' parameters for `mapgen diff`: layer and expert numbers abstracted out of
names and code (`abstract`), two snippets' parsed expressions compared field by field
(`expr_changes`), and each parameter's row and functions paired with the other build's and
grouped by rule and by how they changed (`ParamDiff`). `mapgen.compiler.diff` reports the groups.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mapgen.compiler.diffread import Module

_DOC = re.compile(r'\n    """(.*?)"""', re.DOTALL)
# a row's two functions: `import_x, export_x` (a package's joined rows: `layer_003.import_x, ...`)
_FUNCTION_FIELDS = re.compile(r",\s*([A-Za-z_][\w.]*),\s*([A-Za-z_][\w.]*),?\s*\)$")
_HEX = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{20,}\b")
# a ParamPlan row's rule index (its 8th field), without parsing the row
_ROW_RULE = re.compile(
    r"\w+\(\s*\"[^\"]*\",\s*\([^()]*\),\s*\"[^\"]*\",(?:\s*(?:None|True|False|-?\d+),){4}\s*(\d+),\s*\("
)
_DOC_RULE = re.compile(r"rule (\d+)")

# Layer and expert numbers in names: megatron-core's `decoder.layers.3`, `local_experts.5`, TE's
# grouped `linear_fc1.weight5`, HF's `model.layers.3`, `experts.5`, a stacked slice
# `load("...down_proj")[5]` and its label `"...down_proj[5]"`, and the functions' names
# (`..._layers_3_..._weight5`). They become these placeholders, which parse as names.
LAYER, EXPERT = "__L__", "__E__"
_NUMBERED = re.compile(
    r"(?:(?<=layers\.)|(?<=layers_))(?P<L>\d+)"
    r"|(?:(?<=experts\.)|(?<=experts_))(?P<E>\d+)"
    r"|(?:(?<=\.weight)|(?<=_weight)|(?<=\.bias)|(?<=_bias))(?P<W>\d+)\b"
    r"|(?<=[\"']\)\[)(?P<S>\d+)(?=\])"
    r"|(?<=[\w.]\[)(?P<T>\d+)(?=\][\"'])"
)

# ParamPlan's positional fields, as the template writes them (the last two, the functions, are
# named after the parameter and not compared); RulePlan's.
PLAN_FIELDS = (
    "megatron name", "shape", "dtype", "TP split dim", "expert-parallel", "layer", "expert", "rule", "HF names",
)


# --- abstraction and display -------------------------------------------------------------------


def abstract(text: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """`text` with its layer and expert numbers replaced by LAYER and EXPERT, and the numbers."""
    layers: list[int] = []
    experts: list[int] = []

    def replace(found: re.Match[str]) -> str:
        if found.group("L") is not None:
            layers.append(int(found.group("L")))
            return LAYER
        experts.append(int(found.group(0)))
        return EXPERT

    return _NUMBERED.sub(replace, text), tuple(layers), tuple(experts)


def shown(text: str) -> str:
    """A text for the reader: placeholders as <L> and <E>, long hashes cut to 12 digits."""
    return _HEX.sub(r"\1…", text.replace(LAYER, "<L>").replace(EXPERT, "<E>"))


def one_line(text: str) -> str:
    return " ".join(text.split())


def squeeze(old: str, new: str, width: int = 100, context: int = 0) -> tuple[str, str]:
    """Both texts, when either is longer than `width`, down to the words where they differ
    with about `context` characters either side."""
    if max(len(old), len(new)) <= width:
        return old, new
    shorter = min(len(old), len(new))
    start = 0
    while start < shorter and old[start] == new[start]:
        start += 1
    end = 0
    while end < shorter - start and old[-1 - end] == new[-1 - end]:
        end += 1
    start = old.rfind(" ", 0, max(start - context, 0)) + 1
    cuts = []
    for text in (old, new):
        cut = text.find(" ", min(len(text) - end + context, len(text)))
        cuts.append(len(text) if cut < 0 else cut)
    before = "…" if start else ""
    return (
        before + old[start : cuts[0]] + ("…" if cuts[0] < len(old) else ""),
        before + new[start : cuts[1]] + ("…" if cuts[1] < len(new) else ""),
    )


def ranges(numbers: Iterable[int], most: int = 4) -> str:
    """`0-2, 5, 7-9`: sorted runs; beyond `most` runs, the span and the count."""
    values = sorted(set(numbers))
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    if len(runs) > most:
        return f"{len(values)} in {values[0]}-{values[-1]}"
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def count_of(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def where_of(layers: Iterable[int], experts: Iterable[int]) -> str:
    parts = []
    layer_set, expert_set = set(layers), set(experts)
    if layer_set:
        parts.append(f"layer{'s' if len(layer_set) > 1 else ''} {ranges(layer_set)}")
    if expert_set:
        parts.append(f"expert{'s' if len(expert_set) > 1 else ''} {ranges(expert_set)}")
    return f" ({', '.join(parts)})" if parts else ""


# --- comparing parsed snippets -----------------------------------------------------------------

Change = tuple[str, str, str]  # what, before, after (abstracted, one line each)
MISSING = "(none)"


def parse_snippet(text: str) -> ast.expr | None:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None


def show_node(node: ast.AST | None) -> str:
    return MISSING if node is None else shown(ast.unparse(node))


def _callee(node: ast.Call) -> str:
    return ast.unparse(node.func)


def expr_changes(side: str, old: ast.expr, new: ast.expr, where: str = "") -> list[Change]:
    """Where two expressions differ: the callee, a keyword or positional argument of the call
    that holds it, an element of a tuple or dict, down to the smallest part that differs.
    `side` is "import" or "export"; `where` the place inside it (`rt.qkv_import(groups)`)."""
    if ast.dump(old) == ast.dump(new):
        return []
    label = f"{side} {where}" if where else side
    if isinstance(old, ast.Call) and isinstance(new, ast.Call):
        out: list[Change] = []
        name = shown(_callee(new))
        for i in range(max(len(old.args), len(new.args))):
            a = old.args[i] if i < len(old.args) else None
            b = new.args[i] if i < len(new.args) else None
            inner = f"{name}(argument {i + 1})"
            if a is None or b is None:
                out.append((f"{side} {inner}", show_node(a), show_node(b)))
            else:
                out.extend(expr_changes(side, a, b, inner))
        old_kw = {k.arg or "**": k.value for k in old.keywords}
        new_kw = {k.arg or "**": k.value for k in new.keywords}
        for key in dict.fromkeys([*old_kw, *new_kw]):
            inner = f"{name}({key})"
            a_kw, b_kw = old_kw.get(key), new_kw.get(key)
            if a_kw is None or b_kw is None:
                out.append((f"{side} {inner}", show_node(a_kw), show_node(b_kw)))
            else:
                out.extend(expr_changes(side, a_kw, b_kw, inner))
        if _callee(old) != _callee(new):
            if len(out) > 2:  # another call altogether: the whole of it
                return [(label, show_node(old), show_node(new))]
            out.insert(0, (f"{label} transform", shown(_callee(old)), shown(_callee(new))))
        return out
    if isinstance(old, (ast.Tuple, ast.List)) and type(old) is type(new):
        assert isinstance(new, (ast.Tuple, ast.List))
        if len(old.elts) == len(new.elts):
            return [
                c for i, (a, b) in enumerate(zip(old.elts, new.elts)) for c in expr_changes(side, a, b, f"{where}[{i}]")
            ]
    if isinstance(old, ast.Dict) and isinstance(new, ast.Dict) and len(old.keys) == len(new.keys):
        out = []
        for i, (ka, va, kb, vb) in enumerate(zip(old.keys, old.values, new.keys, new.values)):
            if ka is None or kb is None:
                return [(label, show_node(old), show_node(new))]
            out.extend(expr_changes(side, ka, kb, f"{where} key {i + 1}".strip()))
            out.extend(expr_changes(side, va, vb, f"{where} value {i + 1}".strip()))
        return out
    if isinstance(old, ast.Subscript) and isinstance(new, ast.Subscript):
        return expr_changes(side, old.value, new.value, where) + expr_changes(side, old.slice, new.slice, f"{where}[ ]")
    return [(label, show_node(old), show_node(new))]


def _named(node: ast.expr) -> ast.expr:
    """`dict(zip(("n1", "n2"), values))`, how format 1 wrote the export of several HF tensors,
    as format 2's `rt.named(values, "n1", "n2")`, which means the same."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"):
        return node
    if len(node.args) != 1 or node.keywords:
        return node
    inner = node.args[0]
    if not (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "zip"):
        return node
    if len(inner.args) != 2 or inner.keywords or not isinstance(inner.args[0], ast.Tuple):
        return node
    named = ast.Attribute(ast.Name("rt", ast.Load()), "named", ast.Load())
    return ast.Call(named, [inner.args[1], *inner.args[0].elts], [])


class _Compared:
    """Changes between two abstracted snippets, worked out once per distinct pair of texts (the
    functions of one rule are a handful of texts once their numbers are abstracted)."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str, str], list[Change]] = {}

    def __call__(self, label: str, old: str, new: str) -> list[Change]:
        """None if the two differ only in layout."""
        key = (label, old, new)
        if key not in self.pairs:
            a, b = parse_snippet(old), parse_snippet(new)
            if label == "export" and a is not None and b is not None:
                a, b = _named(a), _named(b)
            if a is None or b is None:
                changes = [] if one_line(old) == one_line(new) else [(label, shown(one_line(old)), shown(one_line(new)))]
            else:
                changes = expr_changes(label, a, b)
            self.pairs[key] = changes
        return self.pairs[key]


# --- parameters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    """One build's text for one parameter: its PARAMS row and its two functions."""

    row: str
    import_fn: str
    export_fn: str


def _side(module: Module, row: str, used: set[str]) -> _Side:
    """The parameter's row and functions; their names go into `used`."""
    found = _FUNCTION_FIELDS.search(row)
    import_name, export_name = found.groups() if found else ("", "")
    used.add(import_name)
    used.add(export_name)
    return _Side(row, module.functions.get(import_name, ""), module.functions.get(export_name, ""))


def _function_parts(text: str) -> tuple[str, str]:
    """A generated function's docstring and returned expression."""
    doc = _DOC.search(text)
    body = text.find("\n    return ")
    return (doc.group(1) if doc else "", text[body + len("\n    return ") :] if body >= 0 else text)


def _row_rule(row: str, module: Module) -> str:
    """A PARAMS row's rule (its index resolved to the rule's id), "?" if it has none."""
    found = _ROW_RULE.match(row)
    if found is not None:
        index: object = int(found.group(1))
    else:
        fields = _plan_fields(row, [])
        index = fields[7] if fields is not None else None
    return module.rule_id(index) if isinstance(index, int) else "?"


@dataclass(frozen=True)
class _Kind:
    """A parameter's kind and rule. Modules say both in the import function's docstring
    (`auto -> row: rule 6.`; format 1: `auto -> row: <rule id>.`); a package's functions have no
    docstring, and its kind is the rule's, as RULES gives it (`described` False)."""

    kind: str
    rule: str
    described: bool


def _kind_and_rule(doc: str, row: str, module: Module) -> _Kind:
    if not doc:
        rule = _row_rule(row, module)
        return _Kind(module.rule_kind(rule), rule, False)
    kind, sep, rule = doc.partition(": ")
    if not sep or not rule.endswith("."):
        return _Kind(doc, "?", True)
    rule = rule[:-1]
    index = _DOC_RULE.fullmatch(rule)
    return _Kind(kind, module.rule_id(int(index.group(1))) if index else rule, True)


def _plan_fields(row: str, rule_ids: list[str]) -> list[object] | None:
    """A ParamPlan row's compared fields (its rule index resolved to the rule's id). The HF
    names are the field before the two functions: a row written before PARAMS had the rule
    index has one field fewer, and its rule is (none)."""
    node = parse_snippet(row)
    if not isinstance(node, ast.Call) or node.keywords or len(node.args) not in (len(PLAN_FIELDS) + 1, len(PLAN_FIELDS) + 2):
        return None
    args: list[ast.expr | None] = [*node.args[:7], node.args[7] if len(node.args) == len(PLAN_FIELDS) + 2 else None, node.args[-3]]
    try:
        values: list[object] = [None if arg is None else ast.literal_eval(arg) for arg in args]
    except ValueError:
        return None
    rule = values[7]
    if isinstance(rule, int) and 0 <= rule < len(rule_ids):
        values[7] = rule_ids[rule]
    return values


def _shown_value(value: object) -> str:
    return shown(abstract(repr(value))[0])


@dataclass
class Group:
    """Parameters of one rule that changed the same way."""

    rule: str
    changes: tuple[Change, ...]
    count: int = 0
    layers: set[int] = field(default_factory=set)
    experts: set[int] = field(default_factory=set)
    example: list[tuple[str, str, str]] = field(default_factory=list)  # (part, before, after), raw
    example_name: str = ""


@dataclass
class Counted:
    """Parameters (or HF tensors) added or removed, under one rule and abstracted name."""

    count: int = 0
    layers: set[int] = field(default_factory=set)
    experts: set[int] = field(default_factory=set)
    kind: str = ""


class ParamDiff:
    def __init__(self, old: Module, new: Module) -> None:
        self.old, self.new = old, new
        self.old_rules, self.new_rules = old.rule_ids, new.rule_ids
        self.compared = _Compared()
        self.groups: dict[tuple[str, tuple[Change, ...]], Group] = {}
        self.added: dict[tuple[str, str], Counted] = {}
        self.removed: dict[tuple[str, str], Counted] = {}
        self.layout_only = 0
        self.changed = 0
        self.used: set[str] = set()

    def run(self) -> None:
        old_params, new_params = self.old.params, self.new.params
        for name, new_row in new_params.items():
            old_row = old_params.get(name)
            new = _side(self.new, new_row, self.used)
            if old_row is None:
                self._count(self.added, name, new, self.new)
                continue
            old = _side(self.old, old_row, self.used)
            if old != new:
                self._compare(name, old, new)
        for name, old_row in old_params.items():
            if name not in new_params:
                self._count(self.removed, name, _side(self.old, old_row, self.used), self.old)

    def _count(self, table: dict[tuple[str, str], Counted], name: str, side: _Side, module: Module) -> None:
        found = _kind_and_rule(_function_parts(side.import_fn)[0], side.row, module)
        pattern, layers, experts = abstract(name)
        counted = table.setdefault((found.rule, pattern), Counted(kind=found.kind))
        counted.count += 1
        counted.layers.update(layers)
        counted.experts.update(experts)

    def _compare(self, name: str, old: _Side, new: _Side) -> None:
        changes: list[Change] = []
        example: list[tuple[str, str, str]] = []
        old_doc, old_import = _function_parts(old.import_fn)
        new_doc, new_import = _function_parts(new.import_fn)
        old_export = _function_parts(old.export_fn)[1]
        new_export = _function_parts(new.export_fn)[1]
        a_kind = _kind_and_rule(old_doc, old.row, self.old)
        b_kind = _kind_and_rule(new_doc, new.row, self.new)
        if a_kind.rule != b_kind.rule:
            changes.append(("rule", a_kind.rule, b_kind.rule))
        if a_kind.described and b_kind.described and a_kind.kind != b_kind.kind:
            changes.append(("kind", repr(a_kind.kind), repr(b_kind.kind)))
        if changes and a_kind.described and b_kind.described:
            example.append(("doc", old_doc, new_doc))
        if old.row != new.row:
            a, b = _plan_fields(old.row, self.old_rules), _plan_fields(new.row, self.new_rules)
            if a is None or b is None:
                plan = self.compared("PARAMS row", abstract(old.row)[0], abstract(new.row)[0])
            else:
                plan = [
                    (what, _shown_value(x), _shown_value(y))
                    for what, x, y in zip(PLAN_FIELDS, a, b)
                    if x != y and what != "rule"  # the rule: said above
                ]
            if plan or (changes and not example):
                changes.extend(plan)
                example.append(("row", old.row, new.row))
        for label, a_text, b_text in (("import", old_import, new_import), ("export", old_export, new_export)):
            if a_text == b_text:
                continue
            a_abs, a_layers, a_experts = abstract(a_text)
            b_abs, b_layers, b_experts = abstract(b_text)
            found = self.compared(label, a_abs, b_abs)
            if not found and (a_layers, a_experts) != (b_layers, b_experts):
                found = [(f"{label} layer/expert numbers", repr(a_layers + a_experts), repr(b_layers + b_experts))]
            if found:
                changes.extend(found)
                example.append((label, a_text, b_text))
        if not changes:
            self.layout_only += 1
            return
        self.changed += 1
        rule = b_kind.rule if b_kind.rule != "?" else a_kind.rule
        group = self.groups.setdefault((rule, tuple(changes)), Group(rule, tuple(changes)))
        group.count += 1
        _, layers, experts = abstract(name)
        group.layers.update(layers)
        group.experts.update(experts)
        if not group.example:
            group.example = example
            group.example_name = name

def example_line(part: str, text: str, abstracted: bool) -> str:
    """One part of a group's example parameter (docstring, PARAMS row, import or export
    expression) on one line; abstracted when it stands for more than one parameter."""
    if part == "row":
        return _plan_shown(text, abstracted)
    text = abstract(text)[0] if abstracted else text
    if part == "doc":
        return f'"""{shown(text)}"""'
    node = parse_snippet(text)
    return shown(one_line(text) if node is None else ast.unparse(node))


def _plan_shown(row: str, abstracted: bool = True) -> str:
    """A PARAMS row on one line without its two function names; abstracted, its layer and
    expert fields too, unless told not to."""
    found = _FUNCTION_FIELDS.search(row)
    text = row[: found.start()] + ")" if found else row
    node = parse_snippet(text)
    if node is None or not abstracted:
        return one_line(text) if node is None else ast.unparse(node)
    if isinstance(node, ast.Call) and len(node.args) > 6:
        for index, placeholder in ((5, LAYER), (6, EXPERT)):
            value = node.args[index]
            if isinstance(value, ast.Constant) and isinstance(value.value, int):
                node.args[index] = ast.Name(placeholder)
    return shown(abstract(ast.unparse(node))[0])
