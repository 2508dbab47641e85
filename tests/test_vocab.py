"""Megatron-LM's vocabulary padding (import fills zero rows, export drops them) and bfloat16
checkpoints end to end, in one process; the distributed cases are in test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mapgen.verify import forward, testing
from mapgen.compiler.build import compile_target
from mapgen.cli import main
from mapgen.common.parallel import ParallelLayout
from mapgen.compiler.gpt_model import build_gpt_model
from mapgen.compiler.model_classes import build_model_chunks
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.collectives import RankError
from mapgen.runtime.drivers import export_hf_tensors, load_hf_checkpoint
from mapgen.runtime.vocab import padded_block, padded_rows_problem, padded_vocab_size
from mapgen.verify.verdict import FLOAT32_TOLERANCE, checkpoint_dtype, logit_tolerance


def test_padded_vocab_size_is_megatron_lms_rounding() -> None:
    # ceil(V / (128 TP)) * 128 TP, as Megatron-LM's _vocab_size_with_padding: Llama-3's 128,256
    assert padded_vocab_size(128256, 128, 2) == 128256  # 501 x 256: no padding up to TP2
    assert padded_vocab_size(128256, 128, 4) == 128512  # 251 x 512
    assert padded_vocab_size(128256, 128, 8) == 129024  # 126 x 1024
    assert padded_vocab_size(50257, 128, 1) == 50304  # GPT-2's vocabulary in Megatron-LM
    assert padded_vocab_size(193, 1, 2) == 194  # without padding asked for: a multiple of TP
    with pytest.raises(ValueError, match="must be positive"):
        padded_vocab_size(128, 0, 2)


def test_padded_rows_problem_names_the_parameter_and_the_expected_size() -> None:
    assert padded_rows_problem("output_layer.weight", 128, 192, 128, 2) is None
    tail = "expected 256: the HF vocabulary of 192 padded to a multiple of make_vocab_size_divisible_by 128 x TP 2"
    assert padded_rows_problem("output_layer.weight", 100, 192, 128, 2) == (
        f"'output_layer.weight': the model has 200 vocabulary rows (100 per TP rank); {tail}"
    )
    assert padded_rows_problem("embedding.word_embeddings.weight", 64, 192, 128, 2) == (
        "'embedding.word_embeddings.weight': the model has 128 vocabulary rows (64 per TP rank), "
        f"fewer than the HF vocabulary of 192; {tail}"
    )


def test_padded_block_views_real_rows_and_zero_fills_past_the_end() -> None:
    table = torch.arange(1.0, 13.0).view(6, 2)
    inside = padded_block(table, 2, 3)
    assert torch.equal(inside, table[2:5]) and inside.data_ptr() == table[2].data_ptr()  # a view
    straddling = padded_block(table, 4, 4)
    assert torch.equal(straddling, torch.tensor([[9.0, 10.0], [11.0, 12.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(padded_block(table, 8, 2), torch.zeros(2, 2))  # a rank of pad rows only
    assert torch.equal(table, torch.arange(1.0, 13.0).view(6, 2))  # the input is untouched


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_padded_vocabulary_round_trips(tied: bool, tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None) -> None:
    """HF vocabulary 200, padded to 256 (a multiple of 128): HF rows then zero rows on import,
    logits equal transformers' on the 200 real tokens (pad logits exactly 0), export the HF bytes."""
    folder, hf_model = tiny_checkpoint("llama", vocab_size=200, tie_word_embeddings=tied)
    module = compile_module("llama", folder / "config.json")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32, vocab_size=256).eval()
    load_hf_checkpoint(module, [model], str(folder), make_vocab_size_divisible_by=128)

    original = load_file(folder / "model.safetensors")
    tables = [(model.embedding.word_embeddings.weight, original["model.embed_tokens.weight"])]
    if not tied:
        tables.append((model.output_layer.weight, original["lm_head.weight"]))
    for param, hf in tables:
        assert param.shape == (256, 64)
        assert torch.equal(param[:200], hf) and not param[200:].any()

    input_ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = forward.megatron_logits(model, input_ids)
    assert ours.shape[-1] == 256
    assert (ours[..., :200] - forward.hf_logits(hf_model, input_ids)).abs().max().item() <= FLOAT32_TOLERANCE
    assert not ours[..., 200:].any()

    exported = dict(export_hf_tensors(module, [model], make_vocab_size_divisible_by=128))
    assert sorted(exported) == sorted(original)
    for name, tensor in exported.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name


