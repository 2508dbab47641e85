#!/usr/bin/env bash
# Convert: an HF checkpoint to a Megatron-LM distributed checkpoint and back, offline, and check the bytes.
#
#   examples/convert.sh MODULE_DIR HF_DIR OUT_DIR
#
# Run it where `mapgen` and `python` are the virtualenv's (. .venv/bin/activate). mapgen convert
# starts its own gloo processes on CPU (or runs in the ones torchrun started); no GPU needed.
set -euo pipefail
module=$1 hf=$2 out=$3
mkdir -p "$out"

# 1. HF -> a megatron-core distributed checkpoint in Megatron-LM's layout: what
#    `pretrain_gpt.py --ckpt-format torch_dist --load $out/megatron` reads. Convert with the
#    tensor-parallel size and vocabulary padding the training will use (Megatron-LM pads the
#    vocabulary to a multiple of --make-vocab-size-divisible-by x TP, 128 x 2 here).
mapgen convert hf-to-megatron "$module" "$hf" "$out/megatron" --tp 2 --make-vocab-size-divisible-by 128 --overwrite

# 2. Back to HF. Any layout can read the checkpoint (megatron-core reshards it on load): here two
#    pipeline stages instead of two tensor-parallel ranks. The vocabulary padding is dropped again.
mapgen convert megatron-to-hf "$module" "$out/megatron" "$out/hf" --pp 2 --overwrite

# 3. The round trip gives the original tensors back, bit for bit: the same names, dtypes,
#    shapes and bytes.
python - "$hf" "$out/hf" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(folder):
    found = {}
    for file in Path(folder).glob("*.safetensors"):
        found.update(load_file(file))
    return found


original, back = (tensors(folder) for folder in sys.argv[1:3])
assert sorted(back) == sorted(original), "the round trip changed the tensor names"
differ = [name for name, t in original.items()
          if t.dtype != back[name].dtype or not torch.equal(t.view(torch.uint8), back[name].view(torch.uint8))]
assert not differ, f"these tensors differ from the original: {differ}"
print(f"round trip: {len(original)} tensors bit-exact")
EOF
