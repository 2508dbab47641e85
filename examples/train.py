"""Train: a Megatron-LM-style training script that starts from an HF checkpoint and saves one.

    torchrun --nproc_per_node 2 examples/train.py --module MODULE_DIR --hf HF_DIR --out OUT_DIR [--steps 5]

It loads the HF weights into a 2-way tensor-parallel megatron-core model, takes a few optimizer
steps on random tokens (your data loader goes there), and writes the trained model as an HF
checkpoint that transformers loads (`AutoModelForCausalLM.from_pretrained(OUT_DIR)`).
"""

import argparse

import torch

import mapgen

mapgen.quiet()  # first: megatron-core prints notices as it is imported

from megatron.core import parallel_state

# The tokens the final evaluation scores (tests/test_examples.py scores them with transformers).
EVAL_TOKENS = list(range(1, 17))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", required=True, help="the generated module's folder (--layout local)")
    parser.add_argument("--hf", required=True, help="the HF checkpoint to start from")
    parser.add_argument("--out", required=True, help="where to save the trained model as an HF checkpoint")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser.parse_args()


def language_model_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Megatron-LM's GPT loss: predict every next token. Given labels, megatron-core's GPTModel
    returns the cross entropy per token, computed over the vocabulary split across the
    tensor-parallel ranks (the logits are never gathered)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    length = inputs.shape[1]
    positions = torch.arange(length).expand_as(inputs)
    causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1)[None, None]  # True: may not attend
    per_token = model(inputs, positions, attention_mask=causal_mask, labels=labels)  # [batch, length]
    return per_token.float().mean()


def main() -> None:
    args = parse_args()
    torch.distributed.init_process_group("gloo")  # torchrun tells each process its rank
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    mapgen.prepare_cpu()  # lets megatron-core run without CUDA (not for a GPU job)
    rank = torch.distributed.get_rank()

    # The model, with the HF checkpoint's weights: each rank builds and fills its own shard.
    module = mapgen.load_module(args.module)
    chunks = mapgen.from_hf_pretrained(module, args.hf)
    model = chunks[0]  # one chunk: no pipeline parallelism in this example
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    # Random token batches. Every tensor-parallel rank must see the same batch (Megatron-LM
    # broadcasts it within the group); here each rank draws it from the same seed.
    generator = torch.Generator().manual_seed(1234)
    vocab_size = module.DIMS.vocab_size  # the HF vocabulary, without Megatron-LM's padding
    for step in range(1, args.steps + 1):
        tokens = torch.randint(vocab_size, (4, 33), generator=generator)
        loss = language_model_loss(model, tokens)
        optimizer.zero_grad()
        loss.backward()  # the tensor-parallel layers all-reduce what they must
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    # A final evaluation: the loss on fixed tokens, scored over the HF vocabulary's columns of
    # the logits only (the padding rows Megatron-LM adds are trained too, but not exported).
    model.eval()
    tokens = torch.tensor([EVAL_TOKENS])
    logits = mapgen.cpu_logits(model, tokens)[0, :-1, :vocab_size]
    eval_loss = torch.nn.functional.cross_entropy(logits.float(), tokens[0, 1:])
    if rank == 0:
        print(f"eval loss {eval_loss.item():.6f}")

    # Save an HF checkpoint: every rank takes part (the gathers), rank 0 writes the files.
    # The config.json is the one the training started from.
    mapgen.save_hf_pretrained(module, chunks, args.out, args.hf)
    if rank == 0:
        print(f"saved {args.out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
