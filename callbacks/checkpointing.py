"""Checkpoints every N optimiser steps, the last K kept, written atomically; finding the newest complete one.

`AtomicModelCheckpoint` is Lightning's ModelCheckpoint (monitor "step", mode "max": the top K by step are
the last K) with one change: each checkpoint is first written under a temporary name in the same folder
(`.tmp-step=000100.ckpt`, a file or a sharded torch.distributed.checkpoint folder alike) and renamed to
its final name only once every rank has finished writing. A crash while saving leaves a temporary entry
behind and never touches the previous checkpoints: Lightning removes the oldest one only after the new
one has been saved. Leftover temporary entries are deleted when training starts.

Beside each checkpoint lies `<name>.sha256.json` (gazelit.integrity) with the size and sha256 of its
files: every rank hashes (and fsyncs) the shard files it wrote, rank 0 writes the record, and only then
is the checkpoint renamed to its final name. Pruning keeps exactly `keep_last` checkpoints, the one a run
resumed from included (Lightning would keep that one forever).

`latest_checkpoint(folder)` is the complete checkpoint with the highest step, skipping temporary entries
and sharded folders without their metadata; `checkpoints_newest_first(folder)` lists them all, which
`resume: auto` walks until one verifies.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from gazelit.integrity import (
    INTEGRITY_SUFFIX,
    checkpoint_files,
    digest_files,
    fsync_path,
    integrity_file,
    write_integrity,
)

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
            for record in Path(self.dirpath).glob("*" + INTEGRITY_SUFFIX):  # records of vanished checkpoints
                if not record.with_name(record.name[: -len(INTEGRITY_SUFFIX)]).exists():
                    record.unlink(missing_ok=True)
        trainer.strategy.barrier("AtomicModelCheckpoint.setup")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        temporary = final.with_name(TMP_PREFIX + final.name)
        super()._save_checkpoint(trainer, str(temporary))  # every rank writes; ends with a barrier
        files = _gather(_own_digests(trainer, temporary))
        if trainer.is_global_zero:
            if final.exists():  # the same name again (e.g. a re-run of a step): replace it
                _remove(final)
            write_integrity(final, files)
            os.replace(temporary, final)
            fsync_path(final.parent)
        trainer.strategy.barrier("AtomicModelCheckpoint.rename")
        self._last_checkpoint_saved = str(final)

    def _update_best_and_save(self, current, trainer: L.Trainer, monitor_candidates) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        self._prune(trainer)

    def _prune(self, trainer: L.Trainer) -> None:
        """Keep the newest `keep_last` checkpoints on disk, whatever Lightning's bookkeeping holds (its state
        is restored only when the callback's settings match, and never counts the checkpoint resumed from)."""
        if trainer.is_global_zero and self.save_top_k > 0 and self.dirpath:
            just_written = Path(self._last_checkpoint_saved).name if self._last_checkpoint_saved else None
            for old in checkpoints_newest_first(self.dirpath)[self.save_top_k :]:
                if old.name == just_written:
                    continue
                _remove(old)
                integrity_file(old).unlink(missing_ok=True)
                self.best_k_models.pop(str(old), None)
        trainer.strategy.barrier("AtomicModelCheckpoint.prune")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            integrity_file(filepath).unlink(missing_ok=True)

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


def checkpoints_newest_first(folder: str | Path) -> list[Path]:
    """The complete checkpoints in `folder`, highest step (then newest) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [
        (step, path.stat().st_mtime, path) for path in folder.iterdir()
        if (step := checkpoint_step(path)) is not None and is_complete_checkpoint(path)
    ]  # fmt: skip
    return [path for _, _, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `folder` (None if there is none)."""
    found = checkpoints_newest_first(folder)
    return found[0] if found else None


def _own_digests(trainer: L.Trainer, checkpoint: Path) -> dict:
    """Size and sha256 of the files of `checkpoint` this rank wrote: for a sharded folder its own
    `__<rank>_*` shards (rank 0 also the rest: metadata, meta.pt); a single file on rank 0 only."""
    rank = trainer.global_rank
    if not checkpoint.exists():
        return {}
    names = checkpoint_files(checkpoint)
    if checkpoint.is_file():
        return digest_files(checkpoint, names) if rank == 0 else {}
    shard = re.compile(r"^__(\d+)_")

    def writer(name: str) -> int:
        match = shard.match(Path(name).name)
        return int(match.group(1)) if match else 0

    return digest_files(checkpoint, [n for n in names if writer(n) == rank])


def _gather(local: dict) -> dict:
    """Merge the per-rank digests (all ranks call this; a no-op in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {name: d for part in parts for name, d in (part or {}).items()}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
