#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, triton, transformers, lightning, tensorboard and
# torchmetrics), downloaded here into .whl/ (git-ignored) for the device tool to carry. Then, there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#     && python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d .whl)
python3 -m pip download -q "${platform[@]}" webdataset==1.0.2 omegaconf==2.4.0 braceexpand==0.1.7 decord==0.6.0
ls -la .whl
