"""Every HF tensor of a model as `save_pretrained` writes it, read from transformers' own model class.

A model of the architecture on the `meta` device, its in-memory tensors converted back to the
names and shapes on disk by transformers' own `revert_weight_conversion`; which tensors
transformers keeps in float32; and which config class reads a config of a model type
transformers does not know.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mapgen.compiler.inventory import HFTensor


def keep_float32(model: Any, name: str) -> tuple[str, ...]:
    """The dtypes in which transformers loads tensor `name` of `model` in float32: its
    `_keep_in_fp32_modules_strict` patterns in bfloat16 and float16, its `_keep_in_fp32_modules`
    in float16 only, each matched as transformers' loader matches them (`re.search` of the
    pattern with `*` read as `.*`, on the tensor's name)."""
    found: list[str] = []
    strict = sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    loose = sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
    if any(re.search(pattern.replace("*", ".*"), name) for pattern in strict):
        found += ["bfloat16", "float16"]
    elif any(re.search(pattern.replace("*", ".*"), name) for pattern in loose):
        found.append("float16")
    return tuple(found)


def architecture_model_type(architecture: str) -> str | None:
    """The `model_type` of the config class transformers' `architecture` is built from; None
    if transformers has no such class."""
    import transformers

    try:
        model_class = getattr(transformers, architecture, None)
    except Exception:  # a lazily imported class whose module fails to import
        return None
    model_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None


def own_config_class(architecture: str, fields: dict[str, Any]) -> bool:
    """Whether a config of a model_type transformers does not know is `architecture`'s under
    another name: its `architectures` name the class and its `auto_map` names the checkpoint's
    own copy of the class's config class, by that class's name (Kimi-K2: model_type kimi_k2,
    DeepseekV3ForCausalLM, configuration_deepseek.DeepseekV3Config). transformers' config class
    of the architecture then reads it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return False
    architectures = fields.get("architectures")
    auto_map = fields.get("auto_map")
    own = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
    try:
        config_class = getattr(getattr(transformers, architecture, None), "config_class", None)
    except Exception:  # a lazily imported class whose module fails to import
        return False
    return (
        isinstance(architectures, list) and architecture in architectures and isinstance(own, str)
        and isinstance(config_class, type) and own.rsplit(".", 1)[-1] == config_class.__name__
    )


def hf_inventory(
    architecture: str,
    config_fields: dict[str, Any],
    stacked_experts: bool = False,
    extra_layers: tuple[int, ...] = (),
) -> tuple[HFTensor, ...]:
    """The tensors `save_pretrained` writes for this architecture and config, in model order.

    transformers 5 holds some weights differently in memory than on disk (MoE experts fused as
    `experts.gate_up_proj` [E, 2I, H] in memory, one tensor per expert on disk); its own
    `revert_weight_conversion`, which `save_pretrained` calls, gives the names on disk. Each
    layer's converted tensors stand, in natural order (by expert), where the first of them stood
    in memory. With `stacked_experts`, the in-memory names are the checkpoint's (a checkpoint
    that stores the experts stacked, as transformers holds them).

    `extra_layers`: decoder layers past the config's `num_hidden_layers` that the checkpoint
    holds but the architecture does not build (DeepSeek-V3's multi-token-prediction layer);
    their tensors are those of transformers' own decoder layer of that number, in a model built
    with enough layers to have it, in model order.

    Each call of `revert_weight_conversion` walks every module of the model, so it is called
    once per *kind* of decoder layer (the same tensor names and shapes but for the layer index),
    not once per layer: another layer of the kind gets the kind's result with its own index
    (`_convert_groups`); the build stays linear in the number of layers."""
    import transformers

    model_type = config_fields.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("config has no 'model_type'")
    fields = {k: v for k, v in config_fields.items() if k not in ("model_type", "quantization_config")}
    num_layers: Any = fields.get("num_hidden_layers")
    if extra_layers:
        if not isinstance(num_layers, int) or min(extra_layers) < num_layers:
            raise ValueError(f"extra decoder layers {extra_layers} must come after the {num_layers} the config has")
        fields["num_hidden_layers"] = max(extra_layers) + 1
        for key in ("layer_types", "mlp_layer_types"):  # per-layer lists (DeepSeek-V3.2's): the extra
            kinds = fields.get(key)  # layers are of the last layer's kind, as megatron-core builds MTP layers
            if isinstance(kinds, list) and kinds and len(kinds) == num_layers:
                fields[key] = kinds + [kinds[-1]] * (fields["num_hidden_layers"] - num_layers)
    model_class = getattr(transformers, architecture)
    if own_config_class(architecture, config_fields):  # read by transformers' copy of its class
        hf_config = model_class.config_class(**fields)
    else:
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = model_class._from_config(hf_config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not getattr(hf_config, "tie_word_embeddings", False):
        tied = set()
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    if extra_layers:
        kept, built = set(extra_layers), int(num_layers)

        def wanted(name: str) -> bool:
            layer = HF_LAYER.match(name)
            return layer is None or int(layer.group(2)) < built or int(layer.group(2)) in kept

        state = {k: v for k, v in state.items() if wanted(k)}
    groups: dict[str, dict[str, torch.Tensor]] = {}  # by decoder layer: converted together
    for name, tensor in state.items():
        layer = HF_LAYER.match(name)
        groups.setdefault(layer.group(0) if layer else name, {})[name] = tensor
    found: list[HFTensor] = []
    conversion = _LayerConversion(model)
    for key, group in groups.items():
        on_disk = {n: tuple(t.shape) for n, t in group.items()} if stacked_experts else conversion.on_disk(key, group)
        converted = sorted((n for n in on_disk if n not in group), key=_natural)
        for name in group:
            if name in on_disk:
                found.append(HFTensor(name, on_disk[name], keep_float32(model, name)))
            else:  # what the in-memory tensors became, where the first of them stood
                found.extend(HFTensor(n, on_disk[n], keep_float32(model, n)) for n in converted)
                converted = []
    return tuple(found)


HF_LAYER = re.compile(r"^(.*?\.layers\.)(\d+)(\.)")


_Shapes = dict[str, tuple[int, ...]]


class _LayerConversion:
    """`revert_weight_conversion` of one group of `model`'s tensors (a decoder layer's, or one
    tensor outside the layers), as names and shapes on disk, computed once per kind of layer: a
    layer whose tensors have the names and shapes of an earlier layer's but for its index gets
    the earlier layer's result with its own prefix. A result that does not keep the layer's
    prefix on every name is not reused (each such layer is converted by itself)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: dict[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], tuple[str, _Shapes] | None] = {}

    def on_disk(self, key: str, group: dict[str, torch.Tensor]) -> _Shapes:
        from transformers.core_model_loading import revert_weight_conversion

        def convert() -> _Shapes:
            return {n: tuple(t.shape) for n, t in revert_weight_conversion(self.model, group).items()}

        layer = HF_LAYER.match(key)
        if layer is None or key != layer.group(0):  # not a decoder layer's group
            return convert()
        prefix = key
        shape_key = tuple((n[len(prefix):], tuple(t.shape)) for n, t in group.items())
        kind = (layer.group(1), shape_key)
        if kind in self.cache:
            cached = self.cache[kind]
            if cached is not None:
                template_prefix, template = cached
                return {prefix + n[len(template_prefix):]: shape for n, shape in template.items()}
            return convert()
        result = convert()
        keeps_prefix = all(n.startswith(prefix) for n in result)
        self.cache[kind] = (prefix, result) if keeps_prefix else None
        return result


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders `experts.2` before `experts.10`."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)
