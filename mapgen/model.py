"""Build the megatron-core model a generated module maps into: its TransformerConfig and this
rank's model chunks, under the parallel layout megatron-core's `parallel_state` holds.

    from megatron.core import parallel_state
    import mapgen

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    chunks = mapgen.build_model(module)                      # local spec: runs on CPU
    chunks = mapgen.build_model(module, spec="te", dtype=torch.bfloat16,
                                recompute_granularity="selective")   # TransformerEngine (GPU)

Everything the module's DIMS decide (layers, widths, heads, MoE, MLA, MTP, the attention
variants) and the parallel sizes come from the module and `parallel_state`; the vocabulary is
padded as Megatron-LM pads it (`make_vocab_size_divisible_by`, 128 by default, times TP). Any
other TransformerConfig field may be given (dtype, recompute, fusions, dropout, the MoE
dispatcher and aux loss); one the module decides is refused, named, unless it has the value the
module gives it. The chunks' parameters have exactly the module's names and shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from mapgen.common.errors import MapgenError

SPECS = ("local", "te")
# TransformerConfig fields a run chooses although the builders set them (training choices)
_RUN_FIELDS = frozenset({
    "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_token_dispatcher_type", "moe_router_dtype",
    "deterministic_mode", "hidden_dropout", "attention_dropout", "use_cpu_initialization", "masked_softmax_fusion",
    "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
    "sequence_parallel",
})
_DTYPE_FIELDS = frozenset({"params_dtype", "bf16", "fp16", "pipeline_dtype"})
_LAYOUT_FIELDS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size",
})


def current_layout() -> Any:
    """The parallel layout megatron-core's `parallel_state` is initialised for (a ParallelLayout)."""
    from megatron.core import parallel_state as ps

    from mapgen.common.parallel import ParallelLayout

    if not ps.model_parallel_is_initialized():
        raise MapgenError(
            "megatron-core's parallel state is not initialised: call torch.distributed.init_process_group and "
            "megatron.core.parallel_state.initialize_model_parallel(...) first (on one process: "
            "mapgen.model.init_single_process())"
        )
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    return ParallelLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        vpp=vpp,
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
    )


def init_single_process() -> None:
    """A world of one process and megatron-core's parallel state for it (TP = PP = EP = 1), for a
    script run without a launcher."""
    from mapgen.compiler.parallel_state import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    from mapgen.compiler.megatron_config import DTYPES

    if value not in DTYPES:
        raise MapgenError(f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, not {value!r}")
    return DTYPES[value]


def _options(module: Any, spec: str, overrides: dict[str, Any]) -> Any:
    """The build options after checking `spec` against the module and each override against what
    the module decides."""
    from mapgen.compiler.megatron_config import BuildOptions, architecture_fields, building, transformer_config

    if spec not in SPECS:
        raise MapgenError(f"spec must be one of {', '.join(SPECS)}, not {spec!r}")
    layout = getattr(module, "LAYOUT", None)
    if layout != spec:
        raise MapgenError(
            f"{module.TARGET} maps the {layout} layout's parameter names; build its model with spec={layout!r}, or "
            f"build a module for the {spec} layout (mapgen build SPEC CONFIG -o OUT --layout {spec})"
        )
    if spec == "te":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise MapgenError(
                "spec='te' builds TransformerEngine layers, and transformer_engine does not import here; on a "
                "machine without it (a CPU), build a --layout local module and its model with spec='local'"
            )
        if getattr(module, "MODEL", "gpt") != "gpt":
            raise MapgenError(f"spec='te' builds GPTModel only; {module.TARGET} is a {module.MODEL} module")
    for name in sorted(set(overrides) & (_DTYPE_FIELDS | _LAYOUT_FIELDS)):
        where = "dtype=" if name in _DTYPE_FIELDS else "megatron-core's parallel_state"
        raise MapgenError(f"{name} is set from {where}, not given as a TransformerConfig field")
    with building(BuildOptions(spec)):
        decided = vars(transformer_config(module.DIMS, None, current_layout()))
    architecture = set(architecture_fields(module.DIMS)) - _RUN_FIELDS
    for name, value in sorted(overrides.items()):
        if name not in decided:
            raise MapgenError(f"{name} is not a field of megatron-core's TransformerConfig")
        if name in architecture and decided[name] != value:
            raise MapgenError(
                f"{name}={value!r} would change the model {module.TARGET} maps ({name} is {decided[name]!r} there, "
                "from its DIMS); build a module from a config that says so instead"
            )
    return BuildOptions(spec, dict(overrides))


def model_config(module: Any, *, spec: str = "local", dtype: torch.dtype | str | None = None, **overrides: Any) -> Any:
    """The TransformerConfig (MLATransformerConfig for multi-latent attention) of the module's
    model under the current parallel layout, with `overrides` (see the module doc)."""
    from mapgen.compiler.megatron_config import building, transformer_config

    options = _options(module, spec, overrides)
    with building(options):
        return transformer_config(module.DIMS, _dtype(dtype), current_layout())


def padded_vocab_size(module: Any, make_vocab_size_divisible_by: int = 128) -> int:
    """The embedding's rows as Megatron-LM pads them under the current TP size."""
    from mapgen.runtime.vocab import padded_vocab_size as padded

    return padded(module.DIMS.vocab_size, make_vocab_size_divisible_by, current_layout().tp)


def build_model(
    module: Any,
    *,
    spec: str = "local",
    dtype: torch.dtype | str | None = None,
    make_vocab_size_divisible_by: int = 128,
    **overrides: Any,
) -> list[Any]:
    """This rank's model chunks (one per virtual pipeline stage, in stage order) of the model
    `module` maps, on the CPU for `spec="local"` (move them with `.cuda()`, or build under
    `torch.device("cuda")`), in `dtype` (default: the module's `DIMS.params_dtype`)."""
    from mapgen.compiler.megatron_config import building
    from mapgen.compiler.model_classes import build_model_chunks

    if isinstance(make_vocab_size_divisible_by, bool) or not isinstance(make_vocab_size_divisible_by, int) or make_vocab_size_divisible_by < 1:
        raise MapgenError(f"make_vocab_size_divisible_by must be a positive integer, not {make_vocab_size_divisible_by!r}")
    options = _options(module, spec, overrides)
    layout = current_layout()
    with building(options):
        return build_model_chunks(
            module.DIMS, layout, params_dtype=_dtype(dtype), model=getattr(module, "MODEL", "gpt"),
            vocab_size=padded_vocab_size(module, make_vocab_size_divisible_by),
        )


def prepare_cpu() -> None:
    """For checking on CPU: what megatron-core needs to run a forward pass on a machine without
    CUDA (it asks `torch.cuda.current_device()`, moves tied embeddings with `.cuda()`, builds a
    sliding window's mask on CUDA, and seeds its CUDA RNG tracker). Patches torch and
    megatron-core for the whole process; not for a GPU run."""
    from mapgen.verify.megatron_cpu import prepare_cpu_megatron

    prepare_cpu_megatron()


def cpu_logits(chunk: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """For checking on CPU: the logits [batch, seq, vocab] of a single-stage GPTModel or
    HybridModel chunk for `input_ids`, with a causal mask (after `prepare_cpu`)."""
    from mapgen.verify.forward import megatron_logits

    return megatron_logits(chunk, input_ids)
