"""Reading Cambrian / LLaVA-style records: which media a record points at, its clip bounds, its turns.

A record is one JSONL line: {"id", "image" | "video", "conversations": [{"from", "value"}], ...}.
Cambrian-7M and Cambrian-Align use "image" (missing, empty, "None" or "nan" means text-only); Cambrian-S
uses "video" (a file, a .gif or a folder of frames) with optional clip bounds in seconds
(start/end or start_time/end_time) or frames (start_frame/end_frame, end inclusive).
Both the shard converter and the training stream read records through these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_NO_MEDIA = {"", "none", "nan", "null"}


class InvalidRecord(ValueError):
    """The record's structure is not a LLaVA-style conversation record."""


@dataclass(frozen=True)
class MediaRef:
    """The media a record points at: kind "image" or "video", and its path relative to the media root."""

    kind: str
    path: str


@dataclass(frozen=True)
class ClipBounds:
    """Part of a video to sample from; None means unbounded on that side."""

    start_s: float | None = None
    end_s: float | None = None
    start_frame: int | None = None
    end_frame: int | None = None  # inclusive


def media_ref(record: dict[str, Any]) -> MediaRef | None:
    """The record's image or video, or None for a text-only record. Raises InvalidRecord for both/lists."""
    refs = []
    for kind in ("image", "video"):
        value = record.get(kind)
        if isinstance(value, list):
            if len(value) > 1:
                raise InvalidRecord(f"{kind!r} lists {len(value)} files; only one per sample is supported")
            value = value[0] if value else None
        if value is None or (isinstance(value, float)):  # NaN from pandas exports
            continue
        if not isinstance(value, str):
            raise InvalidRecord(f"{kind!r} must be a path string, got {type(value).__name__}")
        if value.strip().lower() in _NO_MEDIA:
            continue
        refs.append(MediaRef(kind, value.strip()))
    if len(refs) > 1:
        raise InvalidRecord("record has both 'image' and 'video'")
    return refs[0] if refs else None


def clip_bounds(record: dict[str, Any]) -> ClipBounds:
    def number(*keys: str) -> float | None:
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                return float(value)
        return None

    start_frame, end_frame = number("start_frame"), number("end_frame")
    return ClipBounds(
        start_s=number("start", "start_time"),
        end_s=number("end", "end_time"),
        start_frame=int(start_frame) if start_frame is not None else None,
        end_frame=int(end_frame) if end_frame is not None else None,
    )


def conversation_turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) per turn with roles user/assistant/system. Raises InvalidRecord on a malformed list."""
    conversations = record.get("conversations")
    if conversations is None:
        return []
    if not isinstance(conversations, list):
        raise InvalidRecord("'conversations' must be a list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"turn {i} is not an object")
        speaker = turn.get("from", turn.get("role"))
        role = ROLE_NAMES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise InvalidRecord(f"turn {i} has unknown speaker {speaker!r}")
        value = turn.get("value", turn.get("content", ""))
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise InvalidRecord(f"turn {i} value must be a string")
        turns.append((role, value))
    return turns


def has_assistant_text(turns: list[tuple[str, str]]) -> bool:
    return any(role == "assistant" and text.strip() for role, text in turns)


@dataclass(frozen=True)
class LookBox:
    """Where an assistant turn looks (record field `boxes`): a box [x0, y0, x1, y1] in 0..1 on the last
    visual unit before the turn, and optional text to say inside the look span before the answer."""

    box: tuple[float, float, float, float]
    text: str = ""


def look_boxes(record: dict[str, Any], turns: list[tuple[str, str]]) -> list[list[LookBox]] | None:
    """The record's optional `boxes`, one entry per assistant turn: null (no look), a box, a look
    {"box": [...], "text": "..."}, or a list of those (looks in turn). None when the record has no `boxes`.
    Raises InvalidRecord naming the entry that is malformed."""
    boxes = record.get("boxes")
    if boxes is None:
        return None
    answers = sum(role == "assistant" for role, _ in turns)
    if not isinstance(boxes, list) or len(boxes) != answers:
        raise InvalidRecord(f"'boxes' must be a list with one entry per assistant turn ({answers}), got {boxes!r:.80}")
    out = []
    for i, entry in enumerate(boxes):
        if entry is None:
            out.append([])
        elif isinstance(entry, list) and entry and all(isinstance(e, (list, dict)) for e in entry):
            out.append([_look(e, f"boxes[{i}][{j}]") for j, e in enumerate(entry)])
        else:
            out.append([_look(entry, f"boxes[{i}]")])
    return out


def _look(entry: Any, where: str) -> LookBox:
    text = ""
    if isinstance(entry, dict):
        text = entry.get("text") or ""
        entry = entry.get("box")
        if not isinstance(text, str):
            raise InvalidRecord(f"{where}.text must be a string")
    ok = (isinstance(entry, list) and len(entry) == 4
          and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in entry))  # fmt: skip
    if not ok or entry[0] > entry[2] or entry[1] > entry[3]:
        raise InvalidRecord(f"{where} must be [x0, y0, x1, y1] in 0..1 with x0 <= x1 and y0 <= y1, got {entry!r:.80}")
    return LookBox(tuple(float(c) for c in entry), text)
