"""Progressive top-k: training starts dense (every region) and lowers k to the model's target.

Over `span_steps` optimiser steps after `start_step`, the fraction of the way from dense to the target
follows a shape (linear, cosine, or `steps` equal plateaus). k at fraction f is

    dense (None, "all")                            f == 0
    round(R - (R - target) * f)                    0 < f < 1
    target                                         f == 1

where R is the number of regions of one image / frame, the largest k that still means something for
a single unit. With `span_steps` 0 the model is sparse (at the target) from `start_step` on.

k never increases, not even across a resume with an edited schedule: the callback remembers the lowest
k it has applied (saved in checkpoints) and never goes above it. It sets `pl_module.set_top_k(k)` before
every training batch and logs the schedule's progress as `gaze/k_schedule_progress` (k itself is logged
by the module as `gaze/top_k`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L

from gazelit import shapes
from gazelit.schema import resolve_top_k

SHAPES = ("linear", "cosine", "step")


@dataclass(frozen=True)
class KSchedule:
    """k as a function of the optimiser step. `target` None ("all") means no schedule: always dense."""

    target: int | None
    dense_level: int  # R: regions per unit
    start_step: int = 0
    span_steps: int = 0
    shape: str = "linear"
    steps: int = 4  # plateaus of the step shape

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"k schedule shape must be one of {SHAPES}, got {self.shape!r}")
        if self.start_step < 0 or self.span_steps < 0:
            raise ValueError("k schedule start_step and span_steps must be >= 0")
        if self.shape == "step" and self.steps < 1:
            raise ValueError(f"the step shape needs steps >= 1, got {self.steps}")

    def fraction(self, step: int) -> float:
        """How far from dense (0) to the target (1) the schedule is at `step`."""
        if self.target is None or step < self.start_step:
            return 0.0
        if self.span_steps == 0:
            return 1.0
        p = min(1.0, (step - self.start_step) / self.span_steps)
        if self.shape == "linear":
            return p
        if self.shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * p))
        return math.floor(p * self.steps) / self.steps

    def k_at(self, step: int) -> int | None:
        f = self.fraction(step)
        if f <= 0.0:
            return None
        assert self.target is not None
        if f >= 1.0 or self.dense_level <= self.target:
            return self.target
        k = round(self.dense_level - (self.dense_level - self.target) * f)
        return min(self.dense_level, max(self.target, k))


def lower_k(a: int | None, b: int | None) -> int | None:
    """The sparser of two k values (None = dense = every region)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def regions_per_unit(model: Any) -> int:
    """Regions of one image / frame of a GazeVLM: ceil(rows / r_h) * ceil(cols / r_w)."""
    return shapes.regions_per_unit(model.visual_grid, model.config.gaze.region)


class ProgressiveTopK(L.Callback):
    """Applies a KSchedule to a GazeVLMModule before every training batch; its state travels in checkpoints.

    `target` and `dense_level` default to the model's (model.gaze.top_k, regions per unit).
    """

    def __init__(
        self,
        start_step: int = 0,
        span_steps: int = 0,
        shape: str = "linear",
        steps: int = 4,
        target: int | None | str = "model",
        dense_level: int | None = None,
    ):
        self.settings = {"start_step": start_step, "span_steps": span_steps, "shape": shape, "steps": steps}
        KSchedule(target=None, dense_level=1, **self.settings)  # validate early
        self._target = target
        self._dense_level = dense_level
        self.schedule: KSchedule | None = None
        self.lowest: int | None = None  # the lowest k applied so far (None: only dense so far)
        self.current: int | None = None

    @staticmethod
    def from_config(config: Any) -> ProgressiveTopK:
        """From a recipe's `schedule` section (gazelit.recipe.KScheduleConfig)."""
        return ProgressiveTopK(config.start_step, config.span_steps, config.shape, config.steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        target = model.config.gaze.top_k if self._target == "model" else resolve_top_k(self._target)
        dense = self._dense_level if self._dense_level is not None else regions_per_unit(model)
        self.schedule = KSchedule(target=target, dense_level=dense, **self.settings)

    def k_for_step(self, step: int) -> int | None:
        assert self.schedule is not None, "setup() has not run"
        return lower_k(self.schedule.k_at(step), self.lowest)

    def apply(self, pl_module: L.LightningModule, step: int) -> int | None:
        k = self.k_for_step(step)
        pl_module.set_top_k(k)
        self.current = k
        self.lowest = lower_k(self.lowest, k)
        return k

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.global_step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.apply(pl_module, trainer.global_step)
        assert self.schedule is not None
        size = batch["input_ids"].shape[0] if isinstance(batch, dict) and "input_ids" in batch else None
        pl_module.log("gaze/k_schedule_progress", self.schedule.fraction(trainer.global_step), batch_size=size)

    def state_dict(self) -> dict[str, Any]:
        return {"lowest": self.lowest, "current": self.current, **self.settings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lowest = state_dict.get("lowest")
        self.current = state_dict.get("current")
