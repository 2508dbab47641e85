"""Every config field is read, declared or refused (issue 9, part 6): the checked-in configs and
their stand-ins are understood whole; a field a spec does not know, or a value it cannot build,
is refused naming the field where the config holds it; the layer patterns the specs derive
(dense/expert layers, sliding windows) equal the ones transformers builds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen.verify import forward, testing
from mapgen.compiler.targets import read_targets
from mapgen.compiler.config import translate
from mapgen.compiler.hfconfig import read_hf_config
from mapgen.common.dims import ModelDims
from mapgen.common.errors import SpecError
from mapgen.compiler.megatron_config import transformer_config
from mapgen.compiler.spec import parse_spec

TARGETS = {entry.name: entry for entry in read_targets(testing.ROOT)}


def _dims(target: str, fields: dict[str, Any], shown: str = "config.json") -> ModelDims:
    spec_path = TARGETS[target].spec
    spec = parse_spec(spec_path, (testing.ROOT / spec_path).read_text())
    return translate(spec, read_hf_config(shown, json.dumps(fields, indent=2)))


def _published(target: str) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads((testing.ROOT / TARGETS[target].config).read_text())
    return fields


def _refusal(target: str, fields: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as raised:
        _dims(target, fields)
    return raised.value.messages


def _saved_by_transformers(fields: dict[str, Any]) -> dict[str, Any]:
    """The config.json transformers writes for `fields` (as a stand-in's, which verify reads)."""
    import tempfile

    import transformers

    fields = dict(fields)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        saved: dict[str, Any] = json.loads((Path(folder) / "config.json").read_text())
    return saved


@pytest.mark.parametrize("target", list(TARGETS))
def test_checked_in_configs_and_their_standins_are_understood(target: str) -> None:
    _dims(target, _published(target))
    standin = _saved_by_transformers(testing.standin_config(_published(target)))
    if target == "nemotron_3_nano_30b_a3b":
        # transformers saves NemotronH's pattern as `layers_block_type` (a list), without the
        # published `hybrid_override_pattern` and `num_hidden_layers` the spec reads: refused,
        # naming them (docs/nemotron-h.md says to add them back)
        with pytest.raises(SpecError, match="lacks field 'hybrid_override_pattern'"):
            _dims(target, standin)
        return
    _dims(target, standin)


def test_a_field_the_spec_does_not_know_is_refused_where_the_config_holds_it() -> None:
    fields = _published("qwen3_30b_a3b")
    fields["shared_expert_intermediate_size"] = 5632  # Qwen2-MoE's shared expert
    messages = _refusal("qwen3_30b_a3b", fields)
    line = json.dumps(fields, indent=2).splitlines().index('  "shared_expert_intermediate_size": 5632') + 1
    assert messages == [
        f"config.json:{line}:3: config field 'shared_expert_intermediate_size' is unknown to spec "
        "specs/qwen3_moe.yaml: no expression of the spec reads it and its config_fields do not "
        "declare it, so the model built would ignore it"
    ]


def test_an_unknown_rope_scaling_is_refused_not_dropped() -> None:
    """Llama-2's linear scaling names its kind `type`, which the llama spec does not read:
    before config fields were checked, the model was built without the scaling."""
    fields = _published("llama3_1_8b")
    fields["rope_scaling"] = {"type": "linear", "factor": 2.0}
    messages = _refusal("llama3_1_8b", fields)
    assert [m.split(": ", 1)[1] for m in messages] == [
        "config field 'rope_scaling.type' is unknown to spec specs/llama.yaml: no expression of the "
        "spec reads it and its config_fields do not declare it, so the model built would ignore it"
    ]


def test_deepseek_rope_interleave_false_is_refused() -> None:
    fields = _published("deepseek_v3")
    fields["rope_interleave"] = False
    messages = _refusal("deepseek_v3", fields)
    line = json.dumps(fields, indent=2).splitlines().index('  "rope_interleave": false') + 1
    assert len(messages) == 1
    assert messages[0].startswith(
        f"config.json:{line}:3: config field 'rope_interleave' is false, but spec specs/deepseek_v3.yaml "
        "builds only rope_interleave = true (config_fields, line "
    )
    assert "megatron-core's multi-latent attention applies rope to the interleaved layout only" in messages[0]
    fields["rope_interleave"] = True  # the default, stated
    _dims("deepseek_v3", fields)


def test_deepseek_declared_values_are_enforced() -> None:
    fields = _published("deepseek_v3")
    fields.update(scoring_func="softmax", num_key_value_heads=8)
    messages = [m.split(": ", 1)[1] for m in _refusal("deepseek_v3", fields)]
    assert [m.split(" (config_fields")[0] for m in messages] == [
        "config field 'num_key_value_heads' is 8, but spec specs/deepseek_v3.yaml builds only num_key_value_heads = 128",
        "config field 'scoring_func' is \"softmax\", but spec specs/deepseek_v3.yaml builds only scoring_func = \"sigmoid\"",
    ]


def test_sliding_window_without_its_size_is_refused() -> None:
    fields = _published("qwen2_5_7b")
    fields.update(use_sliding_window=True, sliding_window=None)
    messages = _refusal("qwen2_5_7b", fields)
    assert len(messages) == 1 and messages[0].endswith(
        "dims.sliding_window: config config.json lacks field 'sliding_window'"
    )


def test_no_op_values_of_window_fields_build() -> None:
    """Qwen2.5 publishes use_sliding_window false beside sliding_window 131072; Mixtral null."""
    assert _dims("qwen2_5_7b", _published("qwen2_5_7b")).window_attention_layers == ()
    assert _dims("mixtral_8x7b", _published("mixtral_8x7b")).window_attention_layers == ()
    assert transformer_config(_dims("qwen2_5_7b", _published("qwen2_5_7b"))).window_size is None


def _hf_meta_model(fields: dict[str, Any]) -> Any:
    import transformers

    fields = dict(fields)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "changes",
    [{"mlp_only_layers": [0, 3]}, {"decoder_sparse_step": 2}, {"decoder_sparse_step": 3, "mlp_only_layers": [5]}, {}],
    ids=["mlp-only-layers", "sparse-step-2", "both", "published"],
)
def test_qwen3_moe_expert_layers_are_the_ones_transformers_builds(changes: dict[str, Any]) -> None:
    fields = testing.standin_config(_published("qwen3_30b_a3b"), num_layers=6)
    fields.update(changes)
    model = _hf_meta_model(fields)
    theirs = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    dims = _dims("qwen3_30b_a3b", fields)
    assert dims.moe_layers == theirs
    assert transformer_config(dims).moe_layer_freq == [int(i in theirs) for i in range(6)]


