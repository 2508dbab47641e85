"""The model classes as objects (mapgen/compiler/model_classes.py): one per name of
MODEL_CLASSES, and what the checked-in modules say of their class is what its object says."""

from __future__ import annotations

import re

import pytest

from mapgen.common.layout import MODEL_CLASSES
from mapgen.compiler.targets import read_targets
from mapgen.compiler.model_classes import MODELS, ModelClass, build_model, megatron_inventory
from mapgen.verify import testing


def test_one_object_per_model_class() -> None:
    assert tuple(MODELS) == MODEL_CLASSES
    assert all(MODELS[name].name == name for name in MODEL_CLASSES)


@pytest.mark.parametrize("call", [build_model, megatron_inventory], ids=["build", "inventory"])
def test_an_unknown_model_class_is_refused_naming_the_classes(call: object) -> None:
    from mapgen.common.dims import ModelDims

    dims = ModelDims(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=1, num_query_groups=1,
                     kv_channels=8, vocab_size=8, max_position_embeddings=8)
    arguments = (dims, "local", "bert") if call is megatron_inventory else (dims, "bert")
    with pytest.raises(ValueError, match="model class must be one of gpt, hybrid, llava, mamba, got 'bert'"):
        call(*arguments)  # type: ignore[operator]


def test_checked_in_modules_name_their_model_class_as_its_object_does() -> None:
    """The header's `Target:` line, the MODEL table and the hybrid layer pattern of every checked-in
    target, against the target's model-class object."""
    seen = set()
    for entry in read_targets(testing.ROOT):
        if not entry.checked_in:
            continue
        head = (testing.ROOT / entry.output / "__init__.py").read_text()[:20_000]
        model = MODELS[entry.model]
        seen.add(entry.model)
        target = re.search(r"^# Target: \S+ \((\w+) layout(, \w+)?\)$", head, re.MULTILINE)
        assert target is not None, entry.name
        assert target.group(2) == (f", {model.title}" if model.title else None), entry.name
        assert f'MODEL: Final = "{entry.model}"' in head
        records_pattern = type(model).layer_pattern is not ModelClass.layer_pattern  # a class built from a pattern
        assert ("HYBRID_LAYER_PATTERN: Final = " in head) == records_pattern, entry.name
    assert seen == set(MODEL_CLASSES)  # every class has a checked-in target
