"""IR -> Python source, through the Jinja2 template. Names and expressions are computed here;
the template only loops."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from mapgen.compiler.ir import Mapping, Target
from mapgen.compiler.megatron_model import hybrid_layer_pattern
from mapgen.compiler.packaged import TEMPLATE, template_text
from mapgen.common.layout import inverse_permutation, stacked_slice


@dataclass(frozen=True)
class FunctionPair:
    import_name: str
    export_name: str
    doc: str
    import_expr: str
    export_expr: str


def function_suffix(megatron_name: str) -> str:
    return megatron_name.replace(".", "_")


def _load(name: str) -> str:
    """The load of an HF tensor; `X[i]` is slice i of a stacked-experts tensor X (a view)."""
    base, index = stacked_slice(name)
    return f"load({name!r})" if index is None else f"load({base!r})[{index}]"


def _qkv_args(m: Mapping, with_heads: bool = True) -> str:
    assert m.qkv is not None
    g = m.qkv
    args = [f"groups={g.groups}", f"head_dim={g.head_dim}"]
    if with_heads:
        args.insert(0, f"heads={g.heads}")
    if g.gate:
        args.append("gate=True")
    return ", ".join(args)


def _simple_import(m: Mapping, group: str) -> str:
    ((_, source),) = m.hf
    value = _load(source.name)
    if m.kind == "reshape":
        return f"rt.reshape_import({group}, {value}, {m.shape!r}, {m.split_dim!r}, out=out)"
    if m.kind == "zero_centered_rmsnorm":
        return f"rt.zero_centered_from_hf({value}, out=out)"
    if m.permute_dims is not None:
        value = f"{value}.permute({m.permute_dims!r})"
    if m.split == "column":
        return f"rt.column_import({group}, {value}, out=out)"
    if m.split == "row":
        return f"rt.row_import({group}, {value}, out=out)"
    return f"rt.whole_import({value}, out=out)"


def _simple_export(m: Mapping) -> str:
    ((_, source),) = m.hf
    value = {
        "column": "rt.column_export(parts)",
        "row": "rt.row_export(parts)",
    }.get(m.split, "parts[0]")
    if m.kind == "reshape":
        value = f"{value}.reshape({source.shape!r})"
    elif m.kind == "zero_centered_rmsnorm":
        value = f"rt.zero_centered_to_hf({value})"
    elif m.permute_dims is not None:
        value = f"rt.permute({value}, {inverse_permutation(m.permute_dims)!r})"
    return f"{{{source.name!r}: {value}}}"


def _bodies(m: Mapping) -> tuple[str, str]:
    """The import and export expressions: one runtime call each, every argument a literal."""
    group = "ctx.etp" if m.expert is not None else "ctx.tp"
    names = tuple(t.name for _, t in m.hf)
    loads = ", ".join(_load(name) for name in names)
    if m.kind == "gated_mlp" and m.hf[0][0] == "gate_up":
        return (
            f"rt.gated_mlp_import({group}, *rt.halves({loads}), out=out)",
            f"{{{names[0]!r}: rt.stacked_gated_mlp_export(parts)}}",
        )
    if m.kind in ("qkv", "kv", "gated_mlp"):
        args = "" if m.kind == "gated_mlp" else f", {_qkv_args(m, with_heads=m.kind == 'qkv')}"
        return (
            f"rt.{m.kind}_import({group}, {loads}{args}, out=out)",
            f"dict(zip({names!r}, rt.{m.kind}_export(parts{args})))",
        )
    if m.kind in ("concat_qkv", "vision_qkv"):
        return (
            f"rt.concat_qkv_import({group}, {loads}, {_qkv_args(m)}, out=out)",
            f"{{{names[0]!r}: rt.concat_qkv_export(parts, {_qkv_args(m)})}}",
        )
    return _simple_import(m, group), _simple_export(m)


def _doc(m: Mapping) -> str:
    decided = f"{m.kind} -> {m.split}" if m.kind == "auto" else m.kind
    return f"{decided}: {m.rule_loc.path}:{m.rule_loc.line}."


def _plan_literal(m: Mapping, functions: FunctionPair) -> str:
    hf_names = tuple(t.name for _, t in m.hf)
    fields = (
        m.megatron_name, m.shape, m.dtype, m.split_dim, m.expert is not None, m.layer, m.expert, hf_names
    )
    return f"ParamPlan({', '.join(map(repr, fields))}, {functions.import_name}, {functions.export_name})"


def render(target: Target, header: list[str]) -> str:
    functions = []
    for m in target.mappings:
        import_expr, export_expr = _bodies(m)
        suffix = function_suffix(m.megatron_name)
        functions.append(
            FunctionPair(
                import_name=f"import_{suffix}",
                export_name=f"export_{suffix}",
                doc=_doc(m),
                import_expr=import_expr,
                export_expr=export_expr,
            )
        )
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
            + ("HybridModel " if target.model == "hybrid" else "")
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
        functions=functions,
        plans=[_plan_literal(m, f) for m, f in zip(target.mappings, functions)],
        hf_tensors=[f"HFTensorPlan({t.name!r}, {t.shape!r})" for t in target.hf_tensors],
        ignored_hf=[(repr(prefix), repr(why)) for prefix, why in target.ignored_hf],
        tied=[
            (repr("output_layer.weight"), repr("embedding.word_embeddings.weight"))
        ]
        if target.dims.share_embeddings_and_output_weights
        else [],
    )
