#!/usr/bin/env bash
# Creates (or completes) two separate virtualenvs in which Megatron-Bridge imports and converts
# weights on a CPU-only machine, for benchmarks/bridge_runner.py.  Idempotent.
#   .venv-bench     Megatron-Bridge 0.3.1 (Python 3.11, torch 2.13.0 CPU, megatron-core 0.16.1, transformers 4)
#   .venv-bench062  Megatron-Bridge 0.6.2 (Python 3.12, torch 2.9.1, megatron-core 0.19.2, transformers 5.12.1)
#
#   bash benchmarks/bridge_setup.sh            # then:
#   .venv-bench/bin/python benchmarks/bridge_runner.py HF_DIR --tp 1 --pp 1 --repeat 3
#   .venv-bench062/bin/python benchmarks/bridge_runner.py HF_DIR --ep 2 --repeat 3
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

# Smoke test: Bridge imports through the TE stand-in, and megatron-core did not see it.
smoke() {
    "$1" - "$ROOT/benchmarks/te_standin" <<'EOF' 2>/dev/null
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
}

# ---------------------------------------------------------------------------------------------
# .venv-bench: Megatron-Bridge 0.3.1
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --disable-pip-version-check --quiet)

# torch: exactly this spec (the CPU wheel on local disk); any other torch spec pulls CUDA wheels.
"${PIP[@]}" torch==2.13.0 megatron-core==0.16.1 'transformers<5' safetensors
"${PIP[@]}" rich==15.0.0 omegaconf==2.4.0 einops==0.8.2 triton==3.9.0
"${PIP[@]}" --no-deps megatron-bridge==0.3.1
smoke "$VENV/bin/python"

# ---------------------------------------------------------------------------------------------
# .venv-bench062: Megatron-Bridge 0.6.2 (the newest release), same runner, same TE stand-in.
# Bridge 0.6.2 requires Python >=3.12,<3.13 and transformers>=5.8,<=5.12.1; it names
# megatron-core without a version: pinned here to 0.19.2 (the current stack's; the benchmark's
# imports, exports and checks pass with it).  On Python 3.12 the registry has no CPU torch wheel
# for this machine: torch==2.9.1 (the current stack's) comes as the CUDA build with its nvidia
# wheels (~3 GB, minutes, once; it runs on the CPU) and brings triton with it.  The same
# --no-deps reasoning as above: with rich, omegaconf and einops `import megatron.bridge` 0.6.2
# needs nothing more (found by trial).  Skipped once complete (.installed is written last).
VENV062="${BENCH062_VENV:-$ROOT/.venv-bench062}"
if [ ! -f "$VENV062/.installed" ]; then
    PY312="${BENCH062_PYTHON:-}"
    [ -n "$PY312" ] || PY312="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1 || true)"
    [ -n "$PY312" ] || PY312="$(command -v python3.12 || true)"
    if [ -z "$PY312" ]; then
        echo "bridge_setup.sh: Megatron-Bridge 0.6.2 needs Python 3.12; none found (set BENCH062_PYTHON)" >&2
        exit 1
    fi
    [ -x "$VENV062/bin/python" ] || "$PY312" -m venv "$VENV062"
    PIP062=("$VENV062/bin/python" -m pip install --disable-pip-version-check --quiet)
    "${PIP062[@]}" torch==2.9.1 megatron-core==0.19.2 transformers==5.12.1 safetensors
    "${PIP062[@]}" rich==15.0.0 omegaconf==2.4.0 einops==0.8.2
    "${PIP062[@]}" --no-deps megatron-bridge==0.6.2
    smoke "$VENV062/bin/python"
    touch "$VENV062/.installed"
fi
smoke "$VENV062/bin/python"
