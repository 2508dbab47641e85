"""IR -> Python source, through the Jinja2 template. Names and expressions are computed here
(each kind emits its own, `mapgen.compiler.kinds`); the template only loops.

The output depends on what the module does, never on how the spec is laid out: functions and
tables follow megatron-core's parameter order, docstrings cite rules by their stable id, and the
rules table lists rules in the order their first parameter appears. A comment or a reordering in
the spec changes only the header's hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2

from mapgen.compiler.ir import Mapping, Target
from mapgen.compiler.megatron_model import hybrid_layer_pattern
from mapgen.compiler.packaged import TEMPLATE, template_text
from mapgen.compiler.spec import Rule


@dataclass(frozen=True)
class FunctionPair:
    import_name: str
    export_name: str
    doc: str
    import_expr: str
    export_expr: str


def function_suffix(megatron_name: str) -> str:
    return megatron_name.replace(".", "_")


def function_doc(m: Mapping) -> str:
    """`<kind as decided>: <rule id>.`, the docstring of both functions of a parameter."""
    return f"{m.kind.describe(m)}: {m.rule.id}."


def functions_of(m: Mapping) -> FunctionPair:
    suffix = function_suffix(m.megatron_name)
    group = "ctx.etp" if m.expert is not None else "ctx.tp"
    return FunctionPair(
        import_name=f"import_{suffix}",
        export_name=f"export_{suffix}",
        doc=function_doc(m),
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


LANGUAGE_MODEL = {"llava": "language_model."}  # where a model class keeps its GPTModel's names


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


def _plan_literal(m: Mapping, rule_index: int, functions: FunctionPair) -> str:
    hf_names = tuple(s.label for s in m.hf)
    fields = (
        m.megatron_name, m.shape, m.dtype, m.split_dim, m.expert is not None, m.layer, m.expert, rule_index, hf_names
    )
    return f"ParamPlan({', '.join(map(repr, fields))}, {functions.import_name}, {functions.export_name})"


def render(target: Target, header: list[str]) -> str:
    rules = rules_in_use(target)
    index = {rule: i for i, rule in enumerate(rules)}
    example: dict[Rule, Mapping] = {}
    by_rule: dict[Rule, list[Mapping]] = {}
    for m in target.mappings:
        example.setdefault(m.rule, m)
        by_rule.setdefault(m.rule, []).append(m)
    functions = [functions_of(m) for m in target.mappings]
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(template_text),  # package data, or the checkout's templates/
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    template = environment.get_template(TEMPLATE)
    return template.render(
        header=header,
        docstring=(
            f"Weight mapping between HF {target.hf_architecture} and Megatron-Core "
            + ("HybridModel " if target.model == "hybrid" else "LLaVAModel " if target.model == "llava" else "")
            + f"({target.layout} layout) for {target.name}: {len(target.mappings)} Megatron "
            f"parameters, {len(target.hf_tensors)} HF tensors."
        ),
        target_name=repr(target.name),
        layout=repr(target.layout),
        model=repr(target.model),
        hybrid_layer_pattern=repr(hybrid_layer_pattern(target.dims)) if target.model == "hybrid" else "",
        hf_architecture=repr(target.hf_architecture),
        spec_path=repr(target.spec.path),
        config_path=repr(target.config.path),
        dims=[(name, repr(value)) for name, value in target.dims.as_literal_items()],
        rules=[_rule_literal(rule, example[rule], by_rule[rule]) for rule in rules],
        functions=functions,
        plans=[_plan_literal(m, index[m.rule], f) for m, f in zip(target.mappings, functions)],
        hf_tensors=[
            f"HFTensorPlan({t.name!r}, {t.shape!r}" + (f", {t.float32!r})" if t.float32 else ")") for t in target.hf_tensors
        ],
        ignored_hf=[(repr(prefix), repr(why)) for prefix, why in sorted(target.ignored_hf)],
        hf_copies=[(repr(copy), repr(original)) for copy, original in target.hf_copies],
        tied=(
            [
                tuple(repr(LANGUAGE_MODEL.get(target.model, "") + n) for n in ("output_layer.weight", "embedding.word_embeddings.weight"))
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
