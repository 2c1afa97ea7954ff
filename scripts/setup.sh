#!/usr/bin/env bash
# Create .venv and install gazelit with its test extras. Idempotent.
# On a machine without CUDA this installs the CPU build of torch (torch==2.13.0 is the CPU wheel the
# project is tested with) *before* gazelit, so pip never pulls the multi-GB CUDA packages.
# GPU users: install the CUDA torch build you want into the venv first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: CUDA machine detected; install the CUDA build of torch into .venv first (see README)." >&2
    exit 1
  fi
  python -m pip install -q "torch==${GAZELIT_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[dev]"
