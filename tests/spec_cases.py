"""The bad-spec table: each case edits a valid spec (or its config) and lists every message
`mapgen build` must print, exactly."""

from __future__ import annotations

BASE_SPEC = """\
family: llama
hf_architecture: LlamaForCausalLM
dims:
  num_layers: num_hidden_layers
  hidden_size: hidden_size
  ffn_hidden_size: intermediate_size
  num_attention_heads: num_attention_heads
  num_query_groups: num_key_value_heads
  kv_channels: hidden_size // num_attention_heads
  vocab_size: vocab_size
  max_position_embeddings: max_position_embeddings
  layernorm_epsilon: rms_norm_eps
  share_embeddings_and_output_weights: tie_word_embeddings
rules:
  - megatron: embedding.word_embeddings.weight
    hf: model.embed_tokens.weight
    kind: auto
  - megatron: decoder.layers.*.self_attention.linear_qkv.layer_norm_weight
    hf: model.layers.*.input_layernorm.weight
    kind: auto
  - megatron: decoder.layers.*.self_attention.linear_qkv.weight
    hf: model.layers.*.self_attn.{q,k,v}_proj.weight
    kind: qkv
  - megatron: decoder.layers.*.self_attention.linear_proj.weight
    hf: model.layers.*.self_attn.o_proj.weight
    kind: auto
  - megatron: decoder.layers.*.mlp.linear_fc1.layer_norm_weight
    hf: model.layers.*.post_attention_layernorm.weight
    kind: auto
  - megatron: decoder.layers.*.mlp.linear_fc1.weight
    hf: model.layers.*.mlp.{gate,up}_proj.weight
    kind: gated_mlp
  - megatron: decoder.layers.*.mlp.linear_fc2.weight
    hf: model.layers.*.mlp.down_proj.weight
    kind: auto
  - megatron: decoder.final_layernorm.weight
    hf: model.norm.weight
    kind: auto
  - megatron: output_layer.weight
    hf: lm_head.weight
    kind: auto
config_fields:
  hidden_act: "'silu'"
  rope_theta: {value: 10000, why: "megatron-core's default rope base"}
"""

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}

