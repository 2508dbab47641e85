"""Tiny stand-ins of each family and the two forward passes compared against each other.

Used by the test suite and by `mapgen verify`: transformers builds a random model of the family
from a config object (no download), and megatron-core runs the same weights on CPU.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# The source tree and its specs, for the test suite only: no `mapgen` command reads
# them (in a wheel install ROOT is site-packages; shipped specs: mapgen.compiler.packaged.specs_folder).
ROOT = Path(__file__).resolve().parents[2]
FAMILY_SPECS = {
    "llama": "specs/llama.yaml",
    "qwen2": "specs/qwen2.yaml",
    "qwen3": "specs/qwen3.yaml",
    "mixtral": "specs/mixtral.yaml",
    "qwen3_moe": "specs/qwen3_moe.yaml",
    "deepseek_v3": "specs/deepseek_v3.yaml",
    "gpt_oss": "specs/gpt_oss.yaml",
    "qwen3_next": "specs/qwen3_next.yaml",
}


def tiny_hf_config(family: str, **overrides: Any) -> Any:
    """A few-layer config of `family` whose shapes exercise what the real models do."""
    import transformers

    config_class: Any

    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "llama":
        common.update(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
        config_class = transformers.LlamaConfig
    elif family == "qwen2":
        common.update(rope_theta=1000000.0)
        config_class = transformers.Qwen2Config
    elif family == "qwen3":
        common.update(rope_theta=1000000.0, head_dim=32)  # head_dim != hidden / heads
        config_class = transformers.Qwen3Config
    elif family == "mixtral":
        common.update(rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2)
        config_class = transformers.MixtralConfig
    elif family == "qwen3_moe":
        common.update(
            rope_theta=1000000.0, head_dim=32, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=48, norm_topk_prob=True,
        )
        config_class = transformers.Qwen3MoeConfig
    elif family == "deepseek_v3":
        common.update(
            num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=4,
            moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_theta=10000.0,
            rope_scaling={
                "type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
            },
        )
        config_class = transformers.DeepseekV3Config
    elif family == "qwen3_next":
        # gated delta net layers 0 and 2, gated full attention 1 and 3; key and value heads of
        # different widths, two value heads per key head; a gated shared expert
        common.update(
            num_hidden_layers=4, head_dim=32, rope_theta=10000000.0, partial_rotary_factor=0.25,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            norm_topk_prob=True, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=24, linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        )
        config_class = transformers.Qwen3NextConfig
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    common.update(overrides)
    return config_class(**common)


def save_tiny_model(family: str, folder: Path, seed: int = 0, **overrides: Any) -> Any:
    """A random fp32 model of `family`, saved as safetensors + config.json in `folder`."""
    return save_random_model(tiny_hf_config(family, **overrides), folder, seed)


def save_random_model(config: Any, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """Random weights for `config` (norms and zero-initialised biases too, so no weight is
    trivially 1 or 0), drawn in fp32 and
    saved in `dtype` (config.json's dtype says so; weight buffers stay as they are)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # biases transformers initialises to zero too, so that a misplaced one shows in the logits;
            # Qwen3-Next's dt_bias, all ones at init
            if "norm" in name or (name.endswith("bias") and not param.any()) or name.endswith(".dt_bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's router bias: zero at init
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    if dtype != torch.float32:  # buffers keep their dtype: DeepSeek's float32 router bias, as published
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(dtype)
        model.config.dtype = dtype
    model.eval()
    model.save_pretrained(folder)
    return model


def standin_problems(fields: dict[str, Any]) -> list[str]:
    """What keeps `standin_config` from making a stand-in of a config: the fields it reads, each
    missing or of the wrong kind."""
    problems: list[str] = []
    if fields.get("model_type") == "llava":  # nested configs: mapgen.verify.llava shrinks them
        return [f"needs '{k}' as an object" for k in ("text_config", "vision_config") if not isinstance(fields.get(k, {}), dict)]
    if not isinstance(fields.get("model_type"), str):
        problems.append("needs 'model_type' (a string) to know which model transformers builds")
    for name, required in (
        ("num_attention_heads", True), ("hidden_size", True), ("num_key_value_heads", False), ("head_dim", False),
        ("max_position_embeddings", False),
    ):
        value = fields.get(name)
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            got = "it is missing" if value is None else f"got {value!r}"
            problems.append(f"needs '{name}' as a positive integer ({got})")
    heads, kv_heads = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    if not problems and kv_heads is not None and heads % kv_heads:
        problems.append(f"'num_key_value_heads' {kv_heads} does not divide 'num_attention_heads' {heads}")
    return problems


def standin_config(fields: dict[str, Any], num_layers: int = 4, vocab_size: int = 128) -> dict[str, Any]:
    """A tiny config of the same architecture that keeps what shapes the mapping: GQA, MQA (one
    KV head) or neither, head_dim apart from hidden/heads or not, tied embeddings, biases, rope
    scaling. Raises ValueError (see `standin_problems`) for a config it cannot shrink."""
    problems = standin_problems(fields)
    if problems:
        raise ValueError("; ".join(problems))
    if fields.get("model_type") == "llava":
        from mapgen.verify.llava import standin_llava_config

        return standin_llava_config(fields, vocab_size=vocab_size)
    dropped = ("quantization_config", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id")
    tiny = {k: v for k, v in fields.items() if k not in dropped}
    heads = int(fields["num_attention_heads"])
    kv_heads = int(fields.get("num_key_value_heads") or heads)
    explicit_head_dim = fields.get("head_dim")
    tiny.update(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        # multi-head, multi-query (one KV head) and grouped-query attention stay what they are
        num_key_value_heads=4 if kv_heads == heads else 1 if kv_heads == 1 else 2,
        num_hidden_layers=num_layers,
        vocab_size=vocab_size,
        max_position_embeddings=min(int(fields.get("max_position_embeddings", 256)), 256),
        torch_dtype="float32",
    )
    tiny.pop("dtype", None)
    if fields.get("pad_token_id") is not None:
        # the published padding id is a row of the full vocabulary; dropped, the family's default
        # may be that same id (Phi-3: 32000), which nn.Embedding refuses beyond the stand-in's
        # rows. It marks the row training keeps at zero, which neither forward nor mapping reads.
        tiny["pad_token_id"] = None
    if explicit_head_dim is not None:
        tiny["head_dim"] = 32 if explicit_head_dim != fields["hidden_size"] // heads else 16
    for key in ("max_window_layers",):
        if key in tiny:
            tiny[key] = num_layers
    shrink = {
        # mixture of experts: 8 experts, so EP 2 and 4 split them; 2 (DeepSeek: 4) per token
        "num_local_experts": 8,
        "num_experts": 8,
        "n_routed_experts": 8,
        "moe_intermediate_size": 32,
        "num_experts_per_tok": 4 if "n_group" in fields else 2,
        "first_k_dense_replace": 1,  # one dense layer, then experts
        "n_group": 4,  # group-limited routing: top-2 experts per group, as DeepSeek-V3
        "topk_group": 2,
        # multi-latent attention
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        # Qwen3-Next: a shared expert; gated delta net with 2 key heads of 16 and 4 value heads of
        # 24 (TP 2 splits them; two value heads per key head, value and key widths apart), full
        # attention every second layer so that each of two pipeline stages has both kinds
        "shared_expert_intermediate_size": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 24,
        "full_attention_interval": 2,
    }
    tiny.update({k: v for k, v in shrink.items() if k in fields and fields[k] is not None})
    if "experts_per_token" in fields and "num_experts_per_tok" in tiny:  # gpt-oss's second name for it
        tiny["experts_per_token"] = tiny["num_experts_per_tok"]
    layer_types = fields.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        # the per-layer attention kinds, repeated as they repeat, for the stand-in's layers; where
        # they alternate sliding and full attention (gpt-oss), a window shorter than the 7
        # positions `mapgen verify` runs, so that it changes the logits
        tiny["layer_types"] = [layer_types[i % len(layer_types)] for i in range(num_layers)]
        if "sliding_attention" in layer_types and isinstance(fields.get("sliding_window"), int):
            tiny["sliding_window"] = 3
    return tiny


def standin_vocab_size(make_vocab_size_divisible_by: int = 1) -> int:
    """The stand-in's vocabulary: 128; for a model that Megatron-LM pads to multiples of
    D = `make_vocab_size_divisible_by` (> 1) x TP, a size that is no multiple of D (the multiple
    of D nearest 128 from below, at least D, plus half of D), so that every TP pads it; 192 for
    D = 128, which TP 2 pads to 256, one rank holding 64 real and 64 pad rows."""
    divisor = make_vocab_size_divisible_by
    if divisor <= 1:
        return 128
    return max(1, 128 // divisor) * divisor + (divisor + 1) // 2


def save_standin(
    config_fields: dict[str, Any],
    folder: Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 128,
) -> Any:
    """Save a random tiny stand-in of the model `config_fields` describes (see standin_config)
    in `dtype`."""
    import transformers

    if config_fields.get("model_type") == "llava":
        from mapgen.verify.llava import save_llava_standin

        tiny_llava = standin_config(config_fields, vocab_size=vocab_size)
        tiny_llava.pop("model_type", None)
        return save_llava_standin(folder, seed, config=transformers.LlavaConfig(**tiny_llava), dtype=dtype)
    tiny = standin_config(config_fields, vocab_size=vocab_size)
    config = transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    return save_random_model(config, folder, seed, dtype)


def import_module_from_path(path: Path, name: str | None = None) -> ModuleType:
    module_name = name or f"mapgen_generated_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


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


def megatron_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Forward of a single-stage GPTModel; [batch, seq, vocab] (gathered over TP by megatron)."""
    seq = input_ids.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
    # megatron-core's default causal mask is made on CUDA; True marks a masked position
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        output: torch.Tensor = model(input_ids, positions, attention_mask=mask)
    return output


def hf_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids).logits
    return logits
