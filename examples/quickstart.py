"""Quickstart: an HF checkpoint into a tensor-parallel megatron-core model, a forward pass, and back out.

    torchrun --nproc_per_node 2 examples/quickstart.py --module MODULE_DIR --hf HF_DIR

MODULE_DIR: a module built for megatron-core's local layer spec, which runs on CPU
(mapgen build "$(mapgen specs)/llama.yaml" HF_DIR/config.json -o MODULE_DIR --layout local).
"""

import argparse

import torch
from safetensors.torch import load_file

import mapgen

mapgen.quiet()  # first: megatron-core prints notices as it is imported

from megatron.core import parallel_state

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--module", required=True, help="the generated module's folder")
parser.add_argument("--hf", required=True, help="the HF checkpoint's folder")
args = parser.parse_args()

# The parallel layout is yours, as in any megatron-core job: here 2-way tensor parallelism.
torch.distributed.init_process_group("gloo")  # torchrun tells each process its rank
parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
mapgen.prepare_cpu()  # lets megatron-core's forward run without CUDA (not for a GPU job)

# Build this rank's model and load the checkpoint into it: each rank reads only the tensors
# it needs and cuts its own half of every split weight.
module = mapgen.load_module(args.module)
chunks = mapgen.from_hf_pretrained(module, args.hf)  # one chunk per pipeline stage: here one

# A forward pass. The logits come back gathered over both ranks; the vocabulary is padded to
# a multiple of 128 x TP, as Megatron-LM pads it.
tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
logits = mapgen.cpu_logits(chunks[0], tokens)
if torch.distributed.get_rank() == 0:
    print(f"logits {tuple(logits.shape)}, predicted next tokens {logits[0].argmax(-1).tolist()}")

# Export: (HF name, full tensor) in HF order, on every rank. Every rank must iterate it to the
# end (the gathers between the ranks run inside); each compares the bytes with the file's.
original = load_file(f"{args.hf}/model.safetensors")  # one file here; a large model has several
exported = mapgen.export_hf_weights(module, chunks)
same = sum(torch.equal(t.view(torch.uint8), original[name].view(torch.uint8)) for name, t in exported)
if torch.distributed.get_rank() == 0:
    print(f"round trip: {same} of {len(original)} tensors bit-exact")
