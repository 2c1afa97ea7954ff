"""Checkpoints every N optimiser steps, the last K kept, written atomically; finding the newest complete one.

`AtomicModelCheckpoint` is Lightning's ModelCheckpoint (monitor "step", mode "max": the top K by step are
the last K) with one change: each checkpoint is first written under a temporary name in the same folder
(`.tmp-step=000100.ckpt`, a file or a sharded torch.distributed.checkpoint folder alike) and renamed to
its final name only once every rank has finished writing. A crash while saving leaves a temporary entry
behind and never touches the previous checkpoints: Lightning removes the oldest one only after the new
one has been saved. Leftover temporary entries are deleted when training starts.

`latest_checkpoint(folder)` is what `resume: auto` uses: the complete checkpoint with the highest step,
skipping temporary entries and sharded folders without their metadata.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

TMP_PREFIX = ".tmp-"
FILENAME = "step={step:06d}"  # ModelCheckpoint template: step=000100.ckpt
_STEP = re.compile(r"^step=(\d+)(?:-v\d+)?\.ckpt$")
SHARDED_REQUIRED = (".metadata", "meta.pt")  # DCP's metadata file and Lightning's non-tensor state


class AtomicModelCheckpoint(ModelCheckpoint):
    """Every `every_n_steps` optimiser steps, keep the last `keep_last`, write-then-rename; also saves the
    final step when training ends (unless it was just saved)."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int, **kwargs: Any):
        super().__init__(
            dirpath=dirpath,
            filename=FILENAME,
            auto_insert_metric_name=False,
            monitor="step",
            mode="max",
            save_top_k=keep_last,
            every_n_train_steps=every_n_steps,
            save_on_train_epoch_end=False,
            **kwargs,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for leftover in Path(self.dirpath).glob(TMP_PREFIX + "*"):
                _remove(leftover)
        trainer.strategy.barrier("AtomicModelCheckpoint.setup")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        temporary = final.with_name(TMP_PREFIX + final.name)
        super()._save_checkpoint(trainer, str(temporary))  # every rank writes; ends with a barrier
        if trainer.is_global_zero:
            if final.exists():  # the same name again (e.g. a re-run of a step): replace it
                _remove(final)
            os.replace(temporary, final)
        trainer.strategy.barrier("AtomicModelCheckpoint.rename")
        self._last_checkpoint_saved = str(final)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and trainer.global_step > 0:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def checkpoint_step(path: str | Path) -> int | None:
    """The optimiser step in a checkpoint's name, or None for names this module does not write."""
    match = _STEP.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | Path) -> bool:
    """A final-named checkpoint file, or a sharded folder holding its metadata files."""
    path = Path(path)
    if path.name.startswith(TMP_PREFIX):
        return False
    if path.is_file():
        return path.stat().st_size > 0
    return path.is_dir() and all((path / name).is_file() for name in SHARDED_REQUIRED)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `folder` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [
        (step, path) for path in folder.iterdir()
        if (step := checkpoint_step(path)) is not None and is_complete_checkpoint(path)
    ]  # fmt: skip
    return max(candidates, key=lambda c: (c[0], c[1].stat().st_mtime))[1] if candidates else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
