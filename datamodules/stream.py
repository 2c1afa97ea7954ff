"""The training/evaluation stream: an IterableDataset yielding collated batches, one rank at a time.

Two modes:
* fixed-length epochs (training): every rank yields exactly `batches_per_epoch` batches, the DataLoader's
  workers taking batch indices round-robin (batch i comes from worker i % num_workers, which is how
  torch's DataLoader consumes workers). Batch j of a worker is built from draws [j*B, (j+1)*B) of its slot's
  stream (B = batch_size); bad draws are dropped, so a batch may be smaller, and a batch whose draws are
  all bad repeats the worker's last good sample (meta "filler": True) so that ranks stay in step. Since a
  worker's position is a pure function of the number of batches the rank consumed, resuming only needs
  (epoch, batches consumed), which is the same on every rank.
* single pass (validation, tests, coverage checks): every shard is read once by exactly one (rank,
  worker); batches hold up to batch_size good samples; the last one may be smaller.

Skipped samples are counted per reason in every batch (`batch["skipped"]`) and by the SkipTally guard.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from gazelit.datamodules.collate import Collator
from gazelit.datamodules.samples import ProcessedSample, SampleProcessor
from gazelit.datamodules.manifest import stable_detail
from gazelit.datamodules.shards import LOST, MixedDraws, RawSample, ShardSource, SourceReader
from gazelit.datamodules.skips import SHARD_ERROR, SkipFractionExceeded, SkipSample, SkipTally

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamOptions:
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    window_shards: int = 4
    max_skip_fraction: float = 0.05
    skip_check_min_samples: int = 200
    lookahead_limit: int = 1000  # draws searched for a good sample when a worker has none yet


def batches_of_worker(total_batches: int, worker: int, num_workers: int) -> int:
    """How many of the batch indices [0, total_batches) fall to `worker` (index % num_workers)."""
    return max(0, -(-(total_batches - worker) // num_workers))


class GazeStream(IterableDataset):
    """Batches of one rank. `batches_per_epoch=None` selects the single-pass mode."""

    def __init__(
        self,
        sources: list[ShardSource],
        processor: SampleProcessor,
        collator: Collator,
        options: StreamOptions,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
    ):
        super().__init__()
        if not sources:
            raise ValueError("a stream needs at least one source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batches_per_epoch is not None and any(s.num_samples == 0 for s in sources):
            empty = [s.name for s in sources if s.num_samples == 0]
            raise ValueError(f"sources {empty} have no samples")
        self.sources = sources
        self.processor = processor
        self.collator = collator
        self.options = options
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts (read by the worker processes when they are created)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.batches_per_epoch is None:
            return self._single_pass(worker, num_workers)
        return self._fixed_epoch(worker, num_workers)

    # ------------------------------------------------------------------------------------ modes
    def _fixed_epoch(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        assert self.batches_per_epoch is not None
        # After resuming at batch k, DataLoader worker 0 must produce batch k: rotate the roles.
        logical = (worker + self.start_batch) % num_workers
        done = batches_of_worker(self.start_batch, logical, num_workers)
        remaining = batches_of_worker(self.batches_per_epoch, logical, num_workers) - done
        if remaining <= 0:
            return
        bs = self.options.batch_size
        run = _WorkerRun(self, logical, num_workers, repeat=True)
        draws = run.draws.draws(skip=done * bs)
        ahead: deque[ProcessedSample | None] = deque()
        last_good: ProcessedSample | None = None

        def next_result() -> ProcessedSample | None:
            return ahead.popleft() if ahead else run.process(next(draws))

        for _ in range(remaining):
            good = [s for s in (next_result() for _ in range(bs)) if s is not None]
            if good:
                last_good = good[-1]
            else:
                filler = last_good or self._look_ahead(run, draws, ahead)
                good = [dataclasses.replace(filler, meta={**filler.meta, "filler": True})]
            yield run.batch(good)

    def _look_ahead(self, run: _WorkerRun, draws: Iterator, ahead: deque) -> ProcessedSample:
        """The next good sample of the stream, keeping every result looked at for its own turn."""
        for _ in range(self.options.lookahead_limit):
            result = run.process(next(draws))
            ahead.append(result)
            if result is not None:
                return result
        raise SkipFractionExceeded(
            f"no usable sample in {self.options.lookahead_limit} draws: " + run.tally.describe()
        )

    def _single_pass(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        run = _WorkerRun(self, worker, num_workers, repeat=False)
        draws = run.draws.draws()
        while chunk := list(islice(draws, self.options.batch_size)):
            good = [s for s in map(run.process, chunk) if s is not None]
            if good:
                yield run.batch(good)


class _WorkerRun:
    """Per-worker state of one iteration: the slot's draws, the processing and the skip tally."""

    def __init__(self, stream: GazeStream, worker: int, num_workers: int, repeat: bool):
        opts = stream.options
        self.stream = stream
        slot = stream.rank * num_workers + worker
        num_slots = stream.world_size * num_workers
        self.tally = SkipTally(
            opts.max_skip_fraction,
            opts.skip_check_min_samples,
            where=f"(rank {stream.rank}, worker {worker}, epoch {stream.epoch})",
        )
        readers = [
            SourceReader(
                source, index, slot, num_slots, opts.seed, stream.epoch, opts.shuffle,
                opts.shuffle_buffer, opts.window_shards, repeat, self._on_shard_error,
            )  # fmt: skip
            for index, source in enumerate(stream.sources)
        ]
        self.draws = MixedDraws(readers, opts.seed, stream.epoch, slot, repeat)
        self._reported: set[str] = set()

    def process(self, draw: tuple[int, RawSample]) -> ProcessedSample | None:
        source_index, raw = draw
        source = self.stream.sources[source_index]
        if LOST in raw:  # a sample its shard failed to deliver: one skip, at its manifest position
            self.tally.record_skip(SHARD_ERROR, _shard_name(raw))
            return None
        try:
            sample = self.stream.processor(raw, source.name)
        except SkipSample as skip:
            self.tally.record_skip(skip.reason, _shard_name(raw))
            return None
        self.tally.record_good()
        return sample

    def batch(self, samples: list[ProcessedSample]) -> dict[str, Any]:
        """Collate, attaching the draws and skips (by reason and by shard) since the previous batch."""
        since = self.tally.take_since_last_batch()
        batch = self.stream.collator(samples, since.by_reason)
        batch["draws"] = since.draws
        batch["skipped_shards"] = since.by_shard
        return batch

    def _on_shard_error(self, url: str, exc: Exception) -> None:
        # counted per lost sample when the window ends (datamodules.shards); here only reported
        if url not in self._reported:
            self._reported.add(url)
            log.warning("shard %s: %s: %s (its unread samples are skipped as shard_error)", url,
                        type(exc).__name__, stable_detail(str(exc))[:300])  # fmt: skip


def _shard_name(raw: RawSample) -> str:
    return str(raw.get("__url__", "?"))
