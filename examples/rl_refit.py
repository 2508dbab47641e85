"""RL refit: train a megatron-core model and push its weights to an inference engine every few steps.

    torchrun --nproc_per_node 2 examples/rl_refit.py --module MODULE_DIR --hf HF_DIR [--steps 6 --refit-every 2]

An RL job alternates generating with an inference engine (vLLM, SGLang) and training on what it
generated; after training steps the engine must get the new weights ("refit"). Here the trainer
is 2-way tensor-parallel megatron-core, and the engine is a stand-in that honours vLLM's
`model.load_weights(weights)` contract, fed by rank 0 while rank 1 drains its share of the export.
After each refit the engine's weights are checked against the model's, bit for bit.
"""

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

import mapgen

mapgen.quiet()  # first: megatron-core prints notices as it is imported

from megatron.core import parallel_state


class StandInEngine:
    """Stands in for an inference engine's model: it owns its weights, loaded from the HF
    checkpoint at start-up, and `load_weights` copies new values into them, as the weight
    loaders of vLLM and SGLang do (they keep none of the tensors they are given)."""

    def __init__(self, hf_dir: str) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.changed = 0
        for file in sorted(Path(hf_dir).glob("*.safetensors")):
            self.weights.update(load_file(file))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's signature: (HF name, tensor) pairs in; the names loaded out."""
        loaded = set()
        self.changed = 0  # for the example's printout: how many tensors the refit changed
        for name, tensor in weights:
            own = self.weights[name]  # a name it does not know raises KeyError
            self.changed += not torch.equal(own, tensor)
            own.copy_(tensor)
            loaded.add(name)
        return loaded


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", required=True, help="the generated module's folder (--layout local)")
    parser.add_argument("--hf", required=True, help="the HF checkpoint the trainer and the engine start from")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--refit-every", type=int, default=2)
    return parser.parse_args()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """One optimizer step. A real RL job computes a policy loss on the engine's generations;
    a language-model loss on the same tokens on every rank stands in for it here."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    length = inputs.shape[1]
    positions = torch.arange(length).expand_as(inputs)
    causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1)[None, None]  # True: may not attend
    loss = model(inputs, positions, attention_mask=causal_mask, labels=labels).float().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    args = parse_args()
    torch.distributed.init_process_group("gloo")  # torchrun tells each process its rank
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    mapgen.prepare_cpu()  # lets megatron-core run without CUDA (not for a GPU job)
    rank = torch.distributed.get_rank()
    feeds_engine = rank == 0  # the rank that talks to the engine; in a real job, per engine

    module = mapgen.load_module(args.module)
    chunks = mapgen.from_hf_pretrained(module, args.hf)
    model = chunks[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine = StandInEngine(args.hf) if feeds_engine else None

    # Hold one Converter for the whole job: its placement and export plans are made once and
    # every refit reuses them.
    converter = mapgen.converter(module, chunks)
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, torch.randint(module.DIMS.vocab_size, (4, 33), generator=generator))
        if step % args.refit_every:
            continue

        # Refit. Every rank calls engine_weights and consumes it to the end: the gathers that
        # assemble each full HF tensor run while it is iterated. Leaving the `with` block
        # drains whatever the engine did not take, so that the other ranks finish this export
        # even if the engine raises. (Pass dtype=torch.bfloat16 for a bf16 engine.)
        with mapgen.engine_weights(converter, feed=feeds_engine) as weights:
            if feeds_engine:
                loaded = engine.load_weights(weights)
            else:
                weights.drain()  # the same collectives; hands nothing out

        # Check: the engine now holds exactly the model's weights (another export, on every rank).
        mismatched = []
        for name, tensor in converter.export():
            if feeds_engine and not torch.equal(engine.weights[name].view(torch.uint8), tensor.view(torch.uint8)):
                mismatched.append(name)
        if feeds_engine:
            assert loaded == set(engine.weights), f"the engine did not get {sorted(set(engine.weights) - loaded)}"
            assert not mismatched, f"the engine's weights differ from the model's: {mismatched}"
            print(f"step {step}: loss {loss:.4f}; refit: {len(loaded)} tensors ({engine.changed} changed), bit-exact with the model")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
