"""The manifest written next to a set of shards: shard names, sample counts and the records left out.

The stream needs the per-shard sample counts (epoch length, and skipping whole shards when resuming), so
every shard directory produced by the converter carries a `manifest.json`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name relative to the manifest's directory
    samples: int
    bytes: int | None = None  # size and hash as written (None in manifests of older gazelit versions)
    sha256: str | None = None


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def stable_detail(detail: str) -> str:
    """An error message without memory addresses (`<_io.BytesIO object at 0x7f...>` -> `<_io.BytesIO>`),
    so that identical input gives a byte-identical manifest (and log lines compare across runs)."""
    return _OBJECT_REPR.sub(r"<\1>", detail)


class DamagedShardsError(ValueError):
    """Shards whose size (or hash) differs from the manifest's record."""


def check_shards(manifest: Manifest, hashes: bool = False) -> dict[str, str]:
    """{shard name: what is wrong} for every shard that is missing or whose size (and, with `hashes`,
    sha256) differs from the manifest. Shards without a record are not checked."""
    from gazelit.integrity import sha256_file

    assert manifest.directory is not None
    damaged = {}
    for shard in manifest.shards:
        path = manifest.directory / shard.name
        if not path.is_file():
            damaged[shard.name] = "missing"
            continue
        size = path.stat().st_size
        if shard.bytes is not None and size != shard.bytes:
            damaged[shard.name] = f"{size} bytes, {shard.bytes} written"
        elif hashes and shard.sha256 is not None and sha256_file(path) != shard.sha256:
            damaged[shard.name] = "sha256 differs from the one written"
    return damaged


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
            "shards": [{k: v for k, v in asdict(s).items() if v is not None} for s in self.shards],
            "skipped_by_reason": self.skipped_by_reason,
            "skipped": [asdict(r) for r in self.skipped],
        }

    def save(self, directory: Path) -> Path:
        from gazelit.integrity import atomic_write_text

        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
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
