"""LLaVA's check in `mapgen verify`: a LLaVAModel module's image + prompt forward pass against transformers'.

`run_llava_job` is what `mapgen verify` runs for a `llava` module. Two images and two prompts
with one image token each go through megatron-core's LLaVAModel (`forward(images, input_ids,
...)`, which puts the image's features where the token stands) and through transformers (whose
prompt holds one image token per feature); compared are the vision features (the hidden states
LLaVA reads, class token dropped), the projector's output and the language logits; then export
against the checkpoint's bytes. The stand-ins it runs on:
`mapgen.verify.llava_standin`.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch

from mapgen.verify.verdict import agree_on_logits, logit_tolerance, report_phase, same_bits

PROMPT_LENGTH = 7  # text positions, the image token included
IMAGE_POSITIONS = (2, 4)  # where each prompt of the batch has its image token


def load_reference(folder: str | Path, dtype: torch.dtype) -> Any:
    """transformers' LLaVA from the folder; every tensor of the model must come from the files
    (a published name transformers did not map would leave a randomly initialised weight)."""
    import transformers

    llava: Any = transformers.LlavaForConditionalGeneration
    model, info = llava.from_pretrained(
        str(folder), dtype=dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RuntimeError(f"transformers found no tensor in {folder} for {', '.join(missing[:5])}")
    return model.eval()


def llava_inputs(dims: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, Megatron prompts: one image token each, HF prompts: the image token once per
    image feature), seeded; text tokens are never the image token."""
    generator = torch.Generator().manual_seed(7)
    batch = len(IMAGE_POSITIONS)
    size = dims.vision_image_size
    images = torch.randn(batch, dims.vision_num_channels, size, size, generator=generator).to(dtype)
    text = torch.randint(0, dims.vocab_size - 1, (batch, PROMPT_LENGTH), generator=generator)
    text[text >= dims.image_token_index] += 1  # skip the image token's id
    features = (size // dims.vision_patch_size) ** 2 + (0 if dims.drop_vision_class_token else 1)
    megatron_ids, hf_ids = text.clone(), []
    for row, position in enumerate(IMAGE_POSITIONS):
        megatron_ids[row, position] = dims.image_token_index
        expanded = torch.cat(
            [text[row, :position], torch.full((features,), dims.image_token_index), text[row, position + 1:]]
        )
        hf_ids.append(expanded)
    return images, megatron_ids, torch.stack(hf_ids)


def megatron_outputs(chunk: Any, images: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """megatron-core's vision features (class token dropped as LLaVAModel drops it), projector
    output [batch, features, hidden] and LLaVAModel's logits [batch, sequence, vocab]."""
    model = chunk
    while not hasattr(model, "vision_model") and hasattr(model, "module"):
        model = model.module
    with torch.no_grad():
        vision = model.vision_model(images)
        if model._drop_vision_class_token:
            vision = vision[:, model.vision_model.class_token_len:, :]
        projected = model.vision_projection(vision.permute(1, 0, 2).contiguous()).permute(1, 0, 2)
        batch, seq = input_ids.shape
        positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
        combined = seq - 1 + vision.shape[1]  # each prompt's image token becomes its features
        mask = torch.triu(torch.ones(combined, combined, dtype=torch.bool), diagonal=1)[None, None]
        logits, _ = model(images, input_ids, positions, mask)
    return {"vision features": vision, "projector output": projected, "logits": logits}


def hf_outputs(model: Any, images: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same three from transformers: hidden_states[vision_feature_layer] of the tower (class
    token dropped by the 'default' strategy), the projector on them, the model's logits."""
    config = model.config
    with torch.no_grad():
        tower = model.model.vision_tower(images, output_hidden_states=True)
        vision = tower.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            vision = vision[:, 1:]
        projected = model.model.multi_modal_projector(vision)
        logits = model(input_ids=input_ids, pixel_values=images).logits
    return {"vision features": vision, "projector output": projected, "logits": logits}


def llava_layout_problems(module: Any, layout: Any) -> list[str]:
    """What a LLaVAModel module cannot run under `layout`, beyond the language model's checks:
    pipeline stages (megatron-core keeps the vision tower on the first stage, which mapgen does
    not place), and TP dividing the vision tower's heads."""
    dims, target, found = module.DIMS, module.TARGET, []
    for flag, size in (("pp", layout.pp), ("vpp", layout.vpp)):
        if size > 1:
            found.append(
                f"--{flag} {size}: {target} is a LLaVAModel, supported without pipeline parallelism only "
                "(megatron-core puts its vision tower on the first stage)"
            )
    if dims.vision_num_attention_heads % layout.tp:
        found.append(f"--tp {layout.tp} does not divide the {dims.vision_num_attention_heads} vision attention heads of {target}")
    return found


def run_llava_job(job: Any, module: Any, chunks: list[Any], converter: Any, original: Any, result: Any) -> None:
    """The rest of `jobs.run_job` for a LLaVAModel module (its model is built and imported):
    the three outputs against transformers, every rank agreeing on the verdict, then export."""
    dtype = next(chunks[0].parameters()).dtype
    vocab = module.DIMS.vocab_size
    images, megatron_ids, hf_ids = llava_inputs(module.DIMS, dtype)
    found = torch.zeros(4)  # max logit diff, max |pad logit|, tolerance, NaN seen (0/1)
    try:
        ours = megatron_outputs(chunks[0], images, megatron_ids)
        theirs = hf_outputs(load_reference(job.hf_dir, dtype), images, hf_ids)
        diffs = {}
        for name, expected in theirs.items():
            got = ours[name][..., :vocab] if name == "logits" else ours[name]
            if got.shape != expected.shape:
                raise RuntimeError(f"{name}: megatron-core gives {list(got.shape)}, transformers {list(expected.shape)}")
            diffs[name] = float((got.float() - expected.float()).abs().max())
        result.parts = diffs
        found[0] = torch.tensor(list(diffs.values())).max()  # torch.max keeps NaN, max() may drop it
        found[1] = ours["logits"][..., vocab:].float().abs().max() if ours["logits"].shape[-1] > vocab else 0.0
        found[2] = logit_tolerance(dtype, theirs["logits"].float())
    except Exception:  # noqa: BLE001 - reported below, after the collective every rank reaches
        result.error = traceback.format_exc()
        found[0] = float("inf")
    agree_on_logits(found, result, original)
    report_phase(job, "export: every tensor against the checkpoint's bytes")
    for name, tensor in converter.export():
        result.tensors += 1
        if same_bits(tensor, original.get(name)):
            result.bit_exact += 1
        else:
            result.mismatched.append(name)
    ignored = tuple(converter.hf_name(prefix) for prefix in getattr(module, "IGNORED_HF", {}))
    missing = set(original.names()) - {converter.hf_name(t.name) for t in module.HF_TENSORS}  # the files' naming
    result.mismatched += sorted(
        f"{name} (in the checkpoint, never exported)" for name in missing if not name.startswith(ignored)
    )
