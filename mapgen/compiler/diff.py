"""`mapgen diff`: what changed between two builds of a target, grouped by rule.

A one-rule change in a spec can touch tens of thousands of functions (DeepSeek-V3's expert
`linear_fc2` rule: 29,696), so a raw diff of two builds says little. This module summarises
it: per rule, how many parameters changed and how (kind, HF names, shape, dtype, TP split, the
transform and its arguments), with ONE representative before/after whose layer and expert
numbers are abstracted (`decoder.layers.<L>.mlp.experts.linear_fc2.weight<E>`); the parameters
added or removed, counted per rule and abstracted name; and the changes to the module-level
tables (header lines, DIMS fields, RULES entries, HF_TENSORS, IGNORED_HF, TIED, a package's
PARTS).

Forms. A build is a one-file module (format 1, as generated/ held it before packages, or format
2) or a target package; `mapgen.compiler.diffread` reads either into one `Module`, a package's
parts joined into the rows and functions its one-file module would have, so that any two builds
compare alike. Builds of two forms are compared on what the form does not decide (a `form:` line
says the forms; imports, docstrings, FORMAT, PARTS and the tables' comments are left out). A
package's functions carry no docstring, so its parameters' kinds are their rules' (RULES); a
module's docstrings say the kind as decided (`auto -> row`), and are compared where both sides
have them. A file that is not a whole generated module (not one at all, or cut short) is said so,
naming it, and never summarised as a module that lost or gained every parameter.

Cost. A module is tens of megabytes, so it is never parsed whole. Its text is cut into
top-level blocks with one regular expression (a block starts at a line that starts in column 0
and is not a closing bracket), the tables into their rows (a row starts at a line indented by
exactly four spaces), and blocks and rows are compared as text, keyed by function name,
Megatron name, field or rule id. Only those that differ are parsed, and a function's return
expression is parsed once per *abstracted* text (layer and expert numbers replaced): the 29,696
changed functions of the example above are two distinct texts.

The parser is CPython's `ast`, on those small snippets: the comparison needs each snippet's
values and call structure (`ast.literal_eval`, `ast.dump`, `ast.unparse` for a one-line display
that ignores black's line breaks), not its formatting, which is all a concrete syntax tree (libcst)
would add; `ast` is the stdlib parser the compiler's gate already uses (postprocess.py), and
about ten times faster (docs/design.md). Nothing here imports torch, megatron-core or
`mapgen.runtime`: the diff of two text files needs neither.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from mapgen.common.errors import MapgenError
from mapgen.compiler.diffmatch import (
    EXPERT,
    LAYER,
    MISSING,
    Counted,
    Group,
    ParamDiff,
    abstract,
    count_of,
    example_line,
    one_line,
    parse_snippet,
    show_node,
    shown,
    squeeze,
    where_of,
)
from mapgen.compiler.diffread import (
    Module,
    NotModule,
    Table,
    Target,
    Tree,
    git,
    is_package_init,
    load,
    looks_generated,
    package_texts,
    read_target,
    read_text,
    split_module,
    targets,
)

_STRING = re.compile(r"\"([^\"\\]*)\"|'([^'\\]*)'")
_FIELD = re.compile(r"([A-Za-z_]\w*)=(?!=)")
RULE_FIELDS = ("id", "kind", "megatron pattern", "HF patterns", "roles")
TABLES_SHOWN = 8  # rows shown per module-level table before "... and N more"
GROUPS_SHOWN = 12  # groups of changed parameters shown per module
EXAMPLE_WIDTH, EXAMPLE_CONTEXT = 160, 48  # a longer example line is cut to its change and this much
ARROW_CONTEXT = 16  # `what: before -> after` lines longer than 100 keep this much around the change


# --- module-level tables -----------------------------------------------------------------------


def _same_value(old: str, new: str) -> bool:
    """Whether two snippets are the same Python (differ at most in layout)."""
    a, b = parse_snippet(_strip_key(old)), parse_snippet(_strip_key(new))
    return a is not None and b is not None and ast.dump(a) == ast.dump(b)


def _strip_key(row: str) -> str:
    """A row as an expression: `name=value` -> value, `"k": v` -> {"k": v}."""
    keyword = _FIELD.match(row)
    if keyword is not None:
        return row[keyword.end() :]
    if _STRING.match(row) and re.match(r"(\"[^\"]*\"|'[^']*')\s*:", row):
        return "{" + row + "}"
    return row


def _display(row: str) -> str:
    text = _strip_key(row)
    node = parse_snippet(text)
    return shown(one_line(text) if node is None else ast.unparse(node))


def _capped(lines: list[str], what: str, indent: str = "  ") -> list[str]:
    if len(lines) <= TABLES_SHOWN:
        return lines
    return [*lines[: TABLES_SHOWN - 1], f"{indent}... and {len(lines) - TABLES_SHOWN + 1} more {what}"]


def _arrow(what: str, old: str, new: str, indent: str = "  ") -> str:
    old, new = squeeze(old, new, context=ARROW_CONTEXT)
    return f"{indent}{what}: {old} -> {new}"


def _header_lines(old: Module, new: Module) -> list[str]:
    lines = []
    for key in dict.fromkeys([*old.header, *new.header]):
        a, b = old.header.get(key), new.header.get(key)
        if a != b:
            lines.append(_arrow(f"header {key}", shown(one_line(a or MISSING)), shown(one_line(b or MISSING))))
    return lines


def _statement_lines(old: Module, new: Module) -> list[str]:
    lines = []
    for key in dict.fromkeys([*old.statements, *new.statements]):
        a, b = old.statements.get(key), new.statements.get(key)
        if a == b or (a is not None and b is not None and _same_statement(a, b)):
            continue
        lines.append(_arrow(key, _statement_shown(a), _statement_shown(b)))
    return _capped(lines, "statements")


def _statement_body(text: str) -> str:
    """A statement without its leading comments; an assignment's value."""
    code = "\n".join(line for line in text.split("\n") if not line.startswith("#"))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return one_line(code)
    if len(tree.body) == 1 and isinstance(tree.body[0], (ast.Assign, ast.AnnAssign)) and tree.body[0].value:
        return ast.unparse(tree.body[0].value)
    return ast.unparse(tree)


