"""IR -> Python source, through the Jinja2 template. Names and expressions are computed here
(each kind emits its own, `mapgen.compiler.kinds`); the template only loops.

The output depends on what the module does, never on how the spec is laid out: functions and
tables follow megatron-core's parameter order, docstrings cite rules by their stable id, and the
rules table lists rules in the order their first parameter appears. A comment or a reordering in
the spec changes only the header's hash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import jinja2

from mapgen.compiler.inventory import HFTensor
from mapgen.compiler.ir import Mapping, Rule, Target
from mapgen.compiler.model_classes import MODELS
from mapgen.compiler.packaged import TEMPLATE, template_text


@dataclass(frozen=True)
class FunctionPair:
    import_name: str
    export_name: str
    doc: str
    import_expr: str
    export_expr: str


def function_suffix(megatron_name: str, within: str = "") -> str:
    """The functions' name after `import_` / `export_`: the Megatron name, less the prefix every
    parameter of its file shares (`within`: `decoder.layers.7.` in layer 7's part)."""
    return megatron_name.removeprefix(within).replace(".", "_")


def function_doc(m: Mapping, rule_index: int | None) -> str:
    """`<kind as decided>: rule <index into RULES>.`, a one-file module's import docstring."""
    return f"{m.kind.describe(m)}." if rule_index is None else f"{m.kind.describe(m)}: rule {rule_index}."


def functions_of(m: Mapping, rule_index: int | None = None, within: str = "") -> FunctionPair:
    suffix = function_suffix(m.megatron_name, within)
    group = "ctx.etp" if m.expert is not None else "ctx.tp"
    return FunctionPair(
        import_name=f"import_{suffix}",
        export_name=f"export_{suffix}",
        doc=function_doc(m, rule_index),
        import_expr=m.kind.import_expr(m, group),
        export_expr=m.kind.export_expr(m),
    )


def rules_in_use(target: Target) -> list[Rule]:
    """The rules that produced the module's parameters, in the order their first one appears."""
    return list(dict.fromkeys(m.rule for m in target.mappings))


def _rule_literal(rule: Rule, example: Mapping, rule_mappings: list[Mapping] | None = None) -> str:
    """The rule's RulePlan literal; `linear_weight=True` when every parameter it produced
    (`rule_mappings`, default the example alone) is the weight of a linear layer."""
    roles = tuple(s.role for s in example.hf)
    stacked = roles != tuple(role for role, _ in rule.hf)  # read through the rule's fused_hf
    patterns = (str(rule.fused_hf),) * len(roles) if stacked else tuple(str(p) for _, p in rule.hf)
    fields = [repr(rule.id), repr(rule.kind.name), repr(str(rule.megatron)), repr(patterns), repr(roles)]
    if rule.permute_dims is not None:
        fields.append(f"permute_dims={rule.permute_dims!r}")
    if example.qkv is not None:
        g = example.qkv
        value_dim = "" if g.value_dim is None else f", value_dim={g.value_dim}"
        fields.append(f"qkv=QKVGeometry({g.heads}, {g.groups}, {g.head_dim}, {g.gate}{value_dim})")
    if all(is_linear_weight(m) for m in rule_mappings or [example]):
        fields.append("linear_weight=True")
    if rule.interleaved:
        fields.append("interleaved=True")
    return f"RulePlan({', '.join(fields)})"


_LINEAR_WEIGHT = re.compile(r"weight\d*")


def is_linear_weight(m: Mapping) -> bool:
    """The parameter is the weight of a linear layer (megatron-core's or TransformerEngine's
    column, row, grouped or plain linear; `weight<E>` of a grouped one), not the output layer's:
    the tensors an FP8 block-quantized checkpoint such as DeepSeek-V3's stores in e4m3 (not
    embeddings, norms, the router or lm_head)."""
    return (
        m.module_kind.endswith("Linear")
        and not m.megatron_name.removeprefix("language_model.").startswith("output_layer.")
        and _LINEAR_WEIGHT.fullmatch(m.megatron_name.rsplit(".", 1)[-1]) is not None
        and all(len(s.shape) == 2 for s in m.hf)
    )


def literal(value: object) -> str:
    """`repr`, with strings in double quotes as black writes them (the tables are not run
    through black)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def _plan_literal(m: Mapping, rule_index: int, functions: FunctionPair) -> str:
    """A one-file module's PARAMS row: a ParamPlan."""
    hf = tuple(s.label for s in m.hf)
    fields = (m.megatron_name, m.shape, m.dtype, m.split_dim, m.expert is not None, m.layer, m.expert, rule_index, hf)
    return f"ParamPlan({', '.join(map(literal, fields))}, {functions.import_name}, {functions.export_name})"


def _row_literal(m: Mapping, rule_index: int, functions: FunctionPair, part: Part, dtype: str) -> str:
    """A part's PARAMS row: a ParamRow (`P`), as `mapgen.runtime.plan.ParamRow` says."""
    own_hf = {t.name: i for i, (_, t) in enumerate(part.hf)}
    hf = tuple(own_hf.get(s.label, s.label) for s in m.hf)
    fields = [m.megatron_name.removeprefix(part.within), m.shape, m.split_dim, m.expert, rule_index, hf]
    extra = "" if m.dtype == dtype else f", {literal(m.dtype)}"
    return f"P({', '.join(map(literal, fields))}, {functions.import_name}, {functions.export_name}{extra})"


def _hf_literal(t: HFTensor) -> str:
    fields = [literal(t.name), literal(t.shape)]
    if t.float32:
        fields.append(literal(t.float32))
    return f"HFTensorPlan({', '.join(fields)})"


def _hf_row_literal(t: HFTensor, at: int, prefix: str) -> str:
    fields = [literal(t.name.removeprefix(prefix)), literal(t.shape), str(at)]
    if t.float32:
        fields.append(literal(t.float32))
    return f"H({', '.join(fields)})"


def _common_prefix(names: list[str]) -> str:
    """The longest prefix of every name that ends in a dot ("" for none)."""
    if not names:
        return ""
    first, last = min(names), max(names)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[: first.rfind(".", 0, size) + 1]


# the most experts of one layer a part holds: a layer with more is cut into ranges of this many,
# so that a rank of an expert-parallel layout imports about its own experts
EXPERTS_PER_PART = 32
_RUNTIME_NAMES = {
    "module": ("Ctx", "ExportFn", "HFOut", "HFTensorPlan", "ImportFn", "Loader", "ModelDims", "Out", "ParamPlan",
               "Parts", "QKVGeometry", "RulePlan"),
    "init": ("ModelDims", "PartPlan", "QKVGeometry", "RulePlan"),
    "part": ("Ctx", "HFOut", "HFRow as H", "Loader", "Out", "ParamRow as P", "Parts"),
}


@dataclass
class Part:
    """One file of a target package, while it is rendered."""

    module: str
    layer: int | None
    experts: tuple[int, int] | None
    within: str  # the prefix its parameters' names share, left out of its function names
    mappings: list[Mapping]
    hf: list[tuple[int, HFTensor]]  # (place in HF order, tensor)

    def literal(self) -> str:
        return f"PartPlan({self.module!r}, {self.layer!r}, {self.experts!r}, {len(self.mappings)}, {len(self.hf)})"

    def describe(self) -> str:
        where = f"decoder layer {self.layer}" if self.layer is not None else f"the {self.module.replace('_', ' ')}"
        if self.experts is not None:
            where += f", experts {self.experts[0]}-{self.experts[1] - 1}"
        return where


_LAYER_PREFIX = re.compile(r"^((?:language_model\.)?decoder\.layers\.\d+\.)")


def _part_key(m: Mapping, cut_experts: bool, size: int) -> tuple[str, int | None, tuple[int, int] | None]:
    if m.layer is not None:
        name = f"layer_{m.layer:03d}"
    else:
        top = m.megatron_name.removeprefix("language_model.").split(".", 1)[0]
        name = {"decoder": "output", "output_layer": "output"}.get(top, top)
    if m.expert is None or not cut_experts:
        return name, m.layer, None
    first = m.expert - m.expert % size
    return f"{name}_experts_{first:03d}", m.layer, (first, first + size)


def parts_of(target: Target, experts_per_part: int = EXPERTS_PER_PART) -> list[Part]:
    """The package's files, in the order of their first parameter; each HF tensor goes with the
    first parameter that reads it (a tensor read by none, an HF copy, with its original)."""
    experts = target.dims.num_moe_experts or 0
    cut = experts > experts_per_part
    parts: dict[str, Part] = {}
    readers: dict[str, dict[str, Part]] = {}  # HF tensor -> the parts that read it, in order
    for m in target.mappings:
        name, layer, span = _part_key(m, cut, experts_per_part)
        part = parts.get(name)
        if part is None:
            if span is not None:
                span = (span[0], min(span[1], experts))
            within = ""
            if layer is not None and (match := _LAYER_PREFIX.match(m.megatron_name)) is not None:
                within = match.group(1) + ("mlp.experts." if span is not None else "")
            part = parts[name] = Part(name, layer, span, within, [], [])
        if part.within and not m.megatron_name.startswith(part.within):
            part.within = ""  # never reached by megatron-core's names; kept exact all the same
        part.mappings.append(m)
        for source in m.hf:
            readers.setdefault(source.name, {})[name] = part
    owner: dict[str, Part] = {}
    for tensor_name, found in readers.items():
        # a stacked-experts tensor read by several expert ranges goes with its layer's own part
        first = next(iter(found.values()))
        base = parts.get(first.module.split("_experts_")[0]) if len(found) > 1 else None
        owner[tensor_name] = base or first
    copies = dict(target.hf_copies)
    ordered = list(parts.values())
    for at, tensor in enumerate(target.hf_tensors):
        part = owner.get(tensor.name) or owner.get(copies.get(tensor.name, ""), ordered[-1])
        part.hf.append((at, tensor))
    return ordered


def _environment() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(template_text),  # package data, or the checkout's templates/
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return environment.get_template(TEMPLATE)


def _model_words(target: Target) -> str:
    title = MODELS[target.model].title
    return f"{title} " if title else ""


def _shared(target: Target, rules: list[Rule], example: dict[Rule, Mapping], by_rule: dict[Rule, list[Mapping]]) -> dict[str, object]:
    """What the one-file module and a package's `__init__` both say of the target."""
    return dict(
        target_name=repr(target.name),
        layout=repr(target.layout),
        model=repr(target.model),
        hybrid_layer_pattern=repr(pattern) if (pattern := MODELS[target.model].layer_pattern(target.dims)) is not None else "",
        hf_architecture=repr(target.hf_architecture),
        spec_path=repr(target.spec.path),
        config_path=repr(target.config.path),
        dims=[(name, repr(value)) for name, value in target.dims.as_literal_items()],
        rules=[_rule_literal(rule, example[rule], by_rule[rule]) for rule in rules],
        ignored_hf=[(repr(prefix), repr(why)) for prefix, why in sorted(target.ignored_hf)],
        hf_copies=[(repr(copy), repr(original)) for copy, original in target.hf_copies],
        hf_namings=[(repr(ours), repr(theirs)) for ours, theirs in target.hf_namings],
        tied=(
            [
                tuple(repr(MODELS[target.model].language_prefix + n) for n in ("output_layer.weight", "embedding.word_embeddings.weight"))
            ]
            if target.dims.share_embeddings_and_output_weights
            else []
        )
        + (
            # the MTP block's stage holds a copy of the embedding (megatron-core ties it to the
            # first stage's); at one stage it is the embedding itself
            [(repr("embedding.word_embeddings.weight"), repr("embedding.word_embeddings.weight"))]
            if target.dims.mtp_num_layers
            else []
        ),
    )


def _rule_tables(target: Target) -> tuple[list[Rule], dict[Rule, int], dict[Rule, Mapping], dict[Rule, list[Mapping]]]:
    rules = rules_in_use(target)
    index = {rule: i for i, rule in enumerate(rules)}
    example: dict[Rule, Mapping] = {}
    by_rule: dict[Rule, list[Mapping]] = {}
    for m in target.mappings:
        example.setdefault(m.rule, m)
        by_rule.setdefault(m.rule, []).append(m)
    return rules, index, example, by_rule


def _functions_and_rows(mappings: list[Mapping], index: dict[Rule, int]) -> tuple[list[FunctionPair], list[str]]:
    functions = [functions_of(m, index[m.rule]) for m in mappings]
    return functions, [_plan_literal(m, index[m.rule], f) for m, f in zip(mappings, functions)]


def render(target: Target, header: list[str]) -> str:
    """The target as one module (`mapgen build ... -o OUT.py`)."""
    rules, index, example, by_rule = _rule_tables(target)
    functions, plans = _functions_and_rows(list(target.mappings), index)
    return _environment().render(
        form="module",
        header=header,
        docstring=(
            f"Weight mapping between HF {target.hf_architecture} and Megatron-Core {_model_words(target)}"
            f"({target.layout} layout) for {target.name}: {len(target.mappings)} Megatron "
            f"parameters, {len(target.hf_tensors)} HF tensors."
        ),
        runtime_names=_RUNTIME_NAMES["module"],
        functions=functions,
        plans=plans,
        hf_tensors=[_hf_literal(t) for t in target.hf_tensors],
        **_shared(target, rules, example, by_rule),
    )


def render_package(target: Target, header: list[str], experts_per_part: int = EXPERTS_PER_PART) -> dict[str, str]:
    """The target as a package: file name (`__init__.py`, `layer_007.py`, ...) -> source."""
    rules, index, example, by_rule = _rule_tables(target)
    parts = parts_of(target, experts_per_part)
    template = _environment()
    files = {
        "__init__.py": template.render(
            form="init",
            header=header,
            docstring=(
                f"Weight mapping between HF {target.hf_architecture} and Megatron-Core {_model_words(target)}"
                f"({target.layout} layout) for {target.name}: {len(target.mappings)} Megatron parameters, "
                f"{len(target.hf_tensors)} HF tensors, in {len(parts)} parts (PARTS)."
            ),
            runtime_names=_RUNTIME_NAMES["init"],
            functions=[],
            parts=[p.literal() for p in parts],
            **_shared(target, rules, example, by_rule),
        )
    }
    part_header = [
        f"@generated by mapgen: a part of target {target.name} (see __init__.py). DO NOT EDIT: change the spec "
        "or the config and rebuild."
    ]
    for part in parts:
        functions = [functions_of(m, index[m.rule], part.within) for m in part.mappings]
        dtype = target.dims.params_dtype
        plans = [_row_literal(m, index[m.rule], f, part, dtype) for m, f in zip(part.mappings, functions)]
        hf_prefix = _common_prefix([t.name for _, t in part.hf])
        files[f"{part.module}.py"] = template.render(
            form="part",
            header=part_header,
            docstring=(
                f"{target.name}: {part.describe()} ({len(part.mappings)} Megatron parameters, {len(part.hf)} HF tensors)."
            ),
            runtime_names=_RUNTIME_NAMES["part"],
            functions=functions,
            plans=plans,
            hf_tensors=[_hf_row_literal(t, at, hf_prefix) for at, t in part.hf],
            prefix=literal(part.within),
            hf_prefix=literal(hf_prefix),
        )
    return files
