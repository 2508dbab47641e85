"""MiniMax-M2 (MiniMaxM2ForCausalLM, specs/minimax_m2.yaml) is refused, and the refusal is the
truth: `mapgen build` names the megatron-core feature it lacks; without the `unsupported` key the
spec maps every tensor of the model but the q/k norms; and transformers' q/k norm is one RMSNorm
over every head together, which megatron-core's per-head `qk_layernorm` does not compute."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from mapgen.cli import main
from mapgen.common.errors import SpecError
from mapgen.compiler.build import compile_target
from mapgen.verify import testing

SPEC = testing.ROOT / "specs" / "minimax_m2.yaml"
CONFIG = testing.ROOT / "specs" / "configs" / "minimax_m2.json"


def _small_config(folder: Path) -> Path:
    """The published config with 2 layers of 8 experts (the refusal and the rules do not depend
    on the sizes; the full model's inventory takes a while to list)."""
    fields: dict[str, Any] = json.loads(CONFIG.read_text())
    fields.update(num_hidden_layers=2, attn_type_list=[1, 1], num_local_experts=8)
    path = folder / "config.json"
    path.write_text(json.dumps(fields))
    return path


def test_build_refuses_naming_the_missing_megatron_core_feature(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(SPEC), str(CONFIG), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line = next(n for n, text in enumerate(SPEC.read_text().splitlines(), 1) if text.startswith("unsupported:"))
    said = re.search(r"minimax_m2\.yaml:(\d+):", result.output)
    assert said is not None and int(said.group(1)) in (line, line + 1), result.output  # the key or its first entry
    assert "MiniMaxM2ForCausalLM" in result.output and "q/k RMSNorm over the whole projection" in result.output
    assert "qk_layernorm" in result.output and "self_attn.q_norm.weight" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_without_the_key_every_tensor_maps_but_the_q_k_norms(tmp_path: Path) -> None:
    """The rules are complete but for the refused module: the build's only complaint is the 2 x 2
    q_norm / k_norm tensors no rule consumes (so the refusal is about that module alone)."""
    text = SPEC.read_text()
    without = re.sub(r"^unsupported:\n(?:  .*\n|    .*\n)+", "", text, flags=re.M)
    assert "unsupported" not in without.split("family:")[1].split("rules:")[0]
    spec = tmp_path / "minimax_m2.yaml"
    spec.write_text(without)
    with pytest.raises(SpecError) as caught:
        compile_target("minimax_m2", spec, _small_config(tmp_path), "local", "test")
    message = str(caught.value)
    named = set(re.findall(r"model\.layers\.\d+\.[\w.]+", message))
    expected = {f"model.layers.{n}.self_attn.{which}_norm.weight" for n in range(2) for which in ("q", "k")}
    assert "consumed by no rule" in message and named == expected, message


def test_transformers_normalises_q_over_every_head_together() -> None:
    """The refusal's reason, against transformers itself: MiniMax-M2's q_norm has one weight per
    element of the whole projection, and its output differs from a per-head RMSNorm (what
    megatron-core's qk_layernorm computes) of the same weights."""
    from transformers import MiniMaxM2Config
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2Attention

    fields: dict[str, Any] = json.loads(CONFIG.read_text())
    fields.pop("quantization_config")
    fields.update(num_hidden_layers=1, attn_type_list=[1], hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rotary_dim=8, num_local_experts=4, vocab_size=128)
    config = MiniMaxM2Config(**fields)
    attention = MiniMaxM2Attention(config, 0)
    assert tuple(attention.q_norm.weight.shape) == (4 * 16,) and tuple(attention.k_norm.weight.shape) == (2 * 16,)
    torch.manual_seed(0)
    with torch.no_grad():
        attention.q_norm.weight.uniform_(0.5, 1.5)
        q = torch.randn(3, 4 * 16) * torch.linspace(0.1, 4.0, 4).repeat_interleave(16)  # heads of other scales
        whole = attention.q_norm(q)
        heads = q.view(3, 4, 16)
        eps = config.rms_norm_eps
        per_head = (heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps)).view(3, 64) * attention.q_norm.weight
        over_all = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * attention.q_norm.weight
    torch.testing.assert_close(whole, over_all, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole, per_head, rtol=1e-2, atol=1e-3)