# (id, [(old, new) edits of BASE_SPEC], config overrides (None deletes), expected messages)
CASES: list[tuple[str, list[tuple[str, str]], dict[str, object], list[str]]] = [
    (
        "unknown-top-key",
        [("family: llama\n", "family: llama\nhf_arch: Llama\n")],
        {},
        [
            "bad.yaml:2:1: unknown key 'hf_arch' in spec; expected one of family, hf_architecture, dims, module_types, rules, ignore_hf, config_fields, mtp, models, hf_namings, unsupported"
        ],
    ),
    (
        "unknown-rule-key",
        [("    hf: model.norm.weight\n", "    hf_parm: model.norm.weight\n")],
        {},
        [
            "bad.yaml:36:5: rule is missing required key 'hf'",
            "bad.yaml:37:5: unknown key 'hf_parm' in rule; expected one of megatron, hf, kind, id, permute_dims, when, heads, head_dim, fused_hf, interleaved",
        ],
    ),
    (
        "missing-kind",
        [("    hf: lm_head.weight\n    kind: auto\n", "    hf: lm_head.weight\n")],
        {},
        ["bad.yaml:39:5: rule is missing required key 'kind'"],
    ),
    (
        "unknown-kind",
        [("kind: gated_mlp", "kind: gated_mlpp")],
        {},
        [
            "bad.yaml:32:11: unknown kind 'gated_mlpp'; expected one of direct, column, row, replicated, auto, qkv, kv, concat_qkv, vision_qkv, gated_mlp, reshape, zero_centered_rmsnorm, gdn_in_proj, gdn_conv1d, gdn_in_proj_sections, mamba_in_proj, mamba_conv1d"
        ],
    ),
    (
        "wildcard-mismatch",
        [
            (
                "hf: model.layers.*.self_attn.o_proj.weight",
                "hf: model.layers.0.self_attn.o_proj.weight",
            )
        ],
        {},
        [
            "bad.yaml:25:9: wildcard mismatch: megatron 'decoder.layers.*.self_attention.linear_proj.weight' has *, hf 'model.layers.0.self_attn.o_proj.weight' has no wildcard"
        ],
    ),
    (
        "duplicate-key",
        [
            (
                "    hf: model.norm.weight\n    kind: auto\n",
                "    hf: model.norm.weight\n    kind: auto\n    kind: replicated\n",
            )
        ],
        {},
        ["bad.yaml:39:5: duplicate key 'kind' (first defined at line 38)"],
    ),
    (
        "duplicate-dim",
        [("  vocab_size: vocab_size\n", "  vocab_size: vocab_size\n  vocab_size: 7\n")],
        {},
        ["bad.yaml:11:3: duplicate key 'vocab_size' (first defined at line 10)"],
    ),
    (
        "roles-count",
        [("{q,k,v}_proj", "{q,k}_proj")],
        {},
        ["bad.yaml:22:9: kind 'qkv' takes 3 HF tensor(s) (q, k, v), the pattern names 2"],
    ),
    (
        "roles-keys",
        [
            (
                "    hf: model.layers.*.mlp.{gate,up}_proj.weight\n",
                "    hf: {gate: model.layers.*.mlp.gate_proj.weight, upp: model.layers.*.mlp.up_proj.weight}\n",
            )
        ],
        {},
        ["bad.yaml:31:9: kind 'gated_mlp' takes hf as a mapping with keys gate, up"],
    ),
    (
        "rule-matches-nothing",
        [
            (
                "rules:\n",
                "rules:\n  - megatron: decoder.layers.*.self_attention.q_layernorm.weight\n    hf: model.layers.*.self_attn.q_norm.weight\n    kind: auto\n",
            )
        ],
        {},
        [
            "bad.yaml:15:15: rule 'decoder.layers.*.self_attention.q_layernorm.weight' matches no Megatron parameter of this model (te layout)"
        ],
    ),
    (
        "two-rules-one-param",
        [
            (
                "rules:\n",
                "rules:\n  - megatron: decoder.final_layernorm.weight\n    id: final-norm\n    hf: model.norm.weight\n    kind: replicated\n",
            )
        ],
        {},
        [
            "bad.yaml:40:15: rule 'decoder.final_layernorm.weight' matches Megatron parameter 'decoder.final_layernorm.weight', which rule 'final-norm' (line 15) already matches"
        ],
    ),
    (
        "two-rules-one-id",
        [
            (
                "rules:\n",
                "rules:\n  - megatron: decoder.final_layernorm.weight\n    hf: model.norm.weight\n    kind: replicated\n",
            )
        ],
        {},
        [
            "bad.yaml:39:15: rule id 'decoder.final_layernorm.weight' is taken by the rule at line 15; give one of them an id: of its own"
        ],
    ),
    (
        "config-lacks-field",
        [],
        {"rms_norm_eps": None},
        ["bad.yaml:12:22: dims.layernorm_epsilon: config config.json lacks field 'rms_norm_eps'"],
    ),
    (
        "unknown-dim",
        [("  num_layers: num_hidden_layers\n", "  num_layer: num_hidden_layers\n")],
        {},
        [
            "bad.yaml:4:3: dims: missing required dim 'num_layers'",
            "bad.yaml:4:3: unknown dim 'num_layer'; did you mean 'num_layers' or 'mtp_num_layers' or 'vision_num_layers'?",
        ],
    ),
    (
        "bad-expression",
        [("hidden_size // num_attention_heads", "hidden_size /// num_attention_heads")],
        {},
        [
            "bad.yaml:9:16: dims.kv_channels: invalid expression 'hidden_size /// num_attention_heads': invalid syntax"
        ],
    ),
    (
        "unconsumed-hf-tensor",
        [("  - megatron: output_layer.weight\n    hf: lm_head.weight\n    kind: auto\n", "")],
        {},
        [
            "bad.yaml:1:1: 1 HF tensor(s) of LlamaForCausalLM are consumed by no rule: lm_head.weight",
            "bad.yaml:1:1: 1 Megatron parameter(s) (te layout) match no rule: output_layer.weight",
        ],
    ),
    (
        "missing-hf-tensor",
        [("hf: model.embed_tokens.weight", "hf: model.embed_token.weight")],
        {},
        [
            "bad.yaml:1:1: 1 HF tensor(s) of LlamaForCausalLM are consumed by no rule: model.embed_tokens.weight",
            "bad.yaml:15:15: 'embedding.word_embeddings.weight' needs HF tensor 'model.embed_token.weight', which LlamaForCausalLM does not have for this config",
        ],
    ),
    (
        "permute-on-qkv",
        [("    kind: qkv\n", "    kind: qkv\n    permute_dims: [1, 0]\n")],
        {},
        ["bad.yaml:24:19: 'permute_dims' applies only to kind 'auto' or 'gated_mlp', not 'qkv'"],
    ),
    (
        "bad-module-type",
        [("rules:\n", "module_types:\n  MyLinear: diagonal\nrules:\n")],
        {},
        [
            "bad.yaml:15:13: module type 'MyLinear': parallelism must be one of column, row, replicated, got 'diagonal'"
        ],
    ),
    (
        "architecture-mismatch",
        [("hf_architecture: LlamaForCausalLM", "hf_architecture: Qwen2ForCausalLM")],
        {},
        [
            "config.json:1:1: config is for LlamaForCausalLM, but spec bad.yaml maps Qwen2ForCausalLM"
        ],
    ),
    (
        "invalid-yaml",
        [("kind: qkv\n", "kind: [qkv\n")],
        {},
        ["bad.yaml:24:13: invalid YAML: expected ',' or ']', but got ':'"],
    ),
    (
        "shape-mismatch",
        [("hf: model.layers.*.mlp.down_proj.weight", "hf: model.layers.*.mlp.up_proj.weight")],
        {},
        [
            "bad.yaml:1:1: 2 HF tensor(s) of LlamaForCausalLM are consumed by no rule: model.layers.0.mlp.down_proj.weight, model.layers.1.mlp.down_proj.weight",
            "bad.yaml:1:1: HF tensor 'model.layers.0.mlp.up_proj.weight' is consumed 2 times: by decoder.layers.0.mlp.linear_fc1.weight, decoder.layers.0.mlp.linear_fc2.weight",
            "bad.yaml:1:1: HF tensor 'model.layers.1.mlp.up_proj.weight' is consumed 2 times: by decoder.layers.1.mlp.linear_fc1.weight, decoder.layers.1.mlp.linear_fc2.weight",
            "bad.yaml:33:15: 'decoder.layers.0.mlp.linear_fc2.weight' (auto): HF model.layers.0.mlp.up_proj.weight [96, 64] does not match the Megatron shape [64, 96]",
            "bad.yaml:33:15: 'decoder.layers.1.mlp.linear_fc2.weight' (auto): HF model.layers.1.mlp.up_proj.weight [96, 64] does not match the Megatron shape [64, 96]",
        ],
    ),
    (
        "split-mismatch",
        [
            (
                "    hf: model.embed_tokens.weight\n    kind: auto\n",
                "    hf: model.embed_tokens.weight\n    kind: row\n",
            )
        ],
        {},
        [
            "bad.yaml:15:15: 'embedding.word_embeddings.weight' (row): resolves to row (splits dim 1), but megatron-core gives VocabParallelEmbedding's parameter partition dim 0"
        ],
    ),
    (
        "dim-type",
        [("  num_layers: num_hidden_layers\n", "  num_layers: \"'two'\"\n")],
        {},
        [
            "bad.yaml:4:15: dims.num_layers must be an integer, got 'two' (from config config.json)",
            "config.json:8:3: config field 'num_hidden_layers' is unknown to spec bad.yaml: no expression of the spec reads it and its config_fields do not declare it, so the model built would ignore it",
        ],
    ),
    (
        "several-at-once",
        [
            ("family: llama\n", "family: llama\nhf_arch: Llama\n"),
            ("kind: gated_mlp", "kind: gated"),
        ],
        {},
        [
            "bad.yaml:2:1: unknown key 'hf_arch' in spec; expected one of family, hf_architecture, dims, module_types, rules, ignore_hf, config_fields, mtp, models, hf_namings, unsupported",
            "bad.yaml:33:11: unknown kind 'gated'; expected one of direct, column, row, replicated, auto, qkv, kv, concat_qkv, vision_qkv, gated_mlp, reshape, zero_centered_rmsnorm, gdn_in_proj, gdn_conv1d, gdn_in_proj_sections, mamba_in_proj, mamba_conv1d",
        ],
    ),
    (
        "tied-config-untied-rule",
        [],
        {"tie_word_embeddings": True},
        [
            "bad.yaml:39:15: rule 'output_layer.weight' matches no Megatron parameter of this model (te layout)"
        ],
    ),
    (
        "ignore-covers-mapped-tensors",
        [("rules:\n", "ignore_hf:\n  - prefix: \"'model.layers.%d.' % (num_hidden_layers - 1)\"\n    why: test\nrules:\n")],
        {},
        ["bad.yaml:15:5: ignore_hf.prefix 'model.layers.1.' covers tensors the rules map: model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight, model.layers.1.self_attn.v_proj.weight, model.layers.1.self_attn.o_proj.weight, model.layers.1.mlp.gate_proj.weight"],
    ),
    (
        "ignore-entry-malformed",
        [("rules:\n", "ignore_hf:\n  - prefix: \"'model.mtp.'\"\nrules:\n")],
        {},
        ["bad.yaml:15:5: each 'ignore_hf' entry needs exactly the keys prefix (an expression) and why"],
    ),
    (
        "unknown-config-field",
        [],
        {"sliding_window": 16},
        [
            "config.json:17:3: config field 'sliding_window' is unknown to spec bad.yaml: no expression of the spec reads it and its config_fields do not declare it, so the model built would ignore it"
        ],
    ),
    (
        "unknown-nested-config-field",
        [("  layernorm_epsilon: rms_norm_eps\n", "  layernorm_epsilon: rms_norm_eps\n  rope_type: default(rope_scaling.rope_type, 'default')\n")],
        {"rope_scaling": {"rope_type": "default", "factor": 4.0}},
        [
            "config.json:19:5: config field 'rope_scaling.factor' is unknown to spec bad.yaml: no expression of the spec reads it and its config_fields do not declare it, so the model built would ignore it"
        ],
    ),
    (
        "config-field-value",
        [],
        {"rope_theta": 500000.0, "hidden_act": "gelu"},
        [
            "config.json:14:3: config field 'hidden_act' is \"gelu\", but spec bad.yaml builds only hidden_act = \"silu\" (config_fields, line 43)",
            "config.json:16:3: config field 'rope_theta' is 500000.0, but spec bad.yaml builds only rope_theta = 10000 (config_fields, line 44): megatron-core's default rope base",
        ],
    ),
    (
        "config-fields-malformed",
        [("  hidden_act: \"'silu'\"\n  rope_theta: {value: 10000, why: \"megatron-core's default rope base\"}\n", "  hidden_act: {value: \"'silu'\"}\n  rope-theta: any\n  rope_theta: [1]\n")],
        {},
        [
            "bad.yaml:43:15: config_fields.hidden_act as a mapping needs exactly the keys value and why",
            "bad.yaml:44:3: config_fields: 'rope-theta' is not a field name (nested fields: a.b)",
            "bad.yaml:45:15: config_fields.rope_theta must be 'any', an expression or a literal",
        ],
    ),
]
