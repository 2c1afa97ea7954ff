"""The resumable training loader: a known epoch length and a rank-independent stream position.

Lightning saves `state_dict()` of a train loader that has one (fit loop "combined_loader" state; only rank
0's is written) and calls `load_state_dict()` when resuming mid-epoch. The state is (epoch, batches the
rank consumed in it) plus the settings the position depends on; every rank consumed the same number of
batches, so rank 0's state is right for all of them. Each worker recomputes its own position from it and
skips shards and samples without decoding them (see datamodules.stream / datamodules.shards).

`__len__` is known, so Lightning neither prefetches ahead of the training step (the count is exact when a
checkpoint is taken) nor needs a distributed sampler. `__iter__` is a generator: the position is read at
the first `next()`, so a state loaded after Lightning created the iterator (e.g. when
`trainer.estimated_stepping_batches` built the loader early, PL #20550) still applies.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from gazelit.datamodules.skips import SkipTally
from gazelit.datamodules.stream import GazeStream

STATE_VERSION = 1


def init_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers already run in parallel; intra-op threads would oversubscribe


def already_collated(batch: dict) -> dict:
    """collate_fn of the stream loaders: the stream yields finished batches, and torch's default
    (default_convert) would walk every nested list of every batch for nothing."""
    return batch


class ResumableLoader:
    """Iterable over one rank's training batches, `batches_per_epoch` per epoch, resumable mid-epoch."""

    def __init__(
        self,
        stream: GazeStream,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ):
        if stream.batches_per_epoch is None or stream.batches_per_epoch < 1:
            raise ValueError("a resumable loader needs a stream with batches_per_epoch >= 1")
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self._epoch = 0
        self._consumed = 0
        self._started = False  # an epoch has begun yielding since construction / the last load
        self._pending: tuple[int, int] | None = None
        self._running: weakref.WeakSet = weakref.WeakSet()  # epochs' generators not yet finished
        # this rank's draws and skips over the whole run (every epoch, across resumes): the skip guard
        # that per-worker tallies, which restart with every epoch, cannot be
        opts = stream.options
        self.run_skips: SkipTally | None = SkipTally(
            opts.max_skip_fraction, opts.skip_check_min_samples, where="(this rank, whole run)"
        )

    def __len__(self) -> int:
        return int(self.stream.batches_per_epoch)  # type: ignore[arg-type]

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches()
        self._running.add(batches)
        return batches

    def close(self) -> None:
        """Stop the DataLoader workers of unfinished epochs at once (also when the loader is dropped, and at
        the datamodule's teardown): a run that stops mid-epoch would otherwise leave them for torch to
        reap at exit."""
        for batches in list(getattr(self, "_running", ())):
            batches.close()

    def __del__(self) -> None:
        self.close()

    def _batches(self) -> Iterator[dict[str, Any]]:
        epoch, start = self._begin_epoch()
        if start >= len(self):
            return
        self.stream.set_position(epoch, start)
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            worker_init_fn=init_worker if self.num_workers > 0 else None,
            collate_fn=already_collated,
            pin_memory=self.pin_memory,
            persistent_workers=False,  # workers must be re-created to see the new position
            # workers' base seed from the position, not from torch's global generator: starting an epoch
            # then draws nothing from it, so resumed and uninterrupted runs draw alike (callbacks/rng_state)
            generator=torch.Generator().manual_seed(
                (self.stream.options.seed * 1_000_003 + epoch) * 1_000_003 + start
            ),
        )
        iterator = iter(loader)
        try:
            for batch in iterator:
                self._consumed += 1
                if self.run_skips is not None and "draws" in batch:
                    self.run_skips.add_batch(batch["draws"], batch.get("skipped") or {}, batch.get("skipped_shards") or {})
                yield batch
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
            if shutdown is not None:
                shutdown()

    def _begin_epoch(self) -> tuple[int, int]:
        if self._pending is not None:
            epoch, start = self._pending
            self._pending = None
            if start >= len(self):  # the saved epoch had finished
                epoch, start = epoch + 1, 0
        elif self._started:
            epoch, start = self._epoch + 1, 0
        else:
            epoch, start = self._epoch, 0
        self._epoch, self._consumed, self._started = epoch, start, True
        return epoch, start

    # ------------------------------------------------------------------------------------ state
    def _settings(self) -> dict[str, Any]:
        opts = self.stream.options
        return {
            "batch_size": opts.batch_size,
            "world_size": self.stream.world_size,
            "num_workers": max(1, self.num_workers),
            "seed": opts.seed,
            "sources": [[s.name, len(s.paths), s.num_samples, s.weight] for s in self.stream.sources],
        }

    def state_dict(self) -> dict[str, Any]:
        """Rank-independent stream position: epoch and batches consumed, plus the settings it assumes."""
        epoch, consumed = self._pending if self._pending is not None else (self._epoch, self._consumed)
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "batches_per_epoch": len(self),
            "run_skips": self.run_skips.state() if self.run_skips is not None else {},
            **self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` at the next iteration. Raises ValueError if the stream settings differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        expected = self._settings()
        saved = {key: state.get(key) for key in expected}
        different = {k: (saved[k], expected[k]) for k in expected if _normalise(saved[k]) != _normalise(expected[k])}
        if different:
            details = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in different.items())
            raise ValueError(
                "cannot resume the data stream: the stream position depends on settings that changed "
                f"({details}). Resume with the same settings, or start the epoch over without the loader state."
            )
        self._pending = (int(state["epoch"]), int(state["batches_consumed"]))
        if self.run_skips is not None and state.get("run_skips"):
            self.run_skips.load(state["run_skips"])


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
