"""Files the project writes, written so they can be checked; files it reads, read without running code.

* `sha256_file`, `fsync_path`, `atomic_write_text`: hashing and durable, atomic writes.
* Checkpoint integrity: beside every checkpoint `step=000060.ckpt` (a file, or a sharded folder) lies
  `step=000060.ckpt.sha256.json` with the size and sha256 of each of its files. `verify_checkpoint`
  checks it and raises `CheckpointError`, one line naming the file and what is wrong. Checkpoints
  written before these files existed are checked as far as possible (zip CRCs of a file, the metadata
  of a sharded folder) with a warning.
* `read_dcp_metadata`: the `.metadata` of a torch.distributed.checkpoint folder is a pickle;
  torch unpickles it without restriction. Here it is read with an unpickler that admits only the
  checkpoint-metadata classes, so a crafted `.metadata` is refused before torch ever opens it.

No torch import at module level: `gazelit validate` and the CLI's start-up stay light.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INTEGRITY_SUFFIX = ".sha256.json"
DCP_METADATA = ".metadata"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint (or a file given as one) that is missing, damaged, foreign or unsafe to read."""


# ---------------------------------------------------------------------------------------------- writing
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory entry's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# ---------------------------------------------------------------------------------------------- checkpoints
def integrity_file(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + INTEGRITY_SUFFIX)


def checkpoint_files(checkpoint: str | Path) -> list[str]:
    """Relative names of the files that make up a checkpoint ("" for a single-file checkpoint)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        return [""]
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())


def digest_files(checkpoint: str | Path, names: list[str], sync: bool = True) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of the given files of a checkpoint, each fsynced first."""
    checkpoint = Path(checkpoint)
    out = {}
    for name in names:
        path = checkpoint / name if name else checkpoint
        if sync:
            fsync_path(path)
        out[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def write_integrity(checkpoint: str | Path, files: dict[str, dict[str, Any]]) -> Path:
    """Write the integrity file of `checkpoint` (its final name) atomically."""
    target = integrity_file(checkpoint)
    atomic_write_text(target, json.dumps({"format": 1, "files": files}, sort_keys=True, indent=1) + "\n")
    return target


def verify_checkpoint(checkpoint: str | Path, hashes: bool = True) -> str | None:
    """Check a checkpoint against its integrity file; raise CheckpointError if anything differs.

    Returns a warning (str) when the checkpoint has no integrity file and could only be checked partly.
    A sharded folder's `.metadata` is always read with the restricted unpickler.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    if checkpoint.is_file() and checkpoint.stat().st_size == 0:
        raise CheckpointError(f"{checkpoint}: empty file")
    record = integrity_file(checkpoint)
    warning = None
    if record.is_file():
        try:
            files = json.loads(record.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{record}: unreadable integrity file ({e})") from None
        for name, want in sorted(files.items()):
            path = checkpoint / name if name else checkpoint
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in {record.name})")
            size = path.stat().st_size
            if size != want["size"]:
                raise CheckpointError(f"{path}: {size} bytes, {want['size']} written (truncated or replaced)")
            if hashes and sha256_file(path) != want["sha256"]:
                raise CheckpointError(f"{path}: sha256 differs from the one written (the file is damaged)")
    else:
        warning = f"{checkpoint}: no {record.name}; checked its structure only (written by an older gazelit?)"
        if checkpoint.is_file():
            _check_zip(checkpoint)
    if checkpoint.is_dir():
        if not (checkpoint / DCP_METADATA).is_file():
            raise CheckpointError(f"{checkpoint}: a folder without {DCP_METADATA}: not a sharded checkpoint")
        read_dcp_metadata(checkpoint)
    return warning


def _check_zip(path: Path) -> None:
    """A torch.save file is a zip archive: check it is one and that every member's CRC holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a complete torch checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} fails its CRC check (the file is damaged)")


# ---------------------------------------------------------------------------------------------- DCP metadata
# Classes a torch.distributed.checkpoint `.metadata` pickle may name; nothing else is admitted.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix", "SerializationFormat"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool", "complex",
                 "slice", "object"},
    "copyreg": {"_reconstructor"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # name -> torch.layout, a lookup in a fixed table
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream, source: Path):
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str):
        import torch

        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source}: refuses to load {module}.{name}: not a checkpoint-metadata class (a crafted file?)"
        )


def read_dcp_metadata(folder: str | Path):
    """The Metadata object of a sharded checkpoint folder, unpickled with only the metadata classes."""
    path = Path(folder) / DCP_METADATA
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbage pickles raise many types
        raise CheckpointError(f"{path}: not a readable checkpoint metadata file ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint Metadata")
    return metadata
