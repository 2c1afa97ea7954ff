"""Benchmark files: JSONL or parquet rows -> `BenchSample`s with their media, read locally.

A row has a `question`, an `answer` (a string, a letter, an option index, or a list of acceptable
answers: `answers` / `gt_answer` are read too), optional `options` and an `image` or a `video`:

  image    a path (relative to --media-root, default the data file's folder), a dict with `bytes` and/or
           `path` (how Hugging Face datasets store images in parquet), raw bytes, or a one-element list
  video    a path to a video file, a gif or a folder of frames
  options  a list (letters A, B, ... in order), a dict {"A": text, ...}, MMBench columns A/B/C/D
           (empty / "nan" skipped), ScienceQA `choices`, or an MMVP string "(a) x (b) y"

Other fields kept: `id` (default: the row number), `hint`, `category` (or `question_type`, `type`),
`group` / `pair` / `question_id` (for pair and circular scoring; see each scorer), and everything else
in `extra` (e.g. `ocr_tokens`, `source`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

OPTION_LETTERS = "ABCDEFGHIJ"
_KNOWN = {"id", "question", "answer", "answers", "gt_answer", "options", "choices", "image", "video", "hint",
          "category", "question_type", "type", "group", "pair", *OPTION_LETTERS}


@dataclass
class BenchSample:
    id: str
    question: str
    answer: Any
    options: list[str] = field(default_factory=list)
    image: bytes | Path | None = None
    video: Path | None = None
    hint: str = ""
    category: str = ""
    group: str | None = None
    index: int = 0  # row number in the file
    extra: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        data = self.image if isinstance(self.image, bytes) else Path(self.image).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    def media_key(self) -> str:
        """Identity of the sample's image or video (a path, or a hash of embedded bytes)."""
        if isinstance(self.image, bytes):
            return hashlib.blake2b(self.image, digest_size=8).hexdigest()
        return str(self.image or self.video or "")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json (a list) / .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise RuntimeError("reading parquet benchmark files needs pyarrow (`pip install pyarrow`)") from exc
        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        rows = []
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    raise ValueError(f"{path}: benchmark files must be .jsonl, .json or .parquet")


def load_benchmark(
    path: str | Path, media_root: str | Path | None = None, limit: int | None = None
) -> list[BenchSample]:
    """The samples of a benchmark file (the first `limit` rows)."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    return [parse_row(row, index, root, path) for index, row in enumerate(rows)]


def parse_row(row: dict[str, Any], index: int, media_root: Path, source: Path | str = "") -> BenchSample:
    where = f"{source} row {index}"
    if "question" not in row:
        raise ValueError(f"{where}: no 'question'")
    answer = next((row[k] for k in ("answer", "answers", "gt_answer") if _present(row.get(k))), None)
    if answer is None:
        raise ValueError(f"{where}: no 'answer' (or 'answers' / 'gt_answer')")
    video = row.get("video")
    group = next((row[k] for k in ("group", "pair") if _present(row.get(k))), None)
    return BenchSample(
        id=str(row.get("id", index)),
        question=str(row["question"]),
        answer=answer,
        options=parse_options(row),
        image=_image(row.get("image"), media_root, where),
        video=(media_root / str(video)) if _present(video) else None,
        hint=str(row["hint"]) if _present(row.get("hint")) else "",
        category=str(next((row[k] for k in ("category", "question_type", "type") if _present(row.get(k))), "")),
        group=None if group is None else str(group),
        index=index,
        extra={k: v for k, v in row.items() if k not in _KNOWN},
    )


def parse_options(row: dict[str, Any]) -> list[str]:
    options = row.get("options", row.get("choices"))
    if isinstance(options, dict):
        return [str(options[k]) for k in sorted(options) if _present(options[k])]
    if isinstance(options, str):  # MMVP: "(a) Open (b) Closed"
        parts = re.split(r"\(([a-jA-J])\)", options)
        return [p.strip() for p in parts[2::2]] if len(parts) > 1 else [options]
    if isinstance(options, (list, tuple)):
        return [str(o) for o in options]
    return [str(row[k]) for k in OPTION_LETTERS if _present(row.get(k))]


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):  # NaN from pandas exports
        return False
    return not (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def _image(value: Any, root: Path, where: str) -> bytes | Path | None:
    if isinstance(value, list):
        if len(value) > 1:
            raise ValueError(f"{where}: {len(value)} images; one per sample is supported")
        value = value[0] if value else None
    if not _present(value):
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not _present(value):
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    text = str(value)
    if text.startswith("data:"):  # data:image/png;base64,...
        return base64.b64decode(text.split(",", 1)[1])
    path = root / text
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} not found")
    return path
