"""One recorded `gazelit fit`, run in a subprocess by test_distributed.py (Lightning starts the other ranks
by running this module again):

    python -m tests.training.fsdp_driver OUT_DIR RECIPE [KEY=VALUE ...] [--kill-at STEP] [--dump-restored]

Every rank writes OUT_DIR/rank<R>.json (per step: loss, k, sample ids). --kill-at ends every rank with
os._exit right after the checkpoint of that step (a crash: no teardown, nothing flushed by Lightning).
--dump-restored writes the full model and optimiser state as restored from the checkpoint, at train start,
to OUT_DIR/restored.pt (rank 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch

from .helpers import KillAfterCheckpoint, RunRecorder


class RankRecorder(RunRecorder):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.rank = 0

    def setup(self, trainer, pl_module, stage) -> None:
        self.rank = trainer.global_rank

    def write(self) -> None:
        self.dump(self.out / f"rank{self.rank}.json")


class DumpRestoredState(L.Callback):
    """Full (unsharded) model and optimiser state at train start, i.e. right after the resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = trainer.optimizers[0]
        model = get_model_state_dict(pl_module, options=options)
        optim = get_optimizer_state_dict(pl_module, optimizer, options=options)
        if trainer.is_global_zero:
            torch.save({"model": model, "optimizer": optim, "global_step": trainer.global_step,
                        "k": pl_module.model.top_k}, self.path)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--dump-restored", action="store_true")
    args = parser.parse_args(argv)

    from gazelit.recipe import load_recipe
    from gazelit.training import fit

    args.out.mkdir(parents=True, exist_ok=True)
    recorder = RankRecorder(args.out)
    callbacks: list[L.Callback] = [recorder]
    if args.kill_at is not None:
        callbacks.append(KillAfterCheckpoint(args.kill_at, hard=True, before_exit=recorder.write))
    if args.dump_restored:
        callbacks.append(DumpRestoredState(args.out / "restored.pt"))
    fit(load_recipe(args.recipe, args.overrides), extra_callbacks=callbacks)
    recorder.write()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort the interpreter at exit (rc 134, ~1 run in 8); everything is written by now
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
