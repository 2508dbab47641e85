"""megatron-core's LLaVAModel from a LLaVA model's dims, and its parameter inventory.

The model (local layer specs, CPU or `meta`): megatron-core's `LLaVAModel` with

- `vision_model`: its `CLIPViTModel` (subtype `clip`: a bias-free patch convolution `conv1`, a
  `class_token`, learned `position_embeddings`, the pre-norm `ln_pre`, no post-norm) over
  `vision_num_layers` layers of megatron-core's local ViT layer (LayerNorm with biases, q/k/v and
  MLP biases, quick_gelu). HF LLaVA takes the vision features from `hidden_states
  [vision_feature_layer]`: with -2, the output of the second-to-last of CLIP's 24 layers, before
  CLIP's `post_layernorm`. The tower is therefore built with the 23 layers LLaVA uses, and CLIP's
  last layer and post-norm are HF tensors nothing reads (the spec declares them ignored).
  `vision_feature_select_strategy: default` drops the class token: `drop_vision_class_token`.
  megatron-core 0.16.1's local ViT layer spec asks for a causal attention mask (its
  TransformerEngine spec, and 0.19's local spec, for none); CLIP's attention is bidirectional,
  so the local spec is used with `no_mask`, which changes no parameter.
- `vision_projection`: its `MultimodalProjector` of type `mlp` (`encoder.linear_fc1`, gelu,
  `encoder.linear_fc2`, with biases): HF's `multi_modal_projector.linear_1/linear_2`.
- `language_model`: a GPTModel as `build_gpt_model` makes it (rope, the local layer spec).

Vision and language are split over the same TP group. Pipeline parallelism is not supported:
megatron-core's LLaVAModel puts the vision tower and projector on the first stage only
(`add_encoder`), and mapgen's runtime places layers by the language model's offsets; a module
of this model refuses PP > 1 before any collective (`mapgen.runtime.drivers`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from mapgen.common.dims import ModelDims
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.cpu_layers import cuda_device_on_cpu
from mapgen.compiler.inventory import skeleton_params, to_te_layout
from mapgen.compiler.megatron_config import DTYPES, transformer_config
from mapgen.compiler.parallel_state import single_process_parallel_state

if TYPE_CHECKING:
    from mapgen.compiler.inventory import HFTensor, MegatronParam

# HF CLIP's vision tower as published (transformers 4.x): `vision_tower.vision_model.*`.
# transformers 5 loads that through `PrefixChange(prefix_to_remove="vision_model")` of
# CLIPVisionModel (its conversion_mapping.py) but its `save_pretrained` writes the tower without
# the `vision_model.` level; the module maps the published names, which transformers 5 reads.
_SAVED_TOWER = "vision_tower."
_PUBLISHED_TOWER = "vision_tower.vision_model."

_VISION_LAYER = re.compile(r"^vision_model\.decoder\.layers\.(\d+)\.")
_LANGUAGE_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


def published_hf_names(hf: tuple[HFTensor, ...]) -> tuple[HFTensor, ...]:
    """The HF inventory (transformers 5's save names) with the vision tower under its published
    `vision_tower.vision_model.` prefix."""
    return tuple(
        replace(t, name=_PUBLISHED_TOWER + t.name[len(_SAVED_TOWER):])
        if t.name.startswith(_SAVED_TOWER) and not t.name.startswith(_PUBLISHED_TOWER)
        else t
        for t in hf
    )


def llava_problems(dims: ModelDims) -> list[str]:
    """What megatron-core's LLaVAModel cannot build of these dims, said up front."""
    found: list[str] = []
    if not dims.vision:
        found.append("a LLaVAModel needs the vision tower's dims (vision_num_layers and the rest)")
    if dims.num_moe_experts is not None or dims.multi_latent_attention or dims.sliding_window is not None:
        found.append("mapgen's LLaVAModel has a dense Llama-like language model only")
    return found


def vision_config(dims: ModelDims, params_dtype: torch.dtype, layout: ParallelLayout) -> Any:
    """The vision tower's TransformerConfig: the language model's precision and layout, CLIP's
    sizes, LayerNorm, biases everywhere, quick_gelu (megatron-core's own), no GLU."""
    from megatron.core.activations import quick_gelu

    assert dims.vision_num_layers is not None
    vision_dims = replace(
        dims,
        num_layers=dims.vision_num_layers,
        hidden_size=dims.vision_hidden_size,
        ffn_hidden_size=dims.vision_ffn_hidden_size,
        num_attention_heads=dims.vision_num_attention_heads,
        num_query_groups=dims.vision_num_attention_heads,
        kv_channels=dims.vision_kv_channels,
        layernorm_epsilon=dims.vision_layernorm_epsilon,
        normalization="LayerNorm",
        activation="gelu",  # replaced below: ModelDims has no quick_gelu for language models
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        qk_layernorm=False,
    )
    config = transformer_config(vision_dims, params_dtype, replace(layout, pp=1, vpp=1, first_stage_layers=None, last_stage_layers=None))
    config.activation_func = quick_gelu if dims.vision_activation == "quick_gelu" else torch.nn.functional.gelu
    config.vision_model_type = "clip"
    return config


def projection_config(dims: ModelDims, params_dtype: torch.dtype, layout: ParallelLayout) -> Any:
    """The projector's TransformerConfig: an MLP from the vision width to the language width
    (fc1: vision -> language, gelu, fc2: language -> language), with biases."""
    projector_dims = replace(
        dims,
        num_layers=1,
        ffn_hidden_size=dims.hidden_size,
        activation=dims.projector_activation,
        gated_linear_unit=False,
        add_bias_linear=True,
    )
    return transformer_config(projector_dims, params_dtype, replace(layout, pp=1, vpp=1, first_stage_layers=None, last_stage_layers=None))


def _vision_layer_spec() -> Any:
    """megatron-core's local ViT layer with CLIP's bidirectional attention (see module doc)."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params, "attn_mask_type": AttnMaskType.no_mask}
    return spec


@contextmanager
def _tensor_cuda_on_cpu() -> Iterator[None]:
    """CLIPViTModel moves its position ids with `.cuda()` when built; without CUDA they stay."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


@contextmanager
def _local_pre_norm() -> Iterator[None]:
    """Without TransformerEngine, CLIPViTModel's default pre-norm is torch's LayerNorm, which
    its own `build_module(..., config=...)` cannot build; megatron-core's local norm
    (WrappedTorchNorm: a torch LayerNorm of the config's epsilon, the same `ln_pre.weight` and
    `ln_pre.bias`) stands in, as its local layers use."""
    import importlib.util

    import megatron.core.models.multimodal.llava_model as llava

    if importlib.util.find_spec("transformer_engine") is not None:
        yield
        return
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = llava.CLIPViTModel

    class LocalNormCLIPViTModel(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("ln_pre_impl", WrappedTorchNorm)
            kwargs.setdefault("ln_post_impl", WrappedTorchNorm)
            super().__init__(*args, **kwargs)

    LocalNormCLIPViTModel.__name__ = LocalNormCLIPViTModel.__qualname__ = original.__name__  # its module kind
    llava.CLIPViTModel = LocalNormCLIPViTModel
    try:
        yield
    finally:
        llava.CLIPViTModel = original


def build_llava_model(
    dims: ModelDims,
    *,
    params_dtype: torch.dtype | None = None,
    layout: ParallelLayout | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    vocab_size: int | None = None,
) -> Any:
    """megatron-core's LLaVAModel (see module doc) on the current default device."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from mapgen.common.errors import MapgenError

    if problems := llava_problems(dims):
        raise MapgenError("; ".join(problems))
    layout = layout or ParallelLayout()
    if layout.pp > 1 or layout.vpp > 1 or vp_stage is not None:
        raise MapgenError(
            "a LLaVAModel is supported without pipeline parallelism only: megatron-core puts its "
            "vision tower on the first stage, which mapgen's placement does not follow"
        )
    dtype = params_dtype or DTYPES[dims.params_dtype]
    language = transformer_config(dims, dtype, layout)
    with warnings.catch_warnings(), cuda_device_on_cpu(), _tensor_cuda_on_cpu(), _local_pre_norm():
        warnings.simplefilter("ignore")
        return LLaVAModel(
            language_transformer_config=language,
            language_transformer_layer_spec=get_gpt_decoder_block_spec(
                language, use_transformer_engine=False, normalization=dims.normalization
            ),
            language_vocab_size=vocab_size or dims.vocab_size,
            language_max_sequence_length=dims.max_position_embeddings,
            vision_transformer_config=vision_config(dims, dtype, layout),
            vision_transformer_layer_spec=_vision_layer_spec(),
            drop_vision_class_token=dims.drop_vision_class_token,
            vision_projection_config=projection_config(dims, dtype, layout),
            vision_projection_layer_spec=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            vision_projection_type="mlp",
            parallel_output=False,
            share_embeddings_and_output_weights=dims.share_embeddings_and_output_weights,
            language_position_embedding_type="rope",
            language_rotary_percent=dims.rotary_percent,
            pre_process=pre_process,
            post_process=post_process,
            add_encoder=pre_process,
            add_decoder=True,
            img_h=dims.vision_image_size,
            img_w=dims.vision_image_size,
            patch_dim=dims.vision_patch_size,
            language_rotary_base=int(dims.rotary_base),
            language_rope_scaling=dims.rope_type == "llama3",
            language_rope_scaling_factor=dims.rope_scaling_factor or 8.0,
            image_token_index=dims.image_token_index,
        )


def llava_inventory(dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
    """Every parameter of the LLaVAModel in `layout`'s names, from a megatron-core LLaVAModel
    skeleton on `meta` with one vision and one language layer, each copied to every layer
    (`tests/test_llava.py` checks this against a whole build). Language layers carry their
    index (`layer`, which places them); the vision tower and projector carry none: they live
    with the embedding, on the first stage. `te_name` is the te layout's name (the local norms
    fused into their TE linears, as `to_te_layout` does for GPTModel)."""
    assert dims.vision_num_layers is not None
    skeleton_dims = replace(dims, num_layers=1, vision_num_layers=1)
    with single_process_parallel_state(), torch.device("meta"):
        skeleton = build_llava_model(skeleton_dims)
    towers = (
        (_VISION_LAYER, dims.vision_num_layers, "vision_model.decoder.layers.", False),
        (_LANGUAGE_LAYER, dims.num_layers, "language_model.decoder.layers.", True),
    )
    local: list[MegatronParam] = []
    pending: list[MegatronParam] = []  # the skeleton layer being read, of tower `current`
    current: tuple[re.Pattern[str], int, str, bool] | None = None

    def flush() -> None:
        if current is None:
            return
        pattern, count, prefix, indexed = current
        for index in range(count):  # layer by layer, each in the skeleton layer's order
            local.extend(
                replace(p, name=pattern.sub(f"{prefix}{index}.", p.name, count=1), layer=index if indexed else None)
                for p in pending
            )
        pending.clear()

    for param in skeleton_params(skeleton, dims.params_dtype):
        tower = next((t for t in towers if t[0].match(param.name)), None)
        if tower is not current:
            flush()
            current = tower
        if tower is None:
            local.append(replace(param, layer=None))
        else:
            pending.append(param)
    flush()
    te = to_te_layout(tuple(local))
    te = tuple(
        replace(p, module_kind="ColumnParallelLinear") if p.name == "language_model.output_layer.weight" else p for p in te
    )
    if layout == "te":
        return tuple(replace(p, te_name=p.name) for p in te)
    return tuple(replace(p, te_name=t.name) for p, t in zip(local, te))
