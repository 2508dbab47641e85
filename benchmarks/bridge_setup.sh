#!/usr/bin/env bash
# Creates (or completes) .venv-bench: a separate virtualenv in which Megatron-Bridge 0.3.1 imports
# and converts weights on a CPU-only machine, for benchmarks/bridge_runner.py.  Idempotent.
#
#   bash benchmarks/bridge_setup.sh            # then:
#   .venv-bench/bin/python benchmarks/bridge_runner.py HF_DIR --tp 1 --pp 1 --repeat 3
#
# Why a separate venv: Bridge 0.3.1 requires transformers<5, mapgen's .venv has transformers 5.
# Why --no-deps for megatron-bridge: its declared dependencies include transformer-engine,
# mamba-ssm, causal-conv1d, nvidia-resiliency-ext, wandb, ... which need CUDA or are not needed
# for weight conversion.  The extra packages below are the ones `import megatron.bridge` (and
# the megatron-core modules it imports) actually fails without, found by trial:
#   rich       megatron.bridge.models.conversion.model_bridge (progress bars)
#   omegaconf  megatron.bridge.models.config
#   einops     megatron.bridge.models.llama.llama4_utils (imported with the Llama bridge)
#   triton     megatron.core.ssm.mamba_mixer -> ...attention_context/triton/tensor_ops.py does
#              `import triton` unconditionally (Bridge imports its Mamba provider at package
#              import).  Not pure Python (~1 GB installed) but an ordinary PyPI wheel that
#              imports on CPU; nothing calls it here.
# TransformerEngine cannot be installed; benchmarks/te_standin/ stands in for its import.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --disable-pip-version-check --quiet)

# torch: exactly this spec (the CPU wheel on local disk); any other torch spec pulls CUDA wheels.
"${PIP[@]}" torch==2.13.0 megatron-core==0.16.1 'transformers<5' safetensors
"${PIP[@]}" rich==15.0.0 omegaconf==2.4.0 einops==0.8.2 triton==3.9.0
"${PIP[@]}" --no-deps megatron-bridge==0.3.1

# Smoke test: Bridge imports through the TE stand-in, and megatron-core did not see it.
"$VENV/bin/python" - "$ROOT/benchmarks/te_standin" <<'EOF' 2>/dev/null
import sys
sys.path.insert(0, sys.argv[1])
import te_gate
te_gate.install()
import megatron.bridge
from megatron.bridge import AutoBridge  # noqa: F401
flagged = te_gate.megatron_core_te_flags()
assert not flagged, flagged
print(f"megatron-bridge {megatron.bridge.__version__} imports in {sys.prefix}")
EOF
