"""Random number generator states in checkpoints, so that a resumed run draws what the uninterrupted one did.

Saved with every checkpoint: torch's CPU generator, CUDA generators where present, Python's `random` and
NumPy's global generator (as plain lists, loadable with `weights_only=True`). The states are put back at
the start of the first training batch after a resume, not when the checkpoint is loaded: Lightning draws
from torch's generator in between (seeding the new DataLoader iterator), which the uninterrupted run did
not do at that point. Rank 0's states are saved (Lightning keeps rank 0's callback states); ranks
seeded alike and drawing alike, as in data-parallel training, have the same states.

Lightning has the same collection as private helpers (lightning.fabric.utilities.seed._collect_rng_states),
used for its spawn launcher; it keeps NumPy's state as an ndarray, which `torch.load(weights_only=True)`
refuses, hence these few lines of our own.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCheckpoint(L.Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None
