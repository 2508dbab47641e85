"""Tiny random stand-ins of each family, saved as transformers saves them (and the source tree tests read).

Used by the test suite, `mapgen standin` and `mapgen verify`: transformers builds a random model
of the family from a config object (no download). The forward passes compared on them are in
`mapgen.verify.forward`; LLaVA's stand-ins in `llava_standin`, the published vision-language
layout in `published`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mapgen.verify.forward import DERIVED_PER_LAYER
from mapgen.verify.llava_standin import save_llava_standin, standin_llava_config
from mapgen.verify.nemotron_h import nemotron_standin_fields, write_published_pattern
from mapgen.verify.published import TEXT_MODELS, save_published_standin, text_model_fields

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
    "deepseek_v32": "specs/deepseek_v3_2.yaml",
    "gpt_oss": "specs/gpt_oss.yaml",
    "qwen3_next": "specs/qwen3_next.yaml",
    "glm4_moe": "specs/glm4_moe.yaml",
    "qwen3_5_text": "specs/qwen3_5.yaml",
    "qwen3_5_moe_text": "specs/qwen3_5_moe.yaml",
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
            # no multi-token-prediction layer (transformers' default is 1): save_random_model
            # writes what transformers builds; save_standin adds the MTP layer of a config
            num_nextn_predict_layers=0,
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
            # no multi-token-prediction layer (the spec's default is the published checkpoint's
            # one): save_random_model writes what transformers builds; save_standin adds it
            num_nextn_predict_layers=0,
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
    fields = text_model_fields(fields)
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
    fields = text_model_fields(fields)
    if fields.get("model_type") == "llava":
        return standin_llava_config(fields, vocab_size=vocab_size)
    dropped = ("quantization_config", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id")
    tiny = {k: v for k, v in fields.items() if k not in dropped}
    tiny["model_type"] = standin_model_type(fields)
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
    if "intermediate_size" not in fields:  # a model of experts only (Qwen3.5-MoE) has no dense MLP size
        tiny.pop("intermediate_size")
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
    if fields.get("kv_lora_rank") is not None:
        # multi-latent attention: transformers' DeepSeek-V3 normalises the q and kv latents with
        # eps 1e-6 whatever rms_norm_eps says, megatron-core's with layernorm_epsilon (the
        # config's rms_norm_eps). The stand-in, which checks the mapping, has them agree
        # (Moonlight's 1e-5 apart: specs/deepseek_v3.yaml, tests/test_kimi.py)
        tiny["rms_norm_eps"] = 1e-6
    shrink = {
        # mixture of experts: 8 experts, so EP 2 and 4 split them; 2 (DeepSeek: 4) per token
        "num_local_experts": 8,
        "num_experts": 8,
        "n_routed_experts": 8,
        "moe_intermediate_size": 32,
        "num_experts_per_tok": 4 if "n_group" in fields else 2,
        "first_k_dense_replace": 1,  # one dense layer, then experts
        # group-limited routing: top-2 groups of 4, as DeepSeek-V3; a config without groups
        # (n_group 1: Kimi-K2, Moonlight) keeps its one group
        "n_group": 4 if fields.get("n_group") != 1 else 1,
        "topk_group": 2 if fields.get("n_group") != 1 else 1,
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
        # DeepSeek-V3.2's DSA indexer: 8 heads of 16 (rope on the first 8), 4 keys per query, below
        # the 7 positions `mapgen verify` runs, so that the indexer's choice changes the logits
        "index_n_heads": 8,
        "index_head_dim": 16,
        "index_topk": 4,
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
    if fields.get("model_type") == "nemotron_h":  # Mamba-2 layers (mapgen/verify/nemotron_h.py)
        tiny = nemotron_standin_fields(tiny)
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
        tiny_llava = standin_config(config_fields, vocab_size=vocab_size)
        tiny_llava.pop("model_type", None)
        return save_llava_standin(folder, seed, config=transformers.LlavaConfig(**tiny_llava), dtype=dtype)
    if config_fields.get("model_type") in TEXT_MODELS and isinstance(config_fields.get("text_config"), dict):
        with tempfile.TemporaryDirectory() as scratch:  # the text model's stand-in, in Qwen3.5's published layout
            save_standin(text_model_fields(config_fields), Path(scratch), seed, dtype=dtype, vocab_size=vocab_size)
            return save_published_standin(config_fields, Path(scratch), folder, seed, dtype=dtype)
    tiny = standin_config(config_fields, vocab_size=vocab_size)
    model_type = tiny.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **tiny)
    model = save_random_model(config, folder, seed, dtype)
    if model_type == "nemotron_h":  # the published config's pattern fields (mapgen/verify/nemotron_h.py)
        write_published_pattern(folder)
    spec = _family_spec(model_type)
    if spec is not None:  # the MTP layers the family's spec (its `mtp:`) reads from the config, if any
        add_mtp_tensors(folder, spec, seed)
    return model


def standin_model_type(fields: dict[str, Any]) -> str:
    """The model_type of a config's stand-in: the config's, or, where transformers does not know
    it, the model_type of the config class of the first of its architectures that transformers
    has (Kimi-K2: kimi_k2, a DeepseekV3ForCausalLM whose checkpoint brings its own copy of
    DeepseekV3Config, `auto_map`; its stand-in is transformers' deepseek_v3). Raises ValueError
    where neither is known."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from mapgen.compiler.hf_tensors import own_config_class

    model_type, architectures = fields["model_type"], fields.get("architectures")
    if model_type in CONFIG_MAPPING:
        return str(model_type)
    for architecture in architectures if isinstance(architectures, list) else []:
        if not own_config_class(str(architecture), fields):  # the rule `mapgen build` reads configs by
            continue
        found = getattr(getattr(getattr(transformers, str(architecture), None), "config_class", None), "model_type", None)
        if isinstance(found, str) and found:
            return found
    raise ValueError(
        f"transformers knows no model_type {model_type!r}, and the config's auto_map names no copy of the "
        f"config class of its architectures {architectures!r}"
    )


def _family_spec(model_type: str) -> Path | None:
    """The spec of a model_type's family: the checkout's, or the one mapgen ships."""
    relative = FAMILY_SPECS.get(model_type)
    if relative is None:
        return None
    if (ROOT / relative).is_file():
        return ROOT / relative
    from mapgen.compiler.packaged import specs_folder

    shipped = specs_folder() / Path(relative).name
    return shipped if shipped.is_file() else None


def import_module_from_path(path: Path, name: str | None = None) -> ModuleType:
    """A one-file module, or a target package (its folder), imported under `name`."""
    from mapgen.common.files import module_label
    from mapgen.runtime.package import import_path

    return import_path(path, name or f"mapgen_generated_{module_label(path)}")


def add_mtp_tensors(folder: Path, spec_path: Path, seed: int = 0) -> list[str]:
    """Give the stand-in saved in `folder` the multi-token-prediction layers its config has by
    the spec (dims' mtp_num_layers, the spec's `mtp:`): each MTP layer's decoder layer as
    transformers makes a decoder layer of that number (random, in a model built with enough
    layers, saved by transformers), or with `mtp.hf_decoder_like` as it makes that main layer
    (random, from a second model of the config), under the checkpoint's prefix; the spec's
    other MTP tensors random (norms around 1), and the copies equal to their originals.
    Rewrites the folder as one safetensors file; returns the names added."""
    import json

    import transformers
    from safetensors.torch import load_file, save_file

    from mapgen.compiler.mtp import with_mtp_tensors, mtp_layers
    from mapgen.compiler.config import translate
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.compiler.hf_tensors import HF_LAYER
    from mapgen.compiler.inventory import HFTensor
    from mapgen.compiler.spec import parse_spec

    spec = parse_spec(str(spec_path), spec_path.read_text())
    if spec.mtp is None:  # a family without MTP layers
        return []
    config_path = folder / "config.json"
    config = read_hf_config(str(config_path), config_path.read_text())
    dims = translate(spec, config)
    mtp = mtp_layers(spec, config, dims)
    if mtp is None:
        return []
    fields = json.loads(config_path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    # the stand-in's dtype: that of most of its floating tensors (safetensors stores float32
    # ones first, and a bfloat16 stand-in keeps float32 buffers: the router's score-correction bias)
    floating = [t.dtype for t in tensors.values() if t.dtype.is_floating_point]
    dtype = max(set(floating), key=floating.count, default=torch.float32)
    derived = DERIVED_PER_LAYER.get(fields["model_type"], ())
    donor_fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures", "transformers_version", *derived)}
    numbers = mtp.transformers_layers()
    if numbers:  # transformers' own decoder layers of the MTP layers' numbers
        donor_fields["num_hidden_layers"] = max(numbers) + 1
    donor_config = transformers.AutoConfig.for_model(fields["model_type"], **donor_fields)
    with tempfile.TemporaryDirectory() as scratch:
        save_random_model(donor_config, Path(scratch), seed + 1, dtype if dtype.is_floating_point else torch.float32)
        donor: dict[str, torch.Tensor] = {}
        for file in sorted(Path(scratch).glob("*.safetensors")):
            donor.update(load_file(str(file)))
    layer_tensors = {n: t for n, t in donor.items() if any(n.startswith(f"model.layers.{j}.") for j in numbers)}
    present = tuple(HFTensor(n, tuple(t.shape)) for n, t in {**tensors, **layer_tensors}.items())
    full, copies, _ = with_mtp_tensors(spec, config, dims, present, mtp)
    base = next((m.group(1) for n in tensors if (m := HF_LAYER.match(n)) is not None), "model.layers.")
    donor_layers = {}  # checkpoint name of an MTP layer's decoder-layer tensor -> the donor's tensor
    for index in range(mtp.count):
        source = f"{base}{mtp.like if mtp.like is not None else mtp.hf_layer + index}."
        target = mtp.checkpoint_prefix(base, index)
        donor_layers.update({target + n[len(source):]: t for n, t in donor.items() if n.startswith(source)})
    generator = torch.Generator().manual_seed(seed + 2)
    added: dict[str, torch.Tensor] = {}
    for entry in full:
        if entry.name in tensors:
            continue
        if entry.name in copies:
            added[entry.name] = tensors[copies[entry.name]].clone()
        elif entry.name in donor_layers:
            added[entry.name] = donor_layers[entry.name]
        else:
            values = torch.randn(entry.shape, generator=generator)
            values = 1 + 0.1 * values if "norm" in entry.name.rsplit(".", 2)[-2] else values * 0.05
            added[entry.name] = values.to(dtype)
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    for file in folder.glob("model.safetensors.index.json"):
        file.unlink()
    save_file({**tensors, **added}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sorted(added)
