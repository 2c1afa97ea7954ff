"""Bad-sample accounting: the reasons a sample is skipped, a per-worker tally, and the skip-fraction guard.

A sample that cannot be trained on is never fatal: the stream raises `SkipSample` inside its processing,
counts it under a stable reason string and moves on. The tally reports counts since the previous batch
(attached to every batch as `batch["skipped"]`, so the counts survive DataLoader worker processes) and
raises `SkipFractionExceeded` naming the offending shards once too large a fraction of a worker's draws
has been skipped.
"""

from __future__ import annotations

from collections import Counter

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


class SkipTally:
    """Counts draws and skips of one worker; checks the skip fraction against a limit.

    `max_fraction` >= 1 disables the guard. The check only starts after `min_draws` draws so that a
    couple of bad samples at the start of a stream do not trip it.
    """

    def __init__(self, max_fraction: float, min_draws: int, where: str = ""):
        self.max_fraction = max_fraction
        self.min_draws = max(1, min_draws)
        self.where = where
        self.draws = 0
        self.skips: Counter[str] = Counter()
        self.skips_by_shard: Counter[str] = Counter()
        self._since_last_batch: Counter[str] = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def record_good(self) -> None:
        self.draws += 1

    def record_skip(self, reason: str, shard: str) -> None:
        self.draws += 1
        self.skips[reason] += 1
        self.skips_by_shard[shard] += 1
        self._since_last_batch[reason] += 1
        self.check()

    def take_since_last_batch(self) -> dict[str, int]:
        """Counts by reason since the previous call; resets them."""
        out = dict(self._since_last_batch)
        self._since_last_batch.clear()
        return out

    def check(self) -> None:
        if self.max_fraction >= 1 or self.draws < self.min_draws:
            return
        fraction = self.skipped / self.draws
        if fraction > self.max_fraction:
            raise SkipFractionExceeded(self.describe(fraction))

    def describe(self, fraction: float | None = None) -> str:
        fraction = self.skipped / max(self.draws, 1) if fraction is None else fraction
        shards = ", ".join(f"{name} ({count})" for name, count in self.skips_by_shard.most_common(10))
        more = len(self.skips_by_shard) - 10
        return (
            f"{self.skipped} of {self.draws} samples skipped ({fraction:.1%}) {self.where}, above "
            f"max_skip_fraction={self.max_fraction}; by reason {dict(self.skips)}; shards with skips: {shards}"
            + (f" and {more} more" if more > 0 else "")
        )


def skip_metrics(batch: dict, prefix: str = "data/skipped/") -> dict[str, float]:
    """Metric name -> count for `batch["skipped"]`, every known reason present (0 when none), for
    `LightningModule.log_dict(..., reduce_fx="sum")`."""
    counts = batch.get("skipped") or {}
    names = list(STREAM_SKIP_REASONS) + sorted(set(counts) - set(STREAM_SKIP_REASONS))
    return {prefix + name: float(counts.get(name, 0)) for name in names}
