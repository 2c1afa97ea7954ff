"""After Ctrl-C: say which checkpoint a run can continue from, and the command that continues it."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L

from gazelit.callbacks.checkpointing import checkpoint_step, latest_checkpoint


class InterruptReport(L.Callback):
    def __init__(self, checkpoints: str | Path, continue_command: str):
        self.checkpoints = Path(checkpoints)
        self.continue_command = continue_command

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        last = latest_checkpoint(self.checkpoints)
        if last is None:
            print(f"\ninterrupted at step {trainer.global_step}; no checkpoint was written yet "
                  f"(the next run starts from scratch): {self.continue_command}", file=sys.stderr, flush=True)  # fmt: skip
            return
        print(f"\ninterrupted at step {trainer.global_step}; last checkpoint: {last} (step {checkpoint_step(last)})\n"
              f"continue with: {self.continue_command}", file=sys.stderr, flush=True)  # fmt: skip
