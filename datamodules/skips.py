"""Bad-sample accounting: the reasons a sample is skipped, a per-worker tally, and the skip-fraction guard.

A sample that cannot be trained on is never fatal: the stream raises `SkipSample` inside its processing,
counts it under a stable reason string and moves on. The tally reports counts since the previous batch
(attached to every batch as `batch["skipped"]`, so the counts survive DataLoader worker processes) and
raises `SkipFractionExceeded` naming the offending shards once too large a fraction of a worker's draws
has been skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Reasons the training stream skips a sample (stable strings: they become metric names).
DECODE_ERROR = "decode_error"  # corrupt or unreadable image
VIDEO_ERROR = "video_error"  # truncated or unreadable video, gif or frame folder
PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # <image> count differs from the number of images/videos
EMPTY_CONVERSATION = "empty_conversation"  # no turns, or every turn empty
ALL_MASKED = "all_masked"  # nothing supervised (no assistant text, or none left after truncation)
OVER_LENGTH = "over_length"  # the visual units alone do not fit in max_length
BAD_RECORD = "bad_record"  # the sample's json is unreadable or its media member is missing from the shard
SHARD_ERROR = "shard_error"  # a shard (tar file) could not be read to its end

STREAM_SKIP_REASONS = (
    DECODE_ERROR,
    VIDEO_ERROR,
    PLACEHOLDER_MISMATCH,
    EMPTY_CONVERSATION,
    ALL_MASKED,
    OVER_LENGTH,
    BAD_RECORD,
    SHARD_ERROR,
)


class SkipSample(Exception):
    """Raised while preparing one sample that must be skipped; `reason` is one of STREAM_SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipFractionExceeded(RuntimeError):
    """Too many samples of a stream were skipped; the message names the reasons and the shards involved."""


@dataclass
class SinceLastBatch:
    draws: int
    by_reason: dict[str, int]
    by_shard: dict[str, int]


class SkipTally:
    """Counts draws and skips (of one worker, or of a whole run); checks the skip fraction against a limit.

    `max_fraction` >= 1 disables the guard. It is checked from the first draw: it trips once the skips
    exceed `max_fraction * max(draws, min_draws)`, so a few bad samples at the start of a stream (up to
    the fraction of `min_draws`) are tolerated and a stream that starts with many is stopped at once.
    """

    def __init__(self, max_fraction: float, min_draws: int, where: str = ""):
        self.max_fraction = max_fraction
        self.min_draws = max(1, min_draws)
        self.where = where
        self.draws = 0
        self.skips: Counter[str] = Counter()
        self.skips_by_shard: Counter[str] = Counter()
        self._since_last_batch: Counter[str] = Counter()
        self._shards_since: Counter[str] = Counter()
        self._draws_since = 0

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def record_good(self, count: int = 1) -> None:
        self.draws += count
        self._draws_since += count

    def record_skip(self, reason: str, shard: str, count: int = 1) -> None:
        self.draws += count
        self._draws_since += count
        self.skips[reason] += count
        self.skips_by_shard[shard] += count
        self._since_last_batch[reason] += count
        self._shards_since[shard] += count
        self.check()

    def take_since_last_batch(self) -> SinceLastBatch:
        """Draws, and skips by reason and by shard, since the previous call; resets them."""
        out = SinceLastBatch(self._draws_since, dict(self._since_last_batch), dict(self._shards_since))
        self._since_last_batch.clear()
        self._shards_since.clear()
        self._draws_since = 0
        return out

    def check(self) -> None:
        if self.max_fraction >= 1:
            return
        if self.skipped > self.max_fraction * max(self.draws, self.min_draws):
            raise SkipFractionExceeded(self.describe())

    def add_batch(self, draws: int, by_reason: dict[str, int], by_shard: dict[str, int]) -> None:
        """Fold in one batch's counts (the run-level guard in the main process) and check."""
        self.draws += draws
        self.skips.update(by_reason)
        self.skips_by_shard.update(by_shard)
        self.check()

    def state(self) -> dict:
        return {"draws": self.draws, "skips": dict(self.skips), "skips_by_shard": dict(self.skips_by_shard)}

    def load(self, state: dict) -> None:
        self.draws = int(state.get("draws", 0))
        self.skips = Counter(state.get("skips", {}))
        self.skips_by_shard = Counter(state.get("skips_by_shard", {}))

    def describe(self, fraction: float | None = None) -> str:
        fraction = self.skipped / max(self.draws, 1) if fraction is None else fraction
        shards = ", ".join(f"{name} ({count})" for name, count in self.skips_by_shard.most_common(10))
        more = len(self.skips_by_shard) - 10
        return (
            f"{self.skipped} of {self.draws} samples skipped ({fraction:.1%}) {self.where}, above "
            f"max_skip_fraction={self.max_fraction}; by reason {dict(self.skips)}; worst shards: {shards}"
            + (f" and {more} more" if more > 0 else "")
        )
