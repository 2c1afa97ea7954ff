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

Published layouts read as they are:
  * a directory or a glob of parquet / JSONL files (splits sharded over several files), read in name order;
  * the MMVP authors' CSV (`Index`, `Question`, `Options`, `Correct Answer`; the image is `<Index>.jpg`
    under the media root) and lmms-lab/MMVP's capitalised columns;
  * GQA as lmms-lab publishes it: the instructions config (`imageId`, `question`, `answer`) joined to the
    images config (`id`, `image`) given with `images=` (`--images` on the command line);
  * LLaVA / Cambrian conversation records (`conversations`: the first human turn is the question, the
    first assistant turn the answer), e.g. the demo's test split (`data/demo/test.jsonl`).
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
          "category", "question_type", "type", "group", "pair", "conversations", *OPTION_LETTERS}


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


def data_files(spec: str | Path) -> list[Path]:
    """The files of a benchmark: one file, every .parquet / .jsonl / .json / .csv file of a directory, or a glob."""
    text = str(spec)
    if any(c in text for c in "*?["):
        import glob

        files = sorted(Path(p) for p in glob.glob(text))
    elif Path(text).is_dir():
        files = sorted(p for p in Path(text).iterdir() if p.suffix.lower() in _SUFFIXES)
    else:
        files = [Path(text)]
    if not files:
        raise FileNotFoundError(f"{spec}: no benchmark files (.parquet, .jsonl, .json, .csv)")
    return files


_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json (a list) / .parquet / .csv file, or of every such file of a directory or glob."""
    files = data_files(path)
    if len(files) > 1:
        return [row for f in files for row in read_rows(f)]
    path = files[0]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import csv

        with path.open(newline="") as f:
            return list(csv.DictReader(f))
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
    raise ValueError(f"{path}: benchmark files must be .jsonl, .json, .parquet or .csv")


def load_benchmark(
    path: str | Path, media_root: str | Path | None = None, limit: int | None = None,
    images: str | Path | None = None,
) -> list[BenchSample]:
    """The samples of a benchmark file, directory or glob (the first `limit` rows). `images`: a second
    table (`id`, `image`) that rows with an `imageId` take their image from (GQA on lmms-lab)."""
    files = data_files(path)
    root = Path(media_root) if media_root is not None else files[0].parent
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    by_id = {str(r["id"]): r.get("image") for r in read_rows(images)} if images is not None else None
    samples = []
    for index, row in enumerate(rows):
        row = normalise_row(row, root)
        if by_id is not None and "imageId" in row and not _present(row.get("image")):
            if str(row["imageId"]) not in by_id:
                raise ValueError(f"{path} row {index}: imageId {row['imageId']!r} is not in {images}")
            row["image"] = by_id[str(row["imageId"])]
        samples.append(parse_row(row, index, root, path))
    return samples


_ALIASES = {"question": "question", "options": "options", "correct answer": "answer", "answer": "answer",
            "index": "id", "image": "image"}  # fmt: skip


def normalise_row(row: dict[str, Any], media_root: Path) -> dict[str, Any]:
    """Published column names and record forms onto the fields `parse_row` reads (see the module docstring)."""
    row = dict(row)
    for key in list(row):
        alias = _ALIASES.get(key.lower())
        if alias and alias != key and alias not in row:
            row[alias] = row.pop(key)
    if "question" not in row and isinstance(row.get("conversations"), list):
        turns = row["conversations"]
        human = next((t["value"] for t in turns if t.get("from") in ("human", "user")), None)
        answer = next((t["value"] for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if human is not None:
            row["question"] = re.sub(r"<image>\s*", "", str(human)).strip()
        if answer is not None and "answer" not in row:
            row["answer"] = str(answer).strip()
    if "image" not in row and "video" not in row and _present(row.get("id")):  # MMVP's CSV: images by index
        for ext in (".jpg", ".png"):
            if (media_root / f"{row['id']}{ext}").is_file():
                row["image"] = f"{row['id']}{ext}"
                break
    return row


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
