#!/usr/bin/env bash
# Create .venv with everything the project needs on a CPU-only machine (idempotent).
# torch 2.13.0 first: it is the CPU build; any other torch spec may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,mpi]"
.venv/bin/python -c "import torch, megatron.core, triton, nsa_kernels, nsa_megatron; print('env ok: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| triton', triton.__version__)"
