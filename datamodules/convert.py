"""`gazelit convert`: LLaVA/Cambrian JSONL + media folder -> WebDataset tar shards + manifest.

Each good record becomes one sample `KEY.json` (the record plus a `media_info` entry describing the stored
media) with its media as `KEY.<ext>` (image, video file or gif, bytes unchanged) or
`KEY.frame_00000.<ext>`, ... (a folder of frames, in sorted name order). KEY is the 1-based JSONL line
number, zero-padded, so keys are unique, dot-free and stable. Bad records are skipped and listed in the
manifest with a stable reason: bad_json, invalid_record, no_assistant_turn, path_escape, missing_media,
unreadable_media. The same input always gives byte-identical shards and manifest, whatever `workers`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from gazelit.datamodules import media
from gazelit.datamodules.manifest import MANIFEST_NAME, Manifest, ShardEntry, SkippedRecord, stable_detail
from gazelit.integrity import sha256_file
from gazelit.datamodules.paths import PathEscape, ensure_inside, resolve_media_path
from gazelit.datamodules.records import (
    IMAGE_EXTENSIONS,
    InvalidRecord,
    conversation_turns,
    has_assistant_text,
    look_boxes,
    media_ref,
)

BAD_JSON = "bad_json"
INVALID_RECORD = "invalid_record"
NO_ASSISTANT_TURN = "no_assistant_turn"
PATH_ESCAPE = "path_escape"
MISSING_MEDIA = "missing_media"
UNREADABLE_MEDIA = "unreadable_media"
CONVERT_SKIP_REASONS = (BAD_JSON, INVALID_RECORD, NO_ASSISTANT_TURN, PATH_ESCAPE, MISSING_MEDIA, UNREADABLE_MEDIA)

SHARD_PATTERN = "shard-{:06d}.tar"
_PIL_FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_FIXED_MTIME = 0  # tar member timestamps: fixed so that output is reproducible


@dataclass
class PreparedSample:
    """One good record, ready to be written: tar member suffix -> bytes (including "json")."""

    key: str
    members: dict[str, bytes]


class _Skip(Exception):
    """A record the converter leaves out, with one of CONVERT_SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def convert(
    jsonl: str | Path,
    media_root: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    frames_fps: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert `jsonl` (media paths relative to `media_root`) into shards of `shard_size` samples in `out`.

    `frames_fps` is the frame rate assumed for folders of frames whose record carries no "fps".
    Returns the manifest (also written to `out/manifest.json`).
    """
    jsonl, media_root, out = Path(jsonl), Path(media_root), Path(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not jsonl.is_file():
        raise FileNotFoundError(f"JSONL file {jsonl} does not exist")
    if not media_root.is_dir():
        raise FileNotFoundError(f"media root {media_root} is not a directory")
    _prepare_output_dir(out, overwrite)

    with jsonl.open("rb") as f:
        total_lines = sum(1 for _ in f)
    prepare = partial(prepare_record, media_root=media_root.resolve(), frames_fps=frames_fps)
    manifest = Manifest(source=jsonl.name)
    writer = _ShardWriter(out, shard_size, manifest)
    bar = tqdm(total=total_lines, desc=f"convert {jsonl.name}", unit="rec", disable=not progress, file=sys.stderr)
    try:
        for result in _prepared_records(jsonl, prepare, workers):
            if isinstance(result, SkippedRecord):
                manifest.skipped.append(result)
            elif result is not None:
                writer.write(result)
            bar.update(1)
            bar.set_postfix(written=writer.written, skipped=len(manifest.skipped), refresh=False)
    finally:
        writer.close()
        bar.close()
    manifest.save(out)
    return manifest


def prepare_record(
    numbered_line: tuple[int, bytes], media_root: Path, frames_fps: float = 1.0
) -> PreparedSample | SkippedRecord | None:
    """Validate one JSONL line and load its media; None for a blank line."""
    line_no, raw = numbered_line
    if not raw.strip():
        return None
    record_id = None
    try:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Skip(BAD_JSON, str(exc)) from None
        if not isinstance(record, dict):
            raise _Skip(BAD_JSON, f"line holds a JSON {type(record).__name__}, not an object")
        record_id = str(record["id"]) if record.get("id") is not None else None
        try:
            turns = conversation_turns(record)
            ref = media_ref(record)
            look_boxes(record, turns)
        except InvalidRecord as exc:
            raise _Skip(INVALID_RECORD, str(exc)) from None
        if not has_assistant_text(turns):
            raise _Skip(NO_ASSISTANT_TURN, "no non-empty 'gpt' turn")
        members: dict[str, bytes] = {}
        if ref is not None:
            info = _load_media(ref.kind, ref.path, media_root, frames_fps, record, members)
            record = {**record, "media_info": info}
        members["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
        return PreparedSample(key=f"{line_no:09d}", members=members)
    except _Skip as skip:
        return SkippedRecord(line=line_no, reason=skip.reason, detail=stable_detail(skip.detail)[:300], id=record_id)


def _load_media(
    kind: str, relative: str, root: Path, frames_fps: float, record: dict[str, Any], members: dict[str, bytes]
) -> dict[str, Any]:
    """Fill `members` with the media's bytes; return its media_info. Raises _Skip."""
    try:
        path = resolve_media_path(root, relative)
    except PathEscape as exc:
        raise _Skip(PATH_ESCAPE, str(exc)) from None
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        raise _Skip(UNREADABLE_MEDIA, f"{relative}: {exc}") from None
    if not path.exists():
        raise _Skip(MISSING_MEDIA, f"{relative} not found under the media root")
    try:
        if kind == "image":
            return _load_image(path, members)
        if path.is_dir():
            return _load_frame_folder(path, root, record, frames_fps, members)
        if path.suffix.lower() == ".gif":
            return _load_gif(path, members)
        return _load_video_file(path, members)
    except PathEscape as exc:  # a frame of a folder linking outside the root
        raise _Skip(PATH_ESCAPE, str(exc)) from None
    except (_Skip, media.DecordUnavailable):
        raise
    except Exception as exc:  # any decoder failure means the media is unusable
        raise _Skip(UNREADABLE_MEDIA, f"{relative}: {type(exc).__name__}: {exc}") from None


def _load_image(path: Path, members: dict[str, bytes]) -> dict[str, Any]:
    if not path.is_file():
        raise _Skip(UNREADABLE_MEDIA, f"{path.name} is not a file")
    data = path.read_bytes()
    ext = _image_extension(data)
    width, height = media.image_size(data)
    members[ext] = data
    return {"kind": "image", "members": [ext], "width": width, "height": height}


def _load_frame_folder(
    folder: Path, root: Path, record: dict[str, Any], frames_fps: float, members: dict[str, bytes]
) -> dict[str, Any]:
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not frames:
        raise _Skip(UNREADABLE_MEDIA, f"frame folder {folder.name} holds no image files")
    names = []
    for index, frame in enumerate(frames):
        ensure_inside(root, frame)  # a frame may be a link pointing elsewhere
        data = frame.read_bytes()
        media.decode_image(data)
        name = f"frame_{index:05d}.{_image_extension(data)}"
        members[name] = data
        names.append(name)
    fps = record.get("fps")
    fps = float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 else frames_fps
    return {"kind": "frames", "members": names, "num_frames": len(names), "fps": fps}


def _load_gif(path: Path, members: dict[str, bytes]) -> dict[str, Any]:
    data = path.read_bytes()
    durations = media.gif_durations(data)
    media.decode_gif_frames(data, [0, len(durations) - 1])
    members["gif"] = data
    return {"kind": "gif", "members": ["gif"], "num_frames": len(durations), "durations_s": durations}


def _load_video_file(path: Path, members: dict[str, bytes]) -> dict[str, Any]:
    data = path.read_bytes()
    num_frames, fps = media.probe_video(data)
    if num_frames < 1 or not fps > 0:
        raise _Skip(UNREADABLE_MEDIA, f"{path.name}: {num_frames} frames at {fps} fps")
    media.decode_video_frames(data, sorted({0, num_frames - 1}))
    ext = path.suffix.lower().lstrip(".") or "mp4"
    if not ext.isalnum():
        ext = "mp4"
    members[ext] = data
    return {"kind": "video", "members": [ext], "num_frames": num_frames, "fps": fps}


def _image_extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return _PIL_FORMAT_EXTENSIONS.get(image.format or "", "img")


def _prepared_records(jsonl: Path, prepare, workers: int) -> Iterator[PreparedSample | SkippedRecord | None]:
    """Results in line order; with workers > 1 a process pool works on blocks of lines, the next block
    already submitted while this one is written (workers never wait at a block boundary; memory stays
    bounded by two blocks)."""
    from collections import deque

    with jsonl.open("rb") as f:
        numbered = ((i + 1, line) for i, line in enumerate(f))
        if workers <= 1:
            yield from map(prepare, numbered)
            return
        block = workers * 64
        with multiprocessing.get_context().Pool(workers) as pool:
            in_flight: deque = deque()
            while True:
                lines = [item for _, item in zip(range(block), numbered)]
                if lines:
                    in_flight.append(pool.map_async(prepare, lines, chunksize=16))
                if in_flight and (len(in_flight) > 1 or not lines):
                    yield from in_flight.popleft().get()
                if not lines and not in_flight:
                    break


class _ShardWriter:
    """Writes prepared samples into numbered tar shards of at most `shard_size` samples."""

    def __init__(self, out: Path, shard_size: int, manifest: Manifest):
        self.out = out
        self.shard_size = shard_size
        self.manifest = manifest
        self.written = 0
        self._file = None
        self._tar = None
        self._name = ""
        self._count = 0

    def write(self, sample: PreparedSample) -> None:
        if self._tar is None or self._count >= self.shard_size:
            self._finish_shard()
            self._name = SHARD_PATTERN.format(len(self.manifest.shards))
            self._file = (self.out / self._name).open("wb")
            from webdataset import TarWriter  # imports torch: only when writing (`gazelit --help` stays light)

            self._tar = TarWriter(self._file, encoder=False, mtime=_FIXED_MTIME)
        self._tar.write({"__key__": sample.key, **sample.members})
        self._count += 1
        self.written += 1

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            path = self.out / self._name
            self.manifest.shards.append(
                ShardEntry(name=self._name, samples=self._count, bytes=path.stat().st_size, sha256=sha256_file(path))
            )
        self._file, self._tar, self._count = None, None, 0

    def close(self) -> None:
        self._finish_shard()


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    previous = sorted(out.glob("shard-*.tar")) + ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else [])
    if previous and not overwrite:
        raise FileExistsError(f"{out} already holds shards or a manifest; pass overwrite=True (--overwrite)")
    for path in previous:
        path.unlink()


# ---------------------------------------------------------------------------------------------- CLI
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `gazelit convert` (the gazelit CLI adds them to its `convert` subcommand)."""
    parser.add_argument("--jsonl", required=True, type=Path, help="LLaVA/Cambrian-style JSONL file")
    parser.add_argument("--media-root", required=True, type=Path, help="folder the media paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading and validating media")
    parser.add_argument(
        "--frames-fps", type=float, default=1.0, help="frame rate of frame folders whose record has no 'fps'"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; print a summary; exit code 0, or 1 if nothing was written."""
    manifest = convert(
        args.jsonl,
        args.media_root,
        args.out,
        shard_size=args.shard_size,
        workers=args.workers,
        frames_fps=args.frames_fps,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.out}; "
        f"skipped {len(manifest.skipped)} records {manifest.skipped_by_reason}"
    )
    return 0 if manifest.num_samples else 1


def main(argv: list[str] | None = None) -> int:
    parser = add_convert_arguments(argparse.ArgumentParser(prog="python -m gazelit.datamodules.convert", description=__doc__))
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
