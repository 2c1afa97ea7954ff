"""The progress bar of `gazelit fit`: Lightning's rich bar, labelled for runs bounded by steps.

A run with `max_steps` has `max_epochs = -1`, which Lightning's rich bar prints as "Epoch 6/-2"; this one
prints "Epoch 6 (of 800 steps)" instead. Without the `rich` package Lightning's default bar is used.
"""

from __future__ import annotations

from importlib.util import find_spec

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepBoundedProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (of {self.trainer.max_steps} steps)"
        return f"{description:{len(self.validation_description)}}"


def progress_bar() -> list[L.Callback]:
    """The bar to add to a fit's callbacks (none: Lightning's default)."""
    return [StepBoundedProgressBar()] if find_spec("rich") is not None else []