def test_padding_the_model_does_not_have_is_a_clear_error(tiny_checkpoint: Any, compile_module: Any, cpu_megatron: None) -> None:
    folder, _ = tiny_checkpoint("llama", vocab_size=200)
    module = compile_module("llama", folder / "config.json")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32, vocab_size=256)
    with pytest.raises(RankError) as raised:
        load_hf_checkpoint(module, [model], str(folder))  # not told of the padding: 200 rows expected
    message = str(raised.value)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert (
            f"'{name}': the model has 256 vocabulary rows (256 per TP rank); expected 200: the HF "
            "vocabulary of 200 padded to a multiple of make_vocab_size_divisible_by 1 x TP 1"
        ) in message
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by must be positive, not 0"):
        load_hf_checkpoint(module, [model], str(folder), make_vocab_size_divisible_by=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16_bit_checkpoint_round_trips(dtype: torch.dtype, tmp_path: Path, compile_module: Any, cpu_megatron: None) -> None:
    """A checkpoint published in bf16 or fp16 into a model of that dtype: logits as transformers'
    in that dtype, export the checkpoint's bytes, a float32 export the exact upcast."""
    folder = tmp_path / str(dtype).removeprefix("torch.")
    hf_model = testing.save_random_model(testing.tiny_hf_config("llama"), folder, dtype=dtype)
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert checkpoint_dtype(HFCheckpoint(folder)) == dtype
    module = compile_module("llama", folder / "config.json")
    (model,) = build_model_chunks(module.DIMS, ParallelLayout(), params_dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}  # the torch norms too
    load_hf_checkpoint(module, [model], str(folder))

    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = forward.megatron_logits(model, input_ids)
    theirs = forward.hf_logits(hf_model.eval(), input_ids)
    assert ours.dtype == theirs.dtype == dtype
    assert (ours.float() - theirs.float()).abs().max().item() <= logit_tolerance(dtype, theirs.float())

    original = load_file(folder / "model.safetensors")
    exported = dict(export_hf_tensors(module, [model]))
    assert exported.keys() == original.keys()
    for name, tensor in exported.items():
        assert tensor.dtype == dtype and torch.equal(tensor, original[name]), name
    for name, tensor in export_hf_tensors(module, [model], dtype=torch.float32):
        assert tensor.dtype == torch.float32 and torch.equal(tensor, original[name].float()), name


def test_logit_tolerance() -> None:
    reference = torch.tensor([[0.25, -0.5]])
    assert logit_tolerance(torch.float32, reference) == FLOAT32_TOLERANCE
    assert logit_tolerance(torch.bfloat16, reference) == 16 * 2**-7 * 0.5  # 16 epsilons of the largest


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mapgen standin` of Llama-3.1-8B in bfloat16, with a vocabulary Megatron-LM pads by 128."""
    out = tmp_path_factory.mktemp("standin") / "llama3_1_8b"
    config = testing.ROOT / "specs" / "configs" / "llama3_1_8b.json"
    args = ["standin", str(config), str(out), "--dtype", "bfloat16", "--make-vocab-size-divisible-by", "128"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_standin_in_bfloat16_with_a_vocabulary_megatron_pads(standin: Path) -> None:
    fields = json.loads((standin / "config.json").read_text())
    assert fields["dtype"] == "bfloat16" and fields["vocab_size"] == 192
    checkpoint = HFCheckpoint(standin)
    assert {checkpoint.dtype(n) for n in checkpoint.names()} == {"BF16"}
    assert checkpoint.shape("model.embed_tokens.weight") == (192, 64)
    for tp in (1, 2, 4):  # no multiple of 128 x TP: Megatron-LM pads it at every TP
        assert padded_vocab_size(192, 128, tp) > 192


def test_verify_command_pads_the_vocabulary_and_runs_in_the_checkpoints_dtype(standin: Path) -> None:
    module = standin / "llama_local.py"
    module.write_text(compile_target(module.stem, testing.ROOT / "specs" / "llama.yaml", standin / "config.json", "local", "test"))
    result = CliRunner().invoke(main, ["verify", str(module), str(standin), "--make-vocab-size-divisible-by", "128"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("verify llama_local tp1xpp1: 39 tensors checked, 39 bit-exact, bfloat16, vocab 192 padded to 256 (pad logits max 0), max logit diff ")
    assert line.endswith(": OK")
    tolerance = float(line.split("(tolerance ")[1].split(")")[0])
    assert 0 < tolerance < 0.1  # 16 bfloat16 epsilons of logits below 1
