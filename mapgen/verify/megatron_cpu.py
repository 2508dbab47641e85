"""What megatron-core needs to run its forward passes on a machine without CUDA (`prepare_cpu_megatron`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

def prepare_cpu_megatron() -> None:
    """What megatron-core needs to run forward passes on a machine without CUDA."""
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.moe.moe_utils as moe_utils

    # the MoE router's gating GEMM names TransformerEngine's kernel without importing it when
    # TE is absent; None selects its torch path
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    if not torch.cuda.is_available():
        # tied embeddings under PP: megatron-core moves the shared weight with .cuda() before
        # its all-reduce over the embedding group; on CPU it stays where it is
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        _sliding_window_mask_on_cpu()
    mrandom.model_parallel_cuda_manual_seed(
        1234, inference_rng_tracker=True, force_reset_rng=True
    )


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """Tensors a function creates with device="cuda" are created on the CPU instead."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _sliding_window_mask_on_cpu() -> None:
    """megatron-core's local attention builds a sliding window's mask (its own function, used
    as is) with device="cuda"; on a CPU machine it is built on the CPU."""
    import megatron.core.fusions.fused_softmax as fused_softmax

    original = fused_softmax.get_sliding_window_causal_mask
    if getattr(original, "on_cpu", False):
        return

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        with _CudaFactoriesOnCpu():
            return original(*args, **kwargs)

    on_cpu.on_cpu = True  # type: ignore[attr-defined]
    fused_softmax.get_sliding_window_causal_mask = on_cpu
