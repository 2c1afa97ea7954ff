"""The manifest written next to a set of shards: shard names, sample counts and the records left out.

The stream needs the per-shard sample counts (epoch length, and skipping whole shards when resuming), so
every shard directory produced by the converter carries a `manifest.json`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name relative to the manifest's directory
    samples: int


@dataclass(frozen=True)
class SkippedRecord:
    line: int  # 1-based line number in the JSONL file
    reason: str  # bad_json, invalid_record, no_assistant_turn, path_escape, missing_media, unreadable_media
    detail: str = ""
    id: str | None = None


@dataclass
class Manifest:
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    source: str = ""  # name of the JSONL file the shards were converted from
    directory: Path | None = field(default=None, compare=False)  # where it was loaded from / written to

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.skipped).items()))

    def shard_paths(self) -> list[Path]:
        if self.directory is None:
            raise ValueError("manifest has no directory; load it with Manifest.load")
        return [self.directory / s.name for s in self.shards]

    def to_json(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "source": self.source,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "shards": [asdict(s) for s in self.shards],
            "skipped_by_reason": self.skipped_by_reason,
            "skipped": [asdict(r) for r in self.skipped],
        }

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        self.directory = Path(directory)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """From a manifest file or from the directory that holds `manifest.json`."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no shard manifest at {path} (convert the data with `gazelit convert`)")
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: unsupported manifest version {data.get('version')!r}")
        shards = [ShardEntry(**s) for s in data["shards"]]
        for shard in shards:
            parts = PurePosixPath(shard.name).parts
            if not parts or PurePosixPath(shard.name).is_absolute() or ".." in parts:
                raise ValueError(f"{path}: shard name {shard.name!r} must be a path inside the manifest's directory")
        return cls(
            shards=shards,
            skipped=[SkippedRecord(**r) for r in data.get("skipped", [])],
            source=data.get("source", ""),
            directory=path.parent,
        )
