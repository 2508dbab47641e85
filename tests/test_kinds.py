"""Golden unit tests of the compiler's middle: every kind's emitted runtime calls, expansion of
rules over hand-written inventories (no megatron-core, no transformers, no generated/), and the
rules table the renderer writes. Each kind is one object (mapgen.compiler.kinds)."""

from __future__ import annotations

import json

import pytest

from mapgen.common.errors import SpecError
from mapgen.compiler.config import translate
from mapgen.compiler.hfconfig import read_hf_config
from mapgen.compiler.expand import expand
from mapgen.compiler.inventory import HFTensor, MegatronParam
from mapgen.compiler.ir import Mapping
from mapgen.compiler.kinds import KINDS
from mapgen.compiler.render import _rule_literal, functions_of, rules_in_use
from mapgen.compiler.spec import parse_spec

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 2,
    "intermediate_size": 6,
    "vocab_size": 16,
    "num_hidden_layers": 2,
    "max_position_embeddings": 32,
}

DIMS = """\
family: test
hf_architecture: LlamaForCausalLM
dims:
  num_layers: num_hidden_layers
  hidden_size: hidden_size
  ffn_hidden_size: intermediate_size
  num_attention_heads: num_attention_heads
  num_query_groups: num_key_value_heads
  kv_channels: head_dim
  vocab_size: vocab_size
  max_position_embeddings: max_position_embeddings
config_fields:
  architectures: any
  model_type: any
"""


def _param(name: str, shape: tuple[int, ...], module: str, partition: int | None, layer: int | None = None, expert: int | None = None) -> MegatronParam:
    return MegatronParam(name, shape, "float32", module, partition, layer, expert, te_name=name)


def _expand(rules: str, megatron: list[MegatronParam], hf: list[HFTensor], fused: bool = False) -> tuple[Mapping, ...]:
    spec = parse_spec("spec.yaml", DIMS + "rules:\n" + rules)
    config = read_hf_config("config.json", json.dumps(CONFIG))
    dims = translate(spec, config)
    return expand(spec, config, dims, "te", tuple(megatron), tuple(hf), fused_experts=fused)


QKV_RULE = """\
  - megatron: decoder.layers.*.self_attention.linear_qkv.weight
    hf: model.layers.*.self_attn.{q,k,v}_proj.weight
    kind: qkv
"""


def _qkv_inventories(layers: int = 2) -> tuple[list[MegatronParam], list[HFTensor]]:
    megatron = [
        _param(f"decoder.layers.{i}.self_attention.linear_qkv.weight", (16, 8), "TELayerNormColumnParallelLinear", 0, i)
        for i in range(layers)
    ]
    hf = [
        HFTensor(f"model.layers.{i}.self_attn.{x}_proj.weight", (8 if x == "q" else 4, 8))
        for i in range(layers)
        for x in "qkv"
    ]
    return megatron, hf


