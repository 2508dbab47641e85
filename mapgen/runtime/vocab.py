"""Megatron-LM's vocabulary padding: the embedding and output layer of a Megatron model have
`padded_vocab_size(V, make_vocab_size_divisible_by, TP)` rows, the HF checkpoint V.

Import fills the rows past V with zeros (Megatron-LM's own checkpoint tools copy the last row
instead; zeros make every pad logit exactly 0 and are what a pad token id should embed to);
export drops them. Only the drivers use this: the generated functions see HF-sized tensors.
"""

from __future__ import annotations

import torch

# The Megatron parameters whose dim 0 is the vocabulary (when the module's plan says so: their
# global shape's dim 0 is the HF vocabulary and TP splits dim 0).
VOCAB_PARAMS = (
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    # a LLaVAModel's language model
    "language_model.embedding.word_embeddings.weight",
    "language_model.output_layer.weight",
)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp_size: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: `vocab_size` rounded up to a multiple of
    `make_vocab_size_divisible_by` x `tp_size` (Llama-3's 128,256: 128,512 at 128 x TP4, 129,024 at TP8)."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tp_size < 1:
        raise ValueError(
            f"vocabulary {vocab_size}, make_vocab_size_divisible_by {make_vocab_size_divisible_by} "
            f"and TP {tp_size} must be positive"
        )
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def padded_rows_problem(
    name: str, rows: int, vocab_size: int, make_vocab_size_divisible_by: int, tp_size: int
) -> str | None:
    """What is wrong with a vocabulary parameter `name` whose shards have `rows` rows on each of
    `tp_size` ranks, for an HF vocabulary of `vocab_size`, if anything."""
    padded = rows * tp_size
    expected = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp_size)
    if padded == expected:
        return None
    found = f"'{name}': the model has {padded} vocabulary rows ({rows} per TP rank)"
    if padded < vocab_size:
        found += f", fewer than the HF vocabulary of {vocab_size}"
    return (
        f"{found}; expected {expected}: the HF vocabulary of {vocab_size} padded to a multiple of "
        f"make_vocab_size_divisible_by {make_vocab_size_divisible_by} x TP {tp_size}"
    )


def padded_block(tensor: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows `first` .. `first + count` of `tensor` padded with zero rows past its end: a view
    when every row is there, otherwise a new tensor."""
    real = max(0, min(tensor.shape[0] - first, count))
    if real == count:
        return tensor.narrow(0, first, count)
    block = tensor.new_zeros((count, *tensor.shape[1:]))
    if real:
        block[:real] = tensor.narrow(0, first, real)
    return block
