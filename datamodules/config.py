"""Typed configuration of the data pipeline (plain values; the recipe system maps YAML onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One shard set written by `gazelit convert`: its directory (or manifest.json) and mixing weight."""

    path: str = ""
    weight: float = 1.0
    name: str = ""  # shown in metrics and sample meta; defaults to the directory name


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)
    test_sources: list[SourceConfig] = field(default_factory=list)

    batch_size: int = 8  # per rank
    val_batch_size: int | None = None  # defaults to batch_size
    num_workers: int = 4
    prefetch_factor: int = 2
    pin_memory: bool = False

    # epoch length: steps_per_epoch (batches per rank) if set, else samples_per_epoch, else the total
    # number of samples of all training sources; either way every rank yields the same number of batches
    samples_per_epoch: int | None = None
    steps_per_epoch: int | None = None

    max_length: int = 2048
    system_prompt: str | None = "You are a helpful assistant."
    pad_to_multiple_of: int = 1

    max_frames: int = 32
    fps: float = 1.0  # video frames sampled per second
    frames_fps: float = 1.0  # frame rate assumed for frame folders whose shards do not say

    seed: int = 0
    shuffle_buffer: int = 1000  # samples (with their media bytes) held per worker and source
    shuffle_window_shards: int = 4  # shards read together and shuffled; bounds the cost of resuming

    max_skip_fraction: float = 0.05  # per worker and per rank over the whole run; >= 1 disables the guard
    skip_check_min_samples: int = 200  # the fraction applies to at least this many draws (early tolerance)

    # shards are checked against the manifest at start: "size" (default), "hash" (sha256, reads every
    # shard once), or "none"; damaged shards are refused ("refuse") or left out and counted as lost ("skip")
    verify: str = "size"
    damaged_shards: str = "refuse"

    def __post_init__(self):
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"data.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.damaged_shards not in DAMAGED_SHARD_POLICIES:
            raise ValueError(f"data.damaged_shards must be one of {DAMAGED_SHARD_POLICIES}, got {self.damaged_shards!r}")


VERIFY_MODES = ("size", "hash", "none")
DAMAGED_SHARD_POLICIES = ("refuse", "skip")