def _same_statement(a: str, b: str) -> bool:
    comments_a = [line for line in a.split("\n") if line.startswith("#")]
    comments_b = [line for line in b.split("\n") if line.startswith("#")]
    return comments_a == comments_b and _statement_body(a) == _statement_body(b)


def _statement_shown(text: str | None) -> str:
    if text is None:
        return MISSING
    body = _statement_body(text)
    comments = [line for line in text.split("\n") if line.startswith("#")]
    return shown(" ".join([*comments, body]) if comments else body)


def _clip(text: str, width: int = EXAMPLE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table_lines(name: str, old: Table | None, new: Table | None) -> list[str]:
    if old is None or new is None:
        table = new or old
        assert table is not None
        return [f"  {name}: {'added' if old is None else 'removed'} ({len(table.rows):,} rows)"]
    a_rows, b_rows = old.rows, new.rows
    lines: list[str] = []
    if one_line(old.head) != one_line(new.head):
        lines.append(_arrow(f"{name} (its head)", shown(one_line(old.head)), shown(one_line(new.head))))
    if name == "HF_TENSORS":
        return lines + _hf_tensor_lines(a_rows, b_rows)
    if name == "RULES":
        lines.extend(_rule_lines(a_rows, b_rows))
        common = [k for k in a_rows if k in b_rows]
        if common != [k for k in b_rows if k in a_rows]:
            lines.append("  RULES: order changed (PARAMS refer to rules by index)")
        return lines
    for key in dict.fromkeys([*a_rows, *b_rows]):
        a, b = a_rows.get(key), b_rows.get(key)
        if a == b or (a is not None and b is not None and _same_value(a, b)):
            continue
        where = f"{name}.{key}" if name == "DIMS" else f"{name} {shown(repr(key))}"
        if a is None:
            lines.append(_clip(f"  {where} added: {_display(b or '')}"))
        elif b is None:
            lines.append(_clip(f"  {where} removed: {_display(a)}"))
        else:
            lines.append(_arrow(where, _display(a), _display(b)))
    return _capped(lines, f"{name} entries")


def _rule_lines(a_rows: dict[str, str], b_rows: dict[str, str]) -> list[str]:
    lines = []
    for key in dict.fromkeys([*b_rows, *a_rows]):
        a, b = a_rows.get(key), b_rows.get(key)
        if a == b:
            continue
        where = f"RULES {shown(repr(key))}"
        if a is None or b is None:
            lines.append(_clip(f"  {where} {'added' if a is None else 'removed'}: {_display(b or a or '')}"))
            continue
        na, nb = parse_snippet(a), parse_snippet(b)
        if not isinstance(na, ast.Call) or not isinstance(nb, ast.Call):
            if not _same_value(a, b):
                lines.append(_arrow(where, _display(a), _display(b)))
            continue
        fields: list[str] = []
        for i in range(max(len(na.args), len(nb.args))):
            what = RULE_FIELDS[i] if i < len(RULE_FIELDS) else f"argument {i + 1}"
            x = na.args[i] if i < len(na.args) else None
            y = nb.args[i] if i < len(nb.args) else None
            if (x is None) != (y is None) or (x is not None and y is not None and ast.dump(x) != ast.dump(y)):
                fields.append(f"{what} {show_node(x)} -> {show_node(y)}")
        kw_a = {k.arg or "**": k.value for k in na.keywords}
        kw_b = {k.arg or "**": k.value for k in nb.keywords}
        for kw in dict.fromkeys([*kw_a, *kw_b]):
            x, y = kw_a.get(kw), kw_b.get(kw)
            if (x is None) != (y is None) or (x is not None and y is not None and ast.dump(x) != ast.dump(y)):
                fields.append(f"{kw}={show_node(x)} -> {kw}={show_node(y)}")
        if fields:
            lines.append(f"  {where}: {'; '.join(fields)}")
    return _capped(lines, "RULES entries")


def _scope(name: str) -> str:
    """An abstracted name cut after its last placeholder: `model.layers.<L>.*`."""
    last = max(name.rfind(LAYER), name.rfind(EXPERT))
    if last < 0:
        return name
    end = last + len(LAYER)
    return name[:end] + (".*" if end < len(name) else "")


def _hf_tensor_lines(a_rows: dict[str, str], b_rows: dict[str, str]) -> list[str]:
    added: dict[str, Counted] = {}
    removed: dict[str, Counted] = {}
    reshaped: dict[tuple[str, str, str], Counted] = {}
    for key in dict.fromkeys([*b_rows, *a_rows]):
        a, b = a_rows.get(key), b_rows.get(key)
        if a == b or (a is not None and b is not None and _same_value(a, b)):
            continue
        pattern, layers, experts = abstract(key)
        if a is None or b is None:
            counted = (added if a is None else removed).setdefault(_scope(pattern), Counted())
        else:
            counted = reshaped.setdefault((pattern, _shape_of(a), _shape_of(b)), Counted())
        counted.count += 1
        counted.layers.update(layers)
        counted.experts.update(experts)
    lines = []
    for sign, table in (("added", added), ("removed", removed)):
        for scope, counted in table.items():
            lines.append(f"  HF_TENSORS {sign}: {counted.count:,} {shown(scope)}{where_of(counted.layers, counted.experts)}")
    for (pattern, shape_a, shape_b), counted in reshaped.items():
        lines.append(
            f"  HF_TENSORS reshaped: {counted.count:,} {shown(pattern)}{where_of(counted.layers, counted.experts)}:"
            f" {shape_a} -> {shape_b}"
        )
    return _capped(lines, "groups of HF tensors")


def _shape_of(row: str) -> str:
    node = parse_snippet(row)
    if isinstance(node, ast.Call) and len(node.args) >= 2:
        return ast.unparse(node.args[1])
    return _display(row)


# --- the summary -------------------------------------------------------------------------------


def summarize(old_text: str, new_text: str, label: str, groups_shown: int = GROUPS_SHOWN) -> list[str]:
    """The summary of two builds of one module (`label` names it); [] if they are equal. The
    texts are taken as modules (see `summarize_file` for texts that may not be)."""
    if old_text == new_text:
        return []
    return summarize_modules(split_module(old_text), split_module(new_text), label, groups_shown)


def summarize_modules(old: Module, new: Module, label: str, groups_shown: int = GROUPS_SHOWN) -> list[str]:
    """The summary of two builds of a target, each a one-file module or a package (`read_package`,
    `diffread.load`); builds of different forms are compared on what the form does not decide."""
    same_form = (old.form, old.format) == (new.form, new.format)
    body = [] if same_form else [f"  form: {old.describe()} -> {new.describe()}"]
    if not same_form:
        old, new = _without_form(old), _without_form(new)
    old, new = _tables_as_statements(old, new), _tables_as_statements(new, old)
    body += _header_lines(old, new) + _statement_lines(old, new)
    for name in dict.fromkeys([*old.tables, *new.tables]):
        if name == "PARTS" and name in old.tables and name in new.tables:
            body.extend(_parts_lines(old.tables[name].rows, new.tables[name].rows))
        elif name != "PARAMS":
            body.extend(_table_lines(name, old.tables.get(name), new.tables.get(name)))
    if old.strays != new.strays:
        strays = [", ".join(m.strays) or MISSING for m in (old, new)]
        body.append(f"  files PARTS does not list: {strays[0]} -> {strays[1]}")
    params = ParamDiff(old, new)
    params.run()
    body.extend(_group_lines(params, groups_shown))
    for sign, table in (("added", params.added), ("removed", params.removed)):
        lines = [
            f"    {counted.count:,} {shown(pattern)}{where_of(counted.layers, counted.experts)}: {counted.kind}"
            for (_, pattern), counted in table.items()
        ]
        if lines:
            total = sum(c.count for c in table.values())
            body.append(f"  {sign}: {count_of(total, 'parameter')}")
            body.extend(_capped(lines, f"kinds of {sign} parameters", "    "))
    if params.layout_only:
        differ = "differs" if params.layout_only == 1 else "differ"
        how = "layout (the same Python)" if same_form else "form (the same fields, rules and expressions)"
        body.append(f"  {count_of(params.layout_only, 'parameter')} {differ} only in {how}")
    other = _other_function_lines(old, new, params.used)
    body.extend(other)
    n_old, n_new = len(old.params), len(new.params)
    added = sum(c.count for c in params.added.values())
    removed = sum(c.count for c in params.removed.values())
    title = f"{label}: {count_of(params.changed, 'parameter')} changed, {added:,} added, {removed:,} removed"
    title += f" ({n_old:,} -> {n_new:,})" if n_old != n_new else f" (of {n_new:,})"
    if not body:
        body = ["  the texts differ only in layout (the same Python)"]
    return [title, *body]


# what only the form decides, left out when builds of two forms are compared: the module's
# docstring (its counts are the title's), imports, FORMAT, a package's PARTS and __getattr__, a
# one-file module's IMPORTS and EXPORTS, and the comments above the tables
_FORM_STATEMENTS = ("docstring", "FORMAT", "IMPORTS", "EXPORTS", "PARTS")


def _without_form(module: Module) -> Module:
    def kept(name: str) -> bool:
        return name not in _FORM_STATEMENTS and not name.startswith(("from ", "import "))

    return Module(
        header=module.header,
        statements={k: _uncommented(v) for k, v in module.statements.items() if kept(k)},
        tables={k: Table(_uncommented(t.head), t.rows) for k, t in module.tables.items() if kept(k)},
        functions={k: v for k, v in module.functions.items() if k != "__getattr__"},
        form=module.form,
        parts=module.parts,
        strays=module.strays,
    )


def _tables_as_statements(module: Module, other: Module) -> Module:
    """`module` with its tables that are one-line statements in `other` (`SOURCES`, as black
    writes it short or long) written back as statements, so that the two compare."""
    names = [name for name in module.tables if name in other.statements and name not in other.tables]
    if not names:
        return module
    statements, tables = dict(module.statements), dict(module.tables)
    for name in names:
        table = tables.pop(name)
        closer = {"(": ")", "[": "]", "{": "}"}[table.head[-1]]
        statements[name] = "\n".join([table.head, *(f"    {row}," for row in table.rows.values()), closer])
    return replace(module, statements=statements, tables=tables)


def _uncommented(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not line.startswith("#"))


def _parts_lines(a_rows: dict[str, str], b_rows: dict[str, str]) -> list[str]:
    """A package's PARTS: the parts added, removed, and changed (their counts), by name, with
    one changed row before and after."""
    changed = [k for k in b_rows if k in a_rows and a_rows[k] != b_rows[k] and not _same_value(a_rows[k], b_rows[k])]
    lines = []
    for sign, names in (
        ("added", [k for k in b_rows if k not in a_rows]), ("removed", [k for k in a_rows if k not in b_rows]),
        ("changed", changed),
    ):
        if names:
            more = f" and {len(names) - 4:,} more" if len(names) > 4 else ""
            lines.append(f"  PARTS {sign}: {count_of(len(names), 'part')}: {', '.join(names[:4])}{more}")
    if changed:
        before, after = squeeze(_display(a_rows[changed[0]]), _display(b_rows[changed[0]]), context=ARROW_CONTEXT)
        lines.append(f"    e.g. {before} -> {after}")
    if [k for k in a_rows if k in b_rows] != [k for k in b_rows if k in a_rows]:
        lines.append("  PARTS: order changed")
    return lines


def _group_lines(params: ParamDiff, groups_shown: int) -> list[str]:
    by_rule: dict[str, list[Group]] = {}
    for group in params.groups.values():
        by_rule.setdefault(group.rule, []).append(group)
    lines: list[str] = []
    shown_groups = 0
    left: list[Group] = []
    for rule, groups in by_rule.items():
        if shown_groups >= groups_shown:
            left.extend(groups)
            continue
        count = sum(g.count for g in groups)
        layers = set().union(*(g.layers for g in groups))
        experts = set().union(*(g.experts for g in groups))
        ways = f", in {len(groups)} ways" if len(groups) > 1 else ""
        lines.append(f"  rule {shown(rule)}: {count_of(count, 'parameter')} changed{where_of(layers, experts)}{ways}")
        for group in groups:
            if shown_groups >= groups_shown:
                left.append(group)
                continue
            shown_groups += 1
            indent = "    "
            if len(groups) > 1:
                lines.append(f"    {group.count:,}{where_of(group.layers, group.experts)}:")
                indent = "      "
            for what, a, b in group.changes:
                lines.append(_arrow(what, a, b, indent))
            abstracted = group.count > 1
            lines.append(f"{indent}e.g. {shown(abstract(group.example_name)[0]) if abstracted else group.example_name}")
            for part, a, b in group.example:
                a, b = example_line(part, a, abstracted), example_line(part, b, abstracted)
                a, b = squeeze(a, b, EXAMPLE_WIDTH, EXAMPLE_CONTEXT)
                prefix = "" if part in ("doc", "row") else f"{part}: "
                lines.append(f"{indent}  - {prefix}{a}")
                lines.append(f"{indent}  + {prefix}{b}")
    if left:
        rules = list(dict.fromkeys(shown(g.rule) for g in left))
        lines.append(
            f"  ... and {len(left)} more ways, {sum(g.count for g in left):,} parameters, in rules "
            + ", ".join(rules[:3]) + (f" and {len(rules) - 3} more" if len(rules) > 3 else "")
        )
    return lines


def _other_function_lines(old: Module, new: Module, used: set[str]) -> list[str]:
    """Functions no PARAMS row names (none in a module mapgen wrote)."""
    changed = added = removed = 0
    for name in dict.fromkeys([*old.functions, *new.functions]):
        if name in used:
            continue
        a, b = old.functions.get(name), new.functions.get(name)
        if a is None:
            added += 1
        elif b is None:
            removed += 1
        elif a != b:
            changed += 1
    if changed + added + removed == 0:
        return []
    return [f"  functions no PARAMS row names: {changed} changed, {added} added, {removed} removed"]


Content = dict[str, str] | str  # a package's files (name -> text), or one file's text


def _form_word(content: Content) -> str:
    return "package" if isinstance(content, dict) else "one-file module"


def _sized(module: Module) -> str:
    parts = f", {count_of(module.parts, 'part')}" if module.form == "package" else ""
    return f"{len(module.params):,} parameters, {len(module.rule_ids)} rules{parts}"


def summarize_builds(
    old: Content | None, new: Content | None, label: str, old_shown: str = "", new_shown: str = ""
) -> list[str]:
    """Two builds of a target, each a one-file module's text or a package's files, either
    missing (added, removed); `old_shown` and `new_shown` name them in messages (default: the
    label, with "(old)" or "(new)"). A file that is not a whole generated module is said so, naming it, never summarised
    as a module that lost or gained every parameter; two such files, as differing."""
    if old is None and new is None or old == new:
        return []
    if old is None or new is None:
        content = new if old is None else old
        assert content is not None
        what = "added" if old is None else "removed"
        if isinstance(content, str) and not looks_generated(content):
            return [f"{label}: {what}"]
        try:
            module = load(content, (new_shown if old is None else old_shown) or label)
        except NotModule as exc:
            return [f"{label}: {what}; {exc}"]
        return [f"{label}: {what} ({_sized(module)})"]
    if not any(isinstance(c, dict) or looks_generated(c) for c in (old, new)):
        return [f"{label}: differs (not a generated module)"]
    modules: list[Module] = []
    problems: list[str] = []
    for content, name in ((old, old_shown or f"{label} (old)"), (new, new_shown or f"{label} (new)")):
        try:
            modules.append(load(content, name))
        except NotModule as exc:
            problems.append(str(exc))
    if problems:
        form = "" if type(old) is type(new) else f"changed form ({_form_word(old)} -> {_form_word(new)}); "
        return [f"{label}: {form}{'; '.join(problems)}"]
    return summarize_modules(modules[0], modules[1], label)


def summarize_file(old_text: str | None, new_text: str | None, label: str) -> list[str]:
    """Two texts of one file, either missing (a file added or removed): `summarize_builds`."""
    return summarize_builds(old_text, new_text, label)


def report(sections: Iterable[list[str]]) -> str:
    """The summaries of every file compared, or "no difference"."""
    lines = [line for section in sections for line in section]
    return "\n".join(lines) + "\n" if lines else "no difference\n"


# --- inputs: two builds, two folders of them, or the working tree against a git revision -------


def _paired(
    old: Tree, new: Tree, old_targets: dict[str, Target], new_targets: dict[str, Target]
) -> Iterator[list[str]]:
    """Each target of either tree against the same target (`targets`' key) of the other: one
    summary each, the targets read one pair at a time."""
    for key in sorted(set(old_targets) | set(new_targets)):
        a, b = old_targets.get(key), new_targets.get(key)
        either = b or a
        assert either is not None
        label = key if any(t is not None and t.package for t in (a, b)) else either.path
        old_shown, old_content = read_target(old, a) if a is not None else ("", None)
        new_shown, new_content = read_target(new, b) if b is not None else ("", None)
        yield summarize_builds(old_content, new_content, label, old_shown, new_shown)


def _is_package(path: Path) -> bool:
    init = path / "__init__.py"
    return init.is_file() and is_package_init(read_text(init))


def diff_paths(old: Path, new: Path) -> Iterator[list[str]]:
    """Two builds of a target (each a one-file module or a package folder, either form against
    either), or two folders of targets, paired by name (`tiny.py` or `tiny/` in each). Two
    builds given are refused (MapgenError) unless each is a whole generated module or package."""
    for path in (old, new):
        if not path.exists():
            raise MapgenError(f"{path}: no such file or folder")
    builds = [p.is_file() or _is_package(p) for p in (old, new)]
    if all(builds):
        contents: list[Content] = []
        for path in (old, new):
            content: Content = package_texts(path) if path.is_dir() else read_text(path)
            if not contents or content != contents[0]:
                load(content, path.as_posix())  # refused unless it is a whole build
            contents.append(content)
        label = new.as_posix() if old.name.removesuffix(".py") == new.name.removesuffix(".py") else f"{old} -> {new}"
        yield summarize_builds(contents[0], contents[1], label, old.as_posix(), new.as_posix())
        return
    if any(builds) or not (old.is_dir() and new.is_dir()):
        raise MapgenError(f"give two modules, two packages or two folders of targets, not {old} and {new}")
    old_tree, new_tree = Tree(old), Tree(new)
    old_names, new_names = old_tree.names(""), new_tree.names("")
    if not old_names and not new_names:
        raise MapgenError(f"{old}, {new}: no .py file there, in either folder")
    yield from _paired(old_tree, new_tree, targets(old_tree, old_names), targets(new_tree, new_names))


def diff_revision(rev: str, paths: list[Path], cwd: Path) -> Iterator[list[str]]:
    """The working tree's targets under `paths` (default: the repository's generated/) against
    the same paths at git revision `rev`. A target is paired by name whatever its form on each
    side: `generated/tiny.py` at REV against the package `generated/tiny/` in the working tree."""
    root = Path(git(["rev-parse", "--show-toplevel"], cwd).decode().strip())
    try:
        git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root)
    except MapgenError:
        raise MapgenError(f"{rev}: not a git revision of {root}") from None
    old_tree, new_tree = Tree(root, rev), Tree(root)
    old_names: set[str] = set()
    new_names: set[str] = set()
    for path in paths or [root / "generated"]:
        absolute = (cwd / path).resolve()
        try:
            relative = absolute.relative_to(root.resolve()).as_posix()
        except ValueError:
            raise MapgenError(f"{path} is not in the git repository {root}") from None
        relative = "" if relative == "." else relative
        # the same target in the other form: `generated/tiny.py` and the package `generated/tiny`
        other = relative.removesuffix(".py") if relative.endswith(".py") else f"{relative}.py" if relative else ""
        found_old = set(old_tree.names(relative)) | (set(old_tree.names(other)) if other else set())
        found_new = set(new_tree.names(relative)) | (set(new_tree.names(other)) if other else set())
        if not found_old and not found_new:
            raise MapgenError(f"{path}: no .py file there, in the working tree or at {rev}")
        old_names |= found_old
        new_names |= found_new
    yield from _paired(old_tree, new_tree, targets(old_tree, old_names), targets(new_tree, new_names))
