"""A vision-language model's config.json read as the config of its text model, for a text spec.

Qwen3.5 is published as the vision-language model (`Qwen3_5ForConditionalGeneration`): its
config.json holds the text model's fields under `text_config`, beside `vision_config` and the
image and video token ids, while transformers saves the text class (`Qwen3_5ForCausalLM`) with
those fields at the top level. A spec of the text class reads either: where the config's
`architectures` name a class whose config keeps the spec's architecture's config under
`text_config` (transformers' `sub_configs`), `text_view` gives the config the text class would
have: `text_config`'s fields, the other top-level fields over them (the top-level
`tie_word_embeddings` is the one transformers ties the vision-language model's head by), the
spec's architecture and `text_config`'s model_type. The top-level fields of the vision side
(`vision_config`, token ids) are then fields like any other: refused unless the spec reads or
declares them (its `config_fields`). Every field keeps its place in the file for error messages.
"""

from __future__ import annotations

from typing import Any

from mapgen.compiler.hfconfig import HFConfig

TEXT_CONFIG = "text_config"
# top-level fields that name the file's class, not the text model's
_OWN = ("architectures", "model_type", TEXT_CONFIG)


def text_architecture_of(wrapper: str, architecture: str) -> bool:
    """Whether transformers' model class `wrapper` keeps a config of `architecture`'s config
    class under its `text_config` (Qwen3_5ForConditionalGeneration of Qwen3_5ForCausalLM)."""
    import transformers

    outer = getattr(getattr(transformers, wrapper, None), "config_class", None)
    inner = getattr(getattr(transformers, architecture, None), "config_class", None)
    sub = getattr(outer, "sub_configs", None)
    found = sub.get(TEXT_CONFIG) if isinstance(sub, dict) else None
    return inner is not None and found is inner


def text_view(architecture: str, config: HFConfig) -> HFConfig:
    """`config` as `architecture`'s (a text class) when it is the config of a vision-language
    class that holds it under `text_config` (see the module docstring); otherwise `config`."""
    text = config.fields.get(TEXT_CONFIG)
    if not config.architectures or architecture in config.architectures or not isinstance(text, dict):
        return config
    if not any(text_architecture_of(wrapper, architecture) for wrapper in config.architectures):
        return config
    fields: dict[str, Any] = {**text, **{k: v for k, v in config.fields.items() if k not in _OWN}}
    fields["architectures"] = [architecture]
    if "model_type" in text:
        fields["model_type"] = text["model_type"]
    else:
        fields.pop("model_type", None)
    prefix = TEXT_CONFIG + "."
    inner = {path[len(prefix):]: loc for path, loc in config.locations.items() if path.startswith(prefix)}
    outer = {
        path: loc for path, loc in config.locations.items()
        if path.split(".", 1)[0] not in _OWN or path == "architectures"
    }
    # a top-level field stands where it is, nested fields of text_config's under it included
    replaced = {path.split(".", 1)[0] for path in outer}
    inner = {path: loc for path, loc in inner.items() if path.split(".", 1)[0] not in replaced}
    return HFConfig(config.path, fields, (architecture,), {**inner, **outer})
