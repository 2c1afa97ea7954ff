"""The datamodule of a training run: GazeDataModule with validation that keeps the ranks in step.

The validation stream splits shards between ranks, so ranks can hold different numbers of validation
batches (a split with fewer shards than ranks leaves some with none). Under FSDP every forward is a
collective, and a rank with an extra batch would wait forever for the others. `EvenBatches` stops every
rank's validation as soon as one of them runs out (one all-reduce of a flag per batch), so the metrics
cover min over ranks x world size batches; tail batches of the other ranks are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from gazelit.datamodules.datamodule import GazeDataModule


class EvenBatches:
    """Yields batches of `loader` while every rank still has one."""

    def __init__(self, loader: Iterable, strategy: Any):
        self.loader = loader
        self.strategy = strategy

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            batch = next(iterator, None)
            if not self.strategy.reduce_boolean_decision(batch is not None, all=True):
                return
            yield batch


class TrainingDataModule(GazeDataModule):
    def val_dataloader(self):
        loader = super().val_dataloader()
        if self.trainer is None or self.trainer.world_size == 1 or isinstance(loader, list):
            return loader
        return EvenBatches(loader, self.trainer.strategy)
