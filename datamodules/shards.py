"""Raw samples from shards for one stream slot: shard order, shuffling windows, fast-forward, mixing.

A *slot* is one (rank, worker) pair: slot = rank * num_workers + worker, out of world_size * num_workers.
For every source, the shard list is shuffled once per pass (seeded by seed, epoch, source and pass) and the
passes are concatenated; slot s takes positions s, s + num_slots, ... of that sequence. One pass in
non-repeating mode gives every shard to exactly one slot; repeating mode never runs dry, whatever the
number of shards.

A slot reads its shards in *windows* of `window_shards` shards; samples are shuffled with webdataset's
shuffle buffer inside each window (seeded per window) and the buffer drains at the window's end. Because
the manifest gives each shard's sample count, skipping the first n samples of a slot's stream skips whole
windows without opening them and only reads (never decodes) the samples of the window it lands in.

Several sources are mixed per draw by weight with a seeded RNG, so the source of draw d is known without
reading anything: fast-forwarding replays the RNG and skips each source separately.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from gazelit.datamodules.manifest import Manifest

RawSample = dict[str, Any]
LOST = "__lost__"  # key of a placeholder for a sample a shard failed to deliver


@dataclass(frozen=True)
class ShardSource:
    """One dataset as shards with known sample counts, and its mixing weight."""

    name: str
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    weight: float = 1.0

    @classmethod
    def from_manifest(cls, path: str | Path, weight: float = 1.0, name: str = "") -> ShardSource:
        return cls.from_loaded_manifest(Manifest.load(path), weight, name)

    @classmethod
    def from_loaded_manifest(cls, manifest: Manifest, weight: float = 1.0, name: str = "") -> ShardSource:
        assert manifest.directory is not None
        return cls(
            name=name or manifest.directory.name,
            paths=tuple(str(p) for p in manifest.shard_paths()),
            counts=tuple(s.samples for s in manifest.shards),
            weight=weight,
        )

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def slot_shards(
    num_shards: int, slot: int, num_slots: int, seed: int, epoch: int, source: int, shuffle: bool, repeat: bool
) -> Iterator[int]:
    """Shard indices read by `slot`: every num_slots-th position of the concatenated per-pass orders."""
    if num_shards == 0:
        return
    position = 0
    for pass_index in itertools.count() if repeat else range(1):
        order = list(range(num_shards))
        if shuffle:
            random.Random(f"shards/{seed}/{epoch}/{source}/{pass_index}").shuffle(order)
        for shard in order:
            if position % num_slots == slot:
                yield shard
            position += 1


class SourceReader:
    """The raw samples one slot reads from one source, in windows of shards, shuffled within windows."""

    def __init__(
        self,
        source: ShardSource,
        source_index: int,
        slot: int,
        num_slots: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        shuffle_buffer: int,
        window_shards: int,
        repeat: bool,
        on_shard_error: Callable[[str, Exception], None],
    ):
        self.source = source
        self.source_index = source_index
        self.slot = slot
        self.num_slots = num_slots
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.window_shards = max(1, window_shards)
        self.repeat = repeat
        self.on_shard_error = on_shard_error

    def samples(self, skip: int = 0) -> Iterator[RawSample]:
        """The slot's samples of this source, starting after the first `skip` of them."""
        shards = slot_shards(
            len(self.source.paths), self.slot, self.num_slots, self.seed, self.epoch,
            self.source_index, self.shuffle, self.repeat,
        )  # fmt: skip
        window_index = 0
        shards_without_samples = 0
        while window := list(islice(shards, self.window_shards)):
            size = sum(self.source.counts[s] for s in window)
            if skip >= size:
                skip -= size  # the whole window was consumed before: not even opened
            else:
                shards_without_samples += len(window)
                seen: dict[str, int] = {}
                for sample in itertools.chain(self._read_window(window, window_index), self._lost(window, seen)):
                    if LOST not in sample:
                        shards_without_samples = 0
                        url = str(sample.get("__url__", ""))
                        seen[url] = seen.get(url, 0) + 1
                    if skip:
                        skip -= 1
                        continue
                    yield sample
                if shards_without_samples > len(self.source.paths):  # a whole pass gave nothing
                    raise RuntimeError(f"no shard of source {self.source.name!r} could be read")
            window_index += 1

    def _lost(self, window: list[int], seen: dict[str, int]) -> Iterator[RawSample]:
        """After a window: one placeholder per sample its shards should have held but did not yield
        (unreadable, truncated, deleted). Positions stay those of the manifest, so the stream (and a resume)
        stays exact, and each lost sample is counted as one skip."""
        for s in window:
            url = self.source.paths[s]
            for _ in range(max(0, self.source.counts[s] - seen.get(url, 0))):
                yield {LOST: True, "__url__": url}

    def _read_window(self, window: list[int], window_index: int) -> Iterator[RawSample]:
        files = tar_file_expander(self._open_shards(window), handler=self._handle_error)
        samples = group_by_keys(files, handler=self._handle_error)
        if not self.shuffle:
            return samples
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.source_index}/{self.slot}/{window_index}")
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _open_shards(self, window: list[int]) -> Iterator[dict]:
        """Shard streams for webdataset's tar expander, closed even when the reader stops mid-shard
        (webdataset's own url_opener leaves them to the garbage collector)."""
        for s in window:
            url = self.source.paths[s]
            try:
                stream = open(url, "rb")
            except OSError as exc:
                exc.args = (*exc.args, url)
                if self._handle_error(exc):
                    continue
                return
            with stream:
                yield {"url": url, "stream": stream}

    def _handle_error(self, exc: Exception) -> bool:
        """Read errors are reported (logged); the samples they cost are counted by `_lost`."""
        url = next((a for a in reversed(exc.args) if isinstance(a, str) and a.endswith(".tar")), "?")
        self.on_shard_error(url, exc)
        return True  # keep going with the next shard


class MixedDraws:
    """Draws (source index, raw sample) for one slot, choosing the source of each draw by weight."""

    def __init__(self, readers: list[SourceReader], seed: int, epoch: int, slot: int, repeat: bool):
        if not readers:
            raise ValueError("no sources to draw from")
        self.readers = readers
        self.weights = [r.source.weight for r in readers]
        self.seed, self.epoch, self.slot, self.repeat = seed, epoch, slot, repeat

    def draws(self, skip: int = 0) -> Iterator[tuple[int, RawSample]]:
        """All draws after the first `skip` ones (which are skipped without decoding anything)."""
        if len(self.readers) == 1:
            for sample in self.readers[0].samples(skip):
                yield 0, sample
            return
        rng = random.Random(f"mix/{self.seed}/{self.epoch}/{self.slot}")
        choices = range(len(self.readers))
        skipped_per_source = [0] * len(self.readers)
        for _ in range(skip):
            skipped_per_source[rng.choices(choices, self.weights)[0]] += 1
        streams = [r.samples(n) for r, n in zip(self.readers, skipped_per_source)]
        active = list(choices)
        while active:
            index = rng.choices(active, [self.weights[i] for i in active])[0]
            sample = next(streams[index], None)
            if sample is None:
                if self.repeat:
                    raise RuntimeError(f"source {self.readers[index].source.name!r} yielded no samples")
                active.remove(index)
                continue
            yield index, sample