def test_qkv_expands_to_one_mapping_per_layer_with_its_geometry() -> None:
    megatron, hf = _qkv_inventories()
    (first, second) = _expand(QKV_RULE, megatron, hf)
    assert first.kind is KINDS["qkv"] and first.split == "column" and first.split_dim == 0
    assert [s.label for s in second.hf] == [f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv"]
    assert [s.role for s in second.hf] == ["q", "k", "v"]
    assert (first.qkv.heads, first.qkv.groups, first.qkv.head_dim, first.qkv.gate) == (4, 2, 2, False)  # type: ignore[union-attr]
    pair = functions_of(second, 3)
    assert pair.import_name == "import_decoder_layers_1_self_attention_linear_qkv_weight"
    assert pair.doc == "qkv: rule 3."
    assert functions_of(second, 3, "decoder.layers.1.").import_name == "import_self_attention_linear_qkv_weight"
    assert pair.import_expr == (
        "rt.qkv_import(ctx.tp, load('model.layers.1.self_attn.q_proj.weight'), "
        "load('model.layers.1.self_attn.k_proj.weight'), load('model.layers.1.self_attn.v_proj.weight'), "
        "heads=4, groups=2, head_dim=2, out=out)"
    )
    assert pair.export_expr == (
        "rt.named(rt.qkv_export(parts, heads=4, groups=2, head_dim=2), 'model.layers.1.self_attn.q_proj.weight', "
        "'model.layers.1.self_attn.k_proj.weight', 'model.layers.1.self_attn.v_proj.weight')"
    )


def test_qkv_shape_mismatch_names_the_role_and_the_geometry() -> None:
    megatron, hf = _qkv_inventories(1)
    hf[1] = HFTensor("model.layers.0.self_attn.k_proj.weight", (6, 8))
    with pytest.raises(SpecError) as raised:
        _expand(QKV_RULE, megatron, hf)
    assert raised.value.messages == [
        "spec.yaml:16:15: 'decoder.layers.0.self_attention.linear_qkv.weight' (qkv): HF k [6, 8] is not [4, 8] "
        "(4 heads, 2 groups, head_dim 2)"
    ]


@pytest.mark.parametrize(
    ("kind", "module", "partition", "hf_shape", "import_expr", "export_expr"),
    [
        ("auto", "TERowParallelLinear", 1, (8, 6), "rt.row_import(ctx.tp, load('h'), out=out)", "{'h': rt.row_export(parts)}"),
        ("auto", "TEColumnParallelLinear", 0, (8, 6), "rt.column_import(ctx.tp, load('h'), out=out)", "{'h': rt.column_export(parts)}"),
        ("auto", "TENorm", None, (8, 6), "rt.whole_import(load('h'), out=out)", "{'h': parts[0]}"),
        ("direct", "Anything", None, (8, 6), "rt.whole_import(load('h'), out=out)", "{'h': parts[0]}"),
        ("column", "Anything", 0, (8, 6), "rt.column_import(ctx.tp, load('h'), out=out)", "{'h': rt.column_export(parts)}"),
        ("row", "Anything", 1, (8, 6), "rt.row_import(ctx.tp, load('h'), out=out)", "{'h': rt.row_export(parts)}"),
        ("replicated", "Anything", None, (8, 6), "rt.whole_import(load('h'), out=out)", "{'h': parts[0]}"),
        (
            "reshape", "TEColumnParallelLinear", 0, (48,),
            "rt.reshape_import(ctx.tp, load('h'), (8, 6), 0, out=out)", "{'h': rt.column_export(parts).reshape((48,))}",
        ),
        (
            "zero_centered_rmsnorm", "TENorm", None, (8, 6),
            "rt.zero_centered_from_hf(load('h'), out=out)", "{'h': rt.zero_centered_to_hf(parts[0])}",
        ),
    ],
)
def test_single_tensor_kinds_emit_one_runtime_call(
    kind: str, module: str, partition: int | None, hf_shape: tuple[int, ...], import_expr: str, export_expr: str
) -> None:
    (m,) = _expand(f"  - megatron: m\n    hf: h\n    kind: {kind}\n", [_param("m", (8, 6), module, partition)], [HFTensor("h", hf_shape)])
    pair = functions_of(m)
    assert (pair.import_expr, pair.export_expr) == (import_expr, export_expr)


def test_auto_with_permute_dims_permutes_then_inverts() -> None:
    rules = "  - megatron: m\n    hf: h\n    kind: auto\n    permute_dims: [1, 0]\n"
    (m,) = _expand(rules, [_param("m", (8, 6), "TEColumnParallelLinear", 0)], [HFTensor("h", (6, 8))])
    pair = functions_of(m)
    assert pair.import_expr == "rt.column_import(ctx.tp, load('h').permute((1, 0)), out=out)"
    assert pair.export_expr == "{'h': rt.permute(rt.column_export(parts), (1, 0))}"
    assert pair.doc == "auto -> column."


def test_split_must_agree_with_megatron_core() -> None:
    with pytest.raises(SpecError) as raised:
        _expand("  - megatron: m\n    hf: h\n    kind: row\n", [_param("m", (8, 6), "X", 0)], [HFTensor("h", (8, 6))])
    assert raised.value.messages == [
        "spec.yaml:16:15: 'm' (row): resolves to row (splits dim 1), but megatron-core gives X's parameter partition dim 0"
    ]


def test_auto_refuses_an_unknown_module_instead_of_guessing_from_its_name() -> None:
    with pytest.raises(SpecError) as raised:
        _expand("  - megatron: m\n    hf: h\n    kind: auto\n", [_param("m", (8,), "MyFancyNorm", None)], [HFTensor("h", (8,))])
    assert "its module MyFancyNorm is not a known type; register it under module_types" in raised.value.messages[0]


GATED = """\
  - megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight
    hf: model.layers.*.mlp.experts.*.{gate,up}_proj.weight
    fused_hf: model.layers.*.mlp.experts.gate_up_proj[*]
    kind: gated_mlp
"""


def _experts() -> list[MegatronParam]:
    return [
        _param(f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight", (12, 8), "ColumnParallelLinear", 0, 0, e)
        for e in range(2)
    ]


def test_gated_mlp_per_expert_and_stacked() -> None:
    per_expert = [HFTensor(f"model.layers.0.mlp.experts.{e}.{x}_proj.weight", (6, 8)) for e in range(2) for x in ("gate", "up")]
    one = _expand(GATED, _experts(), per_expert)[1]
    assert functions_of(one).import_expr == (
        "rt.gated_mlp_import(ctx.etp, load('model.layers.0.mlp.experts.1.gate_proj.weight'), "
        "load('model.layers.0.mlp.experts.1.up_proj.weight'), out=out)"
    )
    stacked = _expand(GATED, _experts(), [HFTensor("model.layers.0.mlp.experts.gate_up_proj", (2, 12, 8))], fused=True)
    source = stacked[1].hf[0]
    assert (source.role, source.name, source.shape, source.expert_slice, source.label) == (
        "gate_up", "model.layers.0.mlp.experts.gate_up_proj", (12, 8), 1, "model.layers.0.mlp.experts.gate_up_proj[1]"
    )
    pair = functions_of(stacked[1])
    assert pair.import_expr == "rt.gated_mlp_import(ctx.etp, *rt.halves(load('model.layers.0.mlp.experts.gate_up_proj')[1]), out=out)"
    assert pair.export_expr == "{'model.layers.0.mlp.experts.gate_up_proj[1]': rt.fused_gated_mlp_export(parts)}"


FUSED_GATED = """\
  - megatron: decoder.layers.*.mlp.linear_fc1.weight
    hf: model.layers.*.mlp.gate_up_proj.weight
    kind: gated_mlp
"""


def test_gated_mlp_from_one_fused_tensor() -> None:
    """One hf pattern: the tensor is [gate; up] (Phi-3's gate_up_proj), halved on import and
    joined back on export; the role is gate_up, as for a stacked-experts slice."""
    megatron = [_param("decoder.layers.0.mlp.linear_fc1.weight", (12, 8), "TELayerNormColumnParallelLinear", 0, 0)]
    (mapping,) = _expand(FUSED_GATED, megatron, [HFTensor("model.layers.0.mlp.gate_up_proj.weight", (12, 8))])
    (source,) = mapping.hf
    assert (source.role, source.name, source.expert_slice, mapping.split) == ("gate_up", "model.layers.0.mlp.gate_up_proj.weight", None, "column")
    pair = functions_of(mapping)
    assert pair.import_expr == "rt.gated_mlp_import(ctx.tp, *rt.halves(load('model.layers.0.mlp.gate_up_proj.weight')), out=out)"
    assert pair.export_expr == "{'model.layers.0.mlp.gate_up_proj.weight': rt.fused_gated_mlp_export(parts)}"
    with pytest.raises(SpecError) as raised:  # the fused tensor must be the Megatron shape
        _expand(FUSED_GATED, megatron, [HFTensor("model.layers.0.mlp.gate_up_proj.weight", (6, 8))])
    assert "[gate; up] model.layers.0.mlp.gate_up_proj.weight [6, 8] is not the Megatron shape [12, 8]" in raised.value.messages[0]


def test_gated_mlp_takes_two_patterns_or_one() -> None:
    with pytest.raises(SpecError) as raised:
        _expand(FUSED_GATED.replace("gate_up_proj", "{gate,up,down}_proj"), [], [])
    assert raised.value.messages == [
        "spec.yaml:17:9: kind 'gated_mlp' takes 2 HF tensor(s) (gate, up) or 1 HF tensor(s) (gate_up), the pattern names 3"
    ]


def test_a_stacked_tensor_with_a_slice_nobody_reads_is_reported() -> None:
    with pytest.raises(SpecError) as raised:
        _expand(GATED, _experts()[:1], [HFTensor("model.layers.0.mlp.experts.gate_up_proj", (2, 12, 8))], fused=True)
    assert raised.value.messages == [
        "spec.yaml:1:1: 1 HF tensor(s) of LlamaForCausalLM are consumed by no rule: model.layers.0.mlp.experts.gate_up_proj"
    ]


def test_rules_table_follows_parameter_order_not_spec_order() -> None:
    rules = QKV_RULE + "  - megatron: embedding.word_embeddings.weight\n    hf: model.embed_tokens.weight\n    kind: auto\n"
    megatron, hf = _qkv_inventories(1)
    megatron.insert(0, _param("embedding.word_embeddings.weight", (16, 8), "VocabParallelEmbedding", 0))
    hf.append(HFTensor("model.embed_tokens.weight", (16, 8)))
    mappings = _expand(rules, megatron, hf)

    class T:  # the part of a Target rules_in_use reads
        pass

    target = T()
    target.mappings = mappings  # type: ignore[attr-defined]
    rules_used = rules_in_use(target)  # type: ignore[arg-type]
    assert [r.id for r in rules_used] == ["embedding.word_embeddings.weight", "decoder.layers.*.self_attention.linear_qkv.weight"]
    assert _rule_literal(rules_used[1], mappings[1]) == (
        "RulePlan('decoder.layers.*.self_attention.linear_qkv.weight', 'qkv', "
        "'decoder.layers.*.self_attention.linear_qkv.weight', ('model.layers.*.self_attn.q_proj.weight', "
        "'model.layers.*.self_attn.k_proj.weight', 'model.layers.*.self_attn.v_proj.weight'), ('q', 'k', 'v'), "
        "qkv=QKVGeometry(4, 2, 2, False), linear_weight=True)"
    )
    # the embedding is no linear layer's weight: an FP8 checkpoint does not quantize it
    assert _rule_literal(rules_used[0], mappings[0]).endswith("('hf',))")


def test_every_kind_has_one_definition_with_roles_and_doc() -> None:
    assert sorted(KINDS) == sorted(
        ["direct", "column", "row", "replicated", "auto", "qkv", "kv", "concat_qkv", "vision_qkv", "gated_mlp", "reshape", "zero_centered_rmsnorm",
         "gdn_in_proj", "gdn_conv1d", "gdn_in_proj_sections", "mamba_in_proj", "mamba_conv1d"]
    )
    for name, kind in KINDS.items():
        assert kind.name == name and kind.roles and kind.doc


GDN_RULES = """\
  - megatron: decoder.layers.*.self_attention.in_proj.weight
    hf: model.layers.*.linear_attn.in_proj_{qkvz,ba}.weight
    kind: gdn_in_proj
  - megatron: decoder.layers.*.self_attention.conv1d.weight
    hf: model.layers.*.linear_attn.conv1d.weight
    kind: gdn_conv1d
"""


def _gdn_expand(qkvz_rows: int = 2 * (2 * 3 + 2 * 2 * 5)) -> tuple[Mapping, ...]:
    """2 key heads of 3, 4 value heads of 5 (r = 2), hidden 8: in_proj rows 2*(3+3+10+10) + 2*4."""
    sizes = "  linear_attention_layers: '[0]'\n  linear_num_key_heads: 2\n  linear_num_value_heads: 4\n" \
        "  linear_key_head_dim: 3\n  linear_value_head_dim: 5\n"
    spec = parse_spec("spec.yaml", DIMS.replace("config_fields:\n", sizes + "config_fields:\n") + "rules:\n" + GDN_RULES)
    config = read_hf_config("config.json", json.dumps(CONFIG))
    dims = translate(spec, config)
    megatron = [
        _param("decoder.layers.0.self_attention.in_proj.weight", (60, 8), "TELayerNormColumnParallelLinear", 0, 0),
        _param("decoder.layers.0.self_attention.conv1d.weight", (32, 1, 4), "Conv1d", 0, 0),
    ]
    hf = [
        HFTensor("model.layers.0.linear_attn.in_proj_qkvz.weight", (qkvz_rows, 8)),
        HFTensor("model.layers.0.linear_attn.in_proj_ba.weight", (8, 8)),
        HFTensor("model.layers.0.linear_attn.conv1d.weight", (32, 1, 4)),
    ]
    return expand(spec, config, dims, "te", tuple(megatron), tuple(hf))


def test_gated_delta_net_kinds_emit_their_calls_with_the_head_sizes() -> None:
    in_proj, conv = _gdn_expand()
    assert (in_proj.split_dim, conv.split_dim) == (0, 0)
    assert functions_of(in_proj).import_expr == (
        "rt.gdn_in_proj_import(ctx.tp, load('model.layers.0.linear_attn.in_proj_qkvz.weight'), "
        "load('model.layers.0.linear_attn.in_proj_ba.weight'), key_dim=3, value_dim=5, v_per_k=2, out=out)"
    )
    assert functions_of(in_proj).export_expr == (
        "rt.named(rt.gdn_in_proj_export(parts, key_dim=3, value_dim=5, v_per_k=2), "
        "'model.layers.0.linear_attn.in_proj_qkvz.weight', 'model.layers.0.linear_attn.in_proj_ba.weight')"
    )
    assert functions_of(conv).import_expr == (
        "rt.gdn_conv_import(ctx.tp, load('model.layers.0.linear_attn.conv1d.weight'), key_dim=3, value_dim=5, v_per_k=2, out=out)"
    )
    assert _rule_literal(in_proj.rule, in_proj).endswith("qkv=QKVGeometry(4, 2, 3, False, value_dim=5), linear_weight=True)")


def test_gated_delta_net_shape_mismatch_names_the_role_and_the_heads() -> None:
    with pytest.raises(SpecError) as raised:
        _gdn_expand(qkvz_rows=50)
    assert raised.value.messages == [
        "spec.yaml:21:15: 'decoder.layers.0.self_attention.in_proj.weight' (gdn_in_proj): HF qkvz [50, 8] is not "
        "[52, 8] (2 key heads of 3, 4 value heads of 5)"
    ]
