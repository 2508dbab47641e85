"""Quickstart: an HF checkpoint into a tensor-parallel megatron-core model, a forward pass, the weights to an engine.

    torchrun --nproc_per_node 2 examples/quickstart.py MODULE_DIR HF_DIR

MODULE_DIR: a module built for megatron-core's local layer spec, which runs on CPU
(mapgen build "$(mapgen specs)/llama.yaml" HF_DIR/config.json -o MODULE_DIR --layout local).
"""

import sys

import torch

import mapgen

mapgen.quiet()  # first: megatron-core prints notices as it is imported
from megatron.core import parallel_state

# The parallel layout is yours, as in any megatron-core job: here 2-way tensor parallelism.
torch.distributed.init_process_group("gloo")  # torchrun tells each process its rank
parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
mapgen.prepare_cpu()  # lets megatron-core's forward run without CUDA (not for a GPU job)
rank = torch.distributed.get_rank()

# Build this rank's model and load the checkpoint into it: each rank reads only the tensors
# it needs and cuts its own half of every split weight.
module = mapgen.load_module(sys.argv[1])
chunks = mapgen.from_hf_pretrained(module, sys.argv[2])  # one chunk per pipeline stage: here one

# A forward pass. The logits come back gathered over both ranks; the vocabulary is padded to
# a multiple of 128 x TP, as Megatron-LM pads it.
logits = mapgen.cpu_logits(chunks[0], torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))

# Hand the weights to an inference engine: (HF name, full tensor) pairs, as vLLM's and SGLang's
# model.load_weights take them. Every rank iterates the export to the end (the gathers between
# the ranks run inside it); only rank 0 feeds the engine, here a dict standing in for one.
with mapgen.engine_weights(mapgen.converter(module, chunks), feed=rank == 0) as weights:
    if rank == 0:
        engine = dict(weights)  # with vLLM: llm_model.load_weights(weights)
        print(f"logits {tuple(logits.shape)}; the engine got {len(engine)} tensors")
    else:
        weights.drain()
