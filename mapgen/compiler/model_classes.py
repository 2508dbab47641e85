"""The megatron-core model classes a module maps (gpt, hybrid, llava, mamba), one object each.

Each says what it builds, its parameter inventory, what it changes of the HF inventory, and how
modules and their checks name it.

As `mapgen.compiler.kinds` does for mapping kinds: one class per model class, registered in
`MODELS` under its name in `mapgen.common.layout.MODEL_CLASSES`. The compile driver
(`mapgen.compiler.build`), the renderer and this rank's model chunks ask the object instead of
branching on the name. DeepSeek-V3.2's DSA attention is not a model class of its own: a GPTModel
whose dims have a DSA indexer gets its layers from `mapgen.compiler.dsa_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mapgen.common.dims import ModelDims
from mapgen.common.layout import MODEL_CLASSES
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.compiler.hybrid_model import build_hybrid_model, hybrid_layer_pattern
from mapgen.compiler.inventory import gpt_inventory, hybrid_inventory
from mapgen.compiler.llava_model import build_llava_model, llava_inventory, llava_problems, published_hf_names
from mapgen.compiler.mamba_model import build_mamba_model, mamba_inventory
from mapgen.compiler.megatron_config import DTYPES

if TYPE_CHECKING:
    from mapgen.compiler.inventory import HFTensor, MegatronParam
    from mapgen.common.parallel import ParallelLayout


class ModelClass:
    """One megatron-core model class. Subclasses say what differs from megatron-core's GPTModel."""

    name: ClassVar[str]
    # the model class as a module's header and docstrings name it beside its layout ("" where
    # they name none: GPTModel, and the Mamba-hybrid model, whose spec says what it is)
    title: ClassVar[str] = ""
    # where the model keeps its GPTModel's names (LLaVAModel: under `language_model.`)
    language_prefix: ClassVar[str] = ""
    # Megatron layers per decoder layer of the dims (HybridModel: attention and MLP apart)
    layers_per_decoder_layer: ClassVar[int] = 1
    # whether `mapgen convert` reads and writes Megatron-LM checkpoints of the model
    converts: ClassVar[bool] = False
    # whether mapgen places the model's layers on virtual pipeline stages
    virtual_stages: ClassVar[bool] = True

    def build(self, dims: ModelDims, **kwargs: Any) -> Any:
        """The model on the current default device (`torch.device("meta")` for a skeleton);
        keywords as `build_gpt_model`'s."""
        return build_gpt_model(dims, **kwargs)

    def inventory(self, dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
        """Every parameter in `layout`'s names, `te_name` the te layout's GPTModel name of the
        same weights (what spec rules are written against)."""
        return gpt_inventory(dims, layout)

    def problems(self, dims: ModelDims) -> list[str]:
        """What megatron-core cannot build of these dims as this model class, said up front."""
        return []

    def hf_tensors(self, hf: tuple[HFTensor, ...], unused: Callable[[], tuple[str, ...]]) -> tuple[HFTensor, ...]:
        """The HF inventory the module maps, from transformers' (`unused`: the prefixes of the
        tensors the spec declares ignored, asked for only where this model class drops them)."""
        return hf

    def layer_pattern(self, dims: ModelDims) -> str | None:
        """megatron-core's layer pattern that the module records, where the class is built from one."""
        return None


class GPT(ModelClass):
    name = "gpt"
    converts = True


class Hybrid(ModelClass):
    """megatron-core's HybridModel of a GPT model's dims (`mapgen.compiler.hybrid_model`)."""

    name = "hybrid"
    title = "HybridModel"
    layers_per_decoder_layer = 2
    virtual_stages = False  # megatron-core sets them with '|' in the layer pattern

    def build(self, dims: ModelDims, **kwargs: Any) -> Any:
        return build_hybrid_model(dims, **kwargs)

    def inventory(self, dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
        return hybrid_inventory(dims, layout)

    def layer_pattern(self, dims: ModelDims) -> str | None:
        return hybrid_layer_pattern(dims)


class LLaVA(ModelClass):
    """megatron-core's LLaVAModel (`mapgen.compiler.llava_model`): its vision tower as published,
    without the layers past the feature layer that the spec ignores."""

    name = "llava"
    title = "LLaVAModel"
    language_prefix = "language_model."

    def build(self, dims: ModelDims, **kwargs: Any) -> Any:
        return build_llava_model(dims, **kwargs)

    def inventory(self, dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
        return llava_inventory(dims, layout)

    def problems(self, dims: ModelDims) -> list[str]:
        return llava_problems(dims)

    def hf_tensors(self, hf: tuple[HFTensor, ...], unused: Callable[[], tuple[str, ...]]) -> tuple[HFTensor, ...]:
        # the tower's layers past the feature layer, and its post-norm, are built by transformers
        # but read by nothing: the spec declares them ignored (IGNORED_HF), not mapped
        ignored = unused()
        return tuple(t for t in published_hf_names(hf) if not t.name.startswith(ignored))


class Mamba(ModelClass):
    """megatron-core's Mamba-hybrid model of Nemotron-H (`mapgen.compiler.mamba_model`)."""

    name = "mamba"
    converts = True

    def build(self, dims: ModelDims, **kwargs: Any) -> Any:
        return build_mamba_model(dims, **kwargs)

    def inventory(self, dims: ModelDims, layout: str) -> tuple[MegatronParam, ...]:
        return mamba_inventory(dims, layout)


MODELS: dict[str, ModelClass] = {cls.name: cls() for cls in (GPT, Hybrid, LLaVA, Mamba)}
assert tuple(MODELS) == MODEL_CLASSES, "one class per model class of mapgen.common.layout.MODEL_CLASSES"


def model_class(name: str) -> ModelClass:
    """The model class called `name`; a ValueError naming the classes for any other."""
    if name not in MODELS:
        raise ValueError(f"model class must be one of {', '.join(MODEL_CLASSES)}, got {name!r}")
    return MODELS[name]


def megatron_inventory(dims: ModelDims, layout: str, model: str = "gpt") -> tuple[MegatronParam, ...]:
    """Every parameter of the model class in `layout`'s names; `te_name` is always the te layout's
    name of the GPTModel parameter that holds the same weights, so one set of spec rules serves
    both layouts and every model class of a family."""
    return model_class(model).inventory(dims, layout)


def build_model(dims: ModelDims, model: str = "gpt", **kwargs: Any) -> Any:
    """The model of the module's model class (keywords as `build_gpt_model`'s)."""
    return model_class(model).build(dims, **kwargs)


def _params_in(model: Any, dtype: torch.dtype) -> None:
    """Every parameter in `dtype`, as Megatron-LM's mixed-precision wrapper (`Float16Module`)
    holds them: the local spec's torch norms are built in float32 whatever `params_dtype` says.
    Buffers keep their dtype (the router's expert_bias stays float32, as megatron-core keeps it)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def build_model_chunks(
    dims: ModelDims,
    layout: ParallelLayout,
    params_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    model: str = "gpt",
) -> list[Any]:
    """This rank's model chunks (one per virtual pipeline stage) under initialised groups;
    `vocab_size` as in `build_gpt_model`."""
    from megatron.core import parallel_state

    chunks = []
    for vp_stage in range(layout.vpp):
        stage = vp_stage if layout.vpp > 1 else None
        chunk = build_model(
            dims,
            model,
            params_dtype=params_dtype,
            layout=layout,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            vocab_size=vocab_size,
        )
        _params_in(chunk, params_dtype or DTYPES[dims.params_dtype])
        chunk.eval()
        chunks.append(chunk)
    return chunks
