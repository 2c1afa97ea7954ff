"""Resuming the training stream on a different number of ranks than the checkpoint was written with.

The stream position in a checkpoint (datamodules.loader.ResumableLoader.state_dict) is (epoch, batches
each rank consumed) and is only exact for the world size that wrote it: the shards are split between
ranks, so which samples a rank has seen depends on how many ranks there are. The loader refuses a state
from another world size. Model and optimiser states reshard fine (torch.distributed.checkpoint), so this
callback makes such a resume possible by translating the position: the run continues in the same epoch
at the same fraction of it (consumed * old_world_size // new_world_size batches per rank). Which samples
are seen in the rest of that epoch is not what an uninterrupted run would have seen (some are repeated,
some skipped); from the next epoch on the stream is the normal one for the new world size. A warning says
so. With the same world size the checkpoint is left untouched (exact resume).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class StreamResumeAcrossWorldSizes(L.Callback):
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "batches_per_epoch"):
            return
        key = type(datamodule).__qualname__
        loader_states = _loop_loader_states(checkpoint)
        saved = (checkpoint.get(key) or {}).get("train_stream") or (loader_states[0] if loader_states else None)
        if not saved or saved.get("world_size") in (None, trainer.world_size):
            return
        old, new = int(saved["world_size"]), trainer.world_size
        consumed = int(saved["batches_consumed"]) * old // new
        adapted = {**saved, "world_size": new, "batches_consumed": consumed,
                   "batches_per_epoch": datamodule.batches_per_epoch}  # fmt: skip
        log.warning(
            "resuming on %d ranks from a checkpoint written by %d: the data stream continues epoch %d at batch "
            "%d of %d per rank (the same fraction of the epoch); the samples of the rest of this epoch differ "
            "from an uninterrupted run's, later epochs are exact for the new world size",
            new, old, adapted["epoch"], consumed, adapted["batches_per_epoch"],
        )  # fmt: skip
        if key in checkpoint:
            checkpoint[key] = {**checkpoint[key], "train_stream": adapted}
        if loader_states:
            loader_states[0] = adapted
        datamodule.load_state_dict({"train_stream": adapted})  # it may have been restored already


def _loop_loader_states(checkpoint: dict[str, Any]) -> list | None:
    """The fit loop's copy of the train loader state (a list, one per loader), or None."""
    fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    states = (fit.get("state_dict") or {}).get("combined_loader")
    return states if isinstance(states, list) and states else None
