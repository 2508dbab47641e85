"""Stand-ins in the layout of a published vision-language checkpoint whose text model a text spec reads.

Qwen3.5 is published as the vision-language model (`Qwen3_5ForConditionalGeneration`,
`Qwen3_5MoeForConditionalGeneration`): config.json nests the text model's fields under
`text_config`, the tensors are `model.language_model.*`, `model.visual.*` (the vision tower and
merger), `lm_head.weight` (untied models) and the multi-token-prediction layer's `mtp.*`, which
transformers does not build. `save_published_standin` writes that layout as transformers writes
it: the text model's stand-in (`testing.save_standin` of its text config, MTP layer included,
saved before) is loaded into a tiny vision-language model of the class the config names (a one-block vision tower
of random weights), which transformers saves (`save_pretrained`: names and config.json are
transformers' own); the MTP tensors are then added under their published names. The MoE
models' decoder experts are then stacked as the published checkpoints store them (transformers
5.25 saves each expert one tensor), the MTP layer's left one tensor each.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

# the vision tower of a stand-in: one block, small widths; the rest is the published config's
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16, patch_size=4)
# fields of a config.json that say what wrote it, not what the model is
_FILE_FIELDS = ("architectures", "model_type", "transformers_version", "text_config", "vision_config")
LANGUAGE_MODEL = "model.language_model."  # the published prefix of the text model's model.*

# vision-language configs whose text model a text spec reads (Qwen3.5): model_type -> (text
# model_type, class). Their stand-in is in the published layout (`save_published_standin`), made
# from the stand-in of the text model, as transformers saves the text class (flat fields,
# tensors model.layers.*)
TEXT_MODELS = {
    "qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
}


def text_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A `TEXT_MODELS` config's text model config (its text_config, with the top-level
    tie_word_embeddings); any other config as it is."""
    text = fields.get("text_config")
    if fields.get("model_type") not in TEXT_MODELS or not isinstance(text, dict):
        return fields
    model_type, architecture = TEXT_MODELS[fields["model_type"]]
    tied = fields.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return {**text, "architectures": [architecture], "model_type": model_type, "tie_word_embeddings": tied}


def published_name(name: str) -> str:
    """A text model's tensor (as transformers saves the text class) in the published naming."""
    return LANGUAGE_MODEL + name[len("model."):] if name.startswith("model.") else name


def save_published_standin(
    fields: dict[str, Any],
    text_folder: Path,
    folder: Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    stacked: bool = True,
) -> Any:
    """Save a random tiny stand-in of the published vision-language config `fields` into
    `folder` in its published layout (see the module docstring), made from the stand-in of its
    text model (`text_model_fields`) saved in `text_folder`; returns the model.
    `stacked`: the decoder layers' experts stacked, as the published MoE checkpoints store them
    (`stack_decoder_experts`), the MTP layer's one tensor each; False: every expert one tensor
    each, as transformers saves the vision-language class."""
    import transformers
    from safetensors.torch import load_file, save_file

    text_config = json.loads((text_folder / "config.json").read_text())
    text: dict[str, torch.Tensor] = {}
    for file in sorted(text_folder.glob("*.safetensors")):
        text.update(load_file(str(file)))
    text_fields = {k: v for k, v in text_config.items() if k not in ("architectures", "transformers_version")}
    vision = dict(fields.get("vision_config") or {})
    vision.pop("model_type", None)  # the published file names the outer model_type here; transformers its own
    vision.update(TINY_VISION, out_hidden_size=text_fields["hidden_size"])
    top = {k: v for k, v in fields.items() if k not in _FILE_FIELDS}
    top.update(tie_word_embeddings=text_fields.get("tie_word_embeddings", False))
    top.pop("torch_dtype", None)
    top.pop("dtype", None)
    config = transformers.AutoConfig.for_model(fields["model_type"], text_config=text_fields, vision_config=vision, **top)
    architecture = fields["architectures"][0]
    main = {published_name(n): t for n, t in text.items() if not n.startswith("mtp.")}
    with tempfile.TemporaryDirectory() as scratch:
        # transformers reads the text model's tensors into the vision-language class (its own
        # conversion stacks the experts in memory); the vision tower, absent, is drawn
        config.save_pretrained(scratch)
        save_file(main, str(Path(scratch) / "model.safetensors"), metadata={"format": "pt"})
        torch.manual_seed(seed)
        model, info = getattr(transformers, architecture).from_pretrained(scratch, dtype=torch.float32, output_loading_info=True)
    left = [n for n in info["missing_keys"] if not n.startswith("model.visual.")]
    if left or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise ValueError(
            f"the text stand-in does not fill {architecture}: missing {left[:3]}, unexpected "
            f"{sorted(info['unexpected_keys'])[:3]}, mismatched {list(info.get('mismatched_keys') or [])[:3]}"
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.visual.") and ("norm" in name or name.endswith("bias")):
                param.add_(torch.randn_like(param) * 0.1)
            if dtype != torch.float32:
                param.data = param.data.to(dtype)
    if dtype != torch.float32:
        model.config.dtype = dtype
    model.eval()
    model.save_pretrained(folder)
    saved: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(str(file)))
        file.unlink()
    for file in folder.glob("model.safetensors.index.json"):
        file.unlink()
    saved.update({n: t for n, t in text.items() if n.startswith("mtp.")})
    if stacked:
        saved = stack_decoder_experts(saved)
    save_file(saved, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model


_DECODER_EXPERT = re.compile(r"^(model\.language_model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")


def stack_decoder_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each decoder layer's experts stacked as the published Qwen3.5-MoE
    checkpoints store them (transformers' in-memory layout): `experts.gate_up_proj` [E, 2I, H]
    (expert e's gate rows, then its up rows) and `experts.down_proj` [E, H, I]; the MTP
    layer's experts (`mtp.layers.*`) stay one tensor each."""
    grouped: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = _DECODER_EXPERT.match(name)
        if match is None:
            out[name] = tensor
        else:
            grouped.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = tensor
    for prefix, parts in grouped.items():
        count = 1 + max(e for e, _ in parts)
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat((parts[(e, "gate")], parts[(e, "up")])) for e in range(count)])
        out[prefix + "down_proj"] = torch.stack([parts[(e, "down")] for e in range(count)])
    return out
