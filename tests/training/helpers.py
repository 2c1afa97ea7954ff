"""Shared by the training, callback and recipe tests: a tiny demo data set, a fast variant of the demo
recipe, and callbacks that record a run (per-step loss, k, sample ids) or kill it after a checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
from typing import Any

import lightning as L
import torch

from gazelit.training.checkpoints import checkpoint_metadata, is_sharded_checkpoint

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"

# a small demo data set: 96 training samples (24 batches of 4) in 8 shards, 16 validation samples in 2
DEMO_DATA = {
    "train": 96,
    "val": 16,
    "test": 0,
    "image_size": 64,
    "grid": 4,
    "video_fraction": 0.0,
    "shard_size": 12,
}


def demo_data_config(out: Path):
    """The demo recipe's own data settings (tasks, questions per image, ...) at the small test size."""
    from dataclasses import replace

    from gazelit.recipe import load_recipe

    return replace(load_recipe(DEMO_RECIPE).demo, out=str(out), **DEMO_DATA)


def demo_overrides(data_dir: Path) -> list[str]:
    return [f"demo.out={data_dir}"] + [f"demo.{k}={v}" for k, v in DEMO_DATA.items()]


def fast_overrides(data_dir: Path, run_root: Path, name: str, **extra: Any) -> list[str]:
    """The demo recipe shrunk to a few seconds of training: 4 steps of batch 4, validation and a checkpoint
    every 2 steps, a routing picture every 2 steps, k dense at steps 0-1 and 4 from step 3 on (the tests pin
    k = 4, not the demo's 2, so that the schedule's middle step has a k of its own: 10)."""
    settings = {
        "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 16, "data.skip_check_min_samples": 20,
        "trainer.max_steps": 4, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1,
        "trainer.log_every_n_steps": 1,
        "train.optim.warmup_steps": 1,
        "model.gaze.top_k": 4, "schedule.start_step": 1, "schedule.span_steps": 2, "schedule.shape": "cosine",
        "checkpoint.every_n_steps": 2, "checkpoint.keep_last": 2,
        "logging.routing_image_every_n_steps": 2, "logging.routing_max_new_tokens": 3,
        "run.root": str(run_root), "run.name": name,
    }  # fmt: skip
    settings.update(extra)
    return demo_overrides(data_dir) + [f"{k}={v}" for k, v in settings.items()]


class RunRecorder(L.Callback):
    """Per optimiser step: the loss, the model's k and the ids of the batch's samples (this rank)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.question_head = None  # the module's at the end of training (the routing picture's blue head)

    def on_train_end(self, trainer, pl_module) -> None:
        self.question_head = getattr(pl_module, "question_head", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append({
            "step": trainer.global_step - 1,  # the step this batch was trained at
            "loss": float(loss.detach()),
            "k": pl_module.model.top_k,
            "ids": [m["id"] for m in batch["meta"]],
        })  # fmt: skip

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.steps))


class KilledRun(RuntimeError):
    pass


class KillAfterCheckpoint(L.Callback):
    """Ends the run abruptly at the start of step `step`, i.e. right after the checkpoint of step `step`
    was written: in-process by raising, or (`hard`) by os._exit on every rank after `before_exit()`."""

    def __init__(self, step: int, hard: bool = False, before_exit=None) -> None:
        self.step = step
        self.hard = hard
        self.before_exit = before_exit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.before_exit is not None:
                self.before_exit()
            if self.hard:
                os._exit(KILLED_EXIT_CODE)
            raise KilledRun(f"killed at step {self.step}")


KILLED_EXIT_CODE = 97


def full_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint as one dict. A DCP folder is consolidated with `dcp_to_torch_save` (model
    under "state_dict", optimisers under "optimizer_0", ...) and merged with its meta.pt."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "consolidated.pt"
        dcp_to_torch_save(path, consolidated)
        tensors = torch.load(consolidated, map_location="cpu", weights_only=True)
    return {**checkpoint_metadata(path), **tensors}