def test_deepseek_first_k_dense_replace_still_gives_the_dense_layers() -> None:
    dims = _dims("deepseek_v3", _published("deepseek_v3"))
    assert dims.moe_dense_layers == (0, 1, 2) and dims.moe_layers == tuple(range(3, 61))


@pytest.mark.parametrize(
    ("target", "changes"),
    [
        ("qwen2_5_7b", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
        ("qwen3_8b", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 4}),
        ("qwen3_8b", {"use_sliding_window": True, "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"] * 3}),
        ("mixtral_8x7b", {"sliding_window": 5}),
        ("qwen3_30b_a3b", {"use_sliding_window": True, "sliding_window": 5}),
        ("phi3_mini_4k", {"sliding_window": 5}),
    ],
    ids=["qwen2", "qwen3", "qwen3-layer-types", "mixtral", "qwen3-moe", "phi3"],
)
def test_sliding_window_layers_are_the_ones_transformers_uses(target: str, changes: dict[str, Any]) -> None:
    fields = testing.standin_config(_published(target), num_layers=6)
    fields.update(changes)
    model = _hf_meta_model(fields)
    # each layer's window as its attention passes it on (Mixtral's reads the config's)
    per_layer = [getattr(layer.self_attn, "sliding_window", model.config.sliding_window) for layer in model.model.layers]
    windows = set(per_layer) - {None}
    theirs = tuple(i for i, window in enumerate(per_layer) if window is not None)
    assert windows == {5} and theirs  # the window is on somewhere
    for config in (fields, _saved_by_transformers(fields)):  # as given, and as transformers saves it
        dims = _dims(target, config)
        assert (dims.sliding_window, dims.window_attention_layers) == (5, theirs)
        megatron = transformer_config(dims)
        assert megatron.window_size == (4, 0)  # megatron-core counts the positions before the query
        assert megatron.window_attn_skip_freq == [int(i in theirs) for i in range(6)]


def test_a_window_shorter_than_the_sequence_changes_transformers_logits(tmp_path: Path) -> None:
    """So the distributed stand-ins with sliding_window 3 (tests/test_distributed.py), which
    verify 7-token sequences, check the window and not only the weights."""
    fields = testing.standin_config(_published("mixtral_8x7b"))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    logits = []
    for window in (3, None):
        fields["sliding_window"] = window
        import transformers

        config = transformers.AutoConfig.for_model("mixtral", **{k: v for k, v in fields.items() if k != "model_type"})
        model = testing.save_random_model(config, tmp_path / str(window))
        logits.append(forward.hf_logits(model, ids))
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_qwen3_moe_dense_layers_in_the_te_layout(tmp_path: Path) -> None:
    """The te module of a Qwen3-MoE with decoder_sparse_step 2: the dense layers' pre-MLP norm is
    fused into linear_fc1 (TELayerNormColumnParallelLinear), the expert layers keep theirs."""
    from mapgen.compiler.build import compile_target

    fields = testing.standin_config(_published("qwen3_30b_a3b"))
    fields["decoder_sparse_step"] = 2
    (tmp_path / "config.json").write_text(json.dumps(fields))
    source = compile_target(
        "sparse_step", testing.ROOT / TARGETS["qwen3_30b_a3b"].spec, tmp_path / "config.json", "te", "test"
    )
    (tmp_path / "sparse_step.py").write_text(source)
    module = testing.import_module_from_path(tmp_path / "sparse_step.py")
    sources = {p.megatron_name: p.hf_names for p in module.PARAMS}
    for layer in (0, 2):
        assert sources[f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight"] == (
            f"model.layers.{layer}.post_attention_layernorm.weight",
        )
        assert sources[f"decoder.layers.{layer}.mlp.linear_fc1.weight"] == (
            f"model.layers.{layer}.mlp.gate_proj.weight",
            f"model.layers.{layer}.mlp.up_proj.weight",
        )
        assert f"decoder.layers.{layer}.mlp.router.weight" not in sources
    for layer in (1, 3):
        assert sources[f"decoder.layers.{layer}.pre_mlp_layernorm.weight"] == (
            f"model.layers.{layer}.post_attention_layernorm.weight",
        )
        assert f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight7" in sources
