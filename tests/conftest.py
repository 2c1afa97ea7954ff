"""Session-wide test set-up: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when triton is imported, so it is set here, before any test imports it."""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
