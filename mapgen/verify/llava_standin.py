"""LLaVA stand-ins: a tiny random `LlavaForConditionalGeneration` saved under the published checkpoint's names.

A stand-in has a CLIP vision tower, the MLP projector and a Llama language model. transformers 5
saves the tower as `vision_tower.*`, the published LLaVA-1.5 checkpoints (and transformers 4) as
`vision_tower.vision_model.*`, which transformers 5 loads through CLIPVisionModel's
`PrefixChange`; `save_llava_standin` writes the published names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TOWER_SAVED = "vision_tower."
TOWER_PUBLISHED = "vision_tower.vision_model."


def tiny_llava_config(**overrides: Any) -> Any:
    """A few-layer LLaVA of the published one's shape: a CLIP tower of 3 layers (the last unused:
    vision_feature_layer -2), 42x42 images of 14x14 patches (9 features per image), a Llama
    language model with multi-head attention (as Vicuna-7B), untied, image token inside the
    vocabulary (as 32000 of 32064)."""
    import transformers

    text = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=42,
        patch_size=14, projection_dim=16,
    )
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    fields: dict[str, Any] = dict(
        text_config=text, vision_config=vision, image_token_index=120, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
        vocab_size=text["vocab_size"],
    )
    fields.update(overrides)
    return transformers.LlavaConfig(**fields)


def standin_llava_config(fields: dict[str, Any], vocab_size: int = 128) -> dict[str, Any]:
    """The tiny config of a published LLaVA config: its own fields, the sizes of
    `tiny_llava_config` (multi-head or grouped-query attention as the original has it), in float32."""
    text = dict(fields.get("text_config") or {})
    heads = int(text.get("num_attention_heads") or 32)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    tiny = tiny_llava_config(
        text_config=dict(num_key_value_heads=4 if kv_heads == heads else 1 if kv_heads == 1 else 2, vocab_size=vocab_size),
        image_token_index=min(int(fields.get("image_token_index", 120)), vocab_size - 8),
        vision_feature_layer=fields.get("vision_feature_layer", -2),
        vision_feature_select_strategy=fields.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=fields.get("projector_hidden_act", "gelu"),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
        vocab_size=vocab_size,
    )
    out: dict[str, Any] = tiny.to_diff_dict()
    out["dtype"] = "float32"
    return out


def publish_names(folder: Path) -> None:
    """Rename the vision tower's tensors of a transformers 5 save in `folder` to the published
    `vision_tower.vision_model.*` (every shard file, and the index if there is one)."""
    from safetensors.torch import load_file, save_file

    def published(name: str) -> str:
        if name.startswith(TOWER_SAVED) and not name.startswith(TOWER_PUBLISHED):
            return TOWER_PUBLISHED + name[len(TOWER_SAVED):]
        return name

    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        save_file({published(n): t for n, t in tensors.items()}, file, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {published(n): f for n, f in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def save_llava_standin(
    folder: Path, seed: int = 0, *, config: Any = None, dtype: torch.dtype = torch.float32
) -> Any:
    """A random LLaVA (norms too, so no weight is trivially 1) saved in `dtype` with the
    published names; returns the float32 model."""
    import transformers

    llava: Any = transformers.LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = llava(config or tiny_llava_config()).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("class_embedding"):
                param.copy_(torch.randn_like(param))
    saved = model
    if dtype != torch.float32:
        saved = llava(model.config).to(dtype)
        saved.load_state_dict(model.state_dict())
        saved.config.dtype = dtype
    saved.eval()
    saved.save_pretrained(folder)
    publish_names(folder)
    return model.eval()
