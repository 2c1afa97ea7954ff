"""`gazelit index`: a manifest for existing WebDataset shards (written by webdataset's TarWriter or
ShardWriter, or any tar of KEY.EXT members), so that they stream like the converter's own output.

Each shard is read once: its samples are counted the way the stream groups them (webdataset's tar
expander and key grouping), and its size and sha256 recorded. A shard that cannot be read to its end is
an error naming it; nothing is written then.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from gazelit.datamodules.manifest import MANIFEST_NAME, Manifest, ShardEntry
from gazelit.integrity import sha256_file


def shard_files(specs: list[str]) -> list[Path]:
    """Shards from directories (every *.tar inside), globs and file names; all in one directory."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += sorted(path.glob("*.tar"))
        elif any(c in spec for c in "*?["):
            found += sorted(Path(p) for p in glob.glob(spec))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{spec}: no such shard, directory or glob match")
    if not found:
        raise FileNotFoundError(f"no .tar shards in {' '.join(specs)}")
    folders = {p.resolve().parent for p in found}
    if len(folders) > 1:
        raise ValueError(f"shards lie in {len(folders)} directories; a manifest describes one: {sorted(map(str, folders))}")
    return sorted(set(found), key=lambda p: p.name)


def count_samples(shard: Path) -> int:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def fail(exc: Exception) -> bool:
        raise ValueError(f"{shard}: unreadable ({type(exc).__name__}: {exc})") from None

    with open(shard, "rb") as stream:
        files = tar_file_expander([{"url": str(shard), "stream": stream}], handler=fail)
        return sum(1 for _ in group_by_keys(files, handler=fail))


def index_shards(specs: list[str], overwrite: bool = False) -> Manifest:
    shards = shard_files(specs)
    directory = shards[0].resolve().parent
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise FileExistsError(f"{directory / MANIFEST_NAME} exists; pass --overwrite to replace it")
    manifest = Manifest(source=f"gazelit index of {len(shards)} shards")
    for shard in shards:
        manifest.shards.append(ShardEntry(name=shard.name, samples=count_samples(shard),
                                          bytes=shard.stat().st_size, sha256=sha256_file(shard)))  # fmt: skip
    manifest.save(directory)
    return manifest


def add_index_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("shards", nargs="+", help="a shard directory, shard files or a glob (quote it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest.json")
    return parser


def run_index(args: argparse.Namespace) -> int:
    try:
        manifest = index_shards(args.shards, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"gazelit index: {e}", file=sys.stderr)
        return 2
    print(f"wrote {manifest.directory / MANIFEST_NAME}: {len(manifest.shards)} shards, {manifest.num_samples} samples")
    return 0
