"""One shard sample (the dict webdataset yields) -> a training sample, or SkipSample with a reason.

Cheap checks come first (record structure, placeholders, tokenisation, length: the number of video frames
is known from the `media_info` the converter stored), so that a sample that will be dropped is never
decoded. Media decoding happens last: images with Pillow, videos with decord from bytes, gifs and frame
folders with Pillow, then the encoder's `image_transform` on every image or frame.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from gazelit.datamodules import media
from gazelit.datamodules.chat import ChatEncoder, TokenizedConversation
from gazelit.datamodules.frame_sampling import EmptyClip, frame_start_times, sample_frame_indices, sample_timed_frames
from gazelit.datamodules.records import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    InvalidRecord,
    MediaRef,
    clip_bounds,
    conversation_turns,
    look_boxes,
    media_ref,
)
from gazelit.datamodules.skips import BAD_RECORD, DECODE_ERROR, VIDEO_ERROR, SkipSample

ImageTransform = Callable[[Image.Image], torch.Tensor]
_IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ("img",)
_VIDEO_SUFFIXES = tuple(ext.lstrip(".") for ext in VIDEO_EXTENSIONS)
_NOT_META = {"conversations", "media_info"}


@dataclass
class ProcessedSample:
    """A sample ready for collation. Units are in sequence order; `unit_video` is -1 for an image and 0
    for the frames of the sample's video (the collator makes video ids unique in the batch)."""

    tokens: TokenizedConversation
    unit_video: list[int]
    unit_time: list[int]
    pixel_values: torch.Tensor | None  # (units, 3, H, W)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _MediaPlan:
    ref: MediaRef
    kind: str  # image | video | gif | frames
    members: list[str]  # shard member suffixes holding the media (frames: all of them, in order)
    frame_indices: list[int] | None = None  # video kinds: which frames to decode
    frame_times: list[float] | None = None  # seconds from the start of the video, per decoded frame


class SampleProcessor:
    """Turns raw shard samples into ProcessedSample. Picklable; lives in each DataLoader worker."""

    def __init__(
        self,
        encoder: ChatEncoder,
        image_transform: ImageTransform,
        max_frames: int = 32,
        fps: float = 1.0,
        frames_fps: float = 1.0,
    ):
        self.encoder = encoder
        self.image_transform = image_transform
        self.max_frames = max_frames
        self.fps = fps
        self.frames_fps = frames_fps
        self._pixel_shape: tuple[int, int, int] | None = None

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(3, H, W) the image transform produces (found by running it once on a blank image)."""
        if self._pixel_shape is None:
            probe = self.image_transform(Image.new("RGB", (32, 32)))
            self._pixel_shape = tuple(int(d) for d in probe.shape)  # type: ignore[assignment]
        return self._pixel_shape  # type: ignore[return-value]

    def __call__(self, raw: dict[str, Any], source: str = "") -> ProcessedSample:
        record = _parse_record(raw)
        try:
            turns = conversation_turns(record)
            ref = media_ref(record)
            boxes = look_boxes(record, turns)
        except InvalidRecord as exc:
            raise SkipSample(BAD_RECORD, str(exc)) from None
        plan = self._plan_media(ref, record, raw) if ref is not None else None
        units = [] if plan is None else [1 if plan.kind == "image" else len(plan.frame_indices or [])]
        tokens = self.encoder.encode(turns, units, boxes)
        pixels = self._decode(plan, raw) if plan is not None else None
        is_video = plan is not None and plan.kind != "image"
        num_units = len(tokens.unit_starts)
        meta = {k: v for k, v in record.items() if k not in _NOT_META}
        first_question = next((t.get("value") for t in record.get("conversations") or []
                               if isinstance(t, dict) and t.get("from") in ("human", "user")), None)  # fmt: skip
        if isinstance(first_question, str):
            meta["question"] = first_question.replace("<image>", "").strip()
        meta["stream_source"] = source
        meta["key"] = raw.get("__key__")
        meta["shard"] = os.path.basename(str(raw.get("__url__", "")))
        if is_video:
            meta["frame_indices"] = plan.frame_indices
            meta["frame_times"] = [round(t, 3) for t in plan.frame_times or []]
        return ProcessedSample(
            tokens=tokens,
            unit_video=[0 if is_video else -1] * num_units,
            unit_time=list(range(num_units)) if is_video else [0] * num_units,
            pixel_values=pixels,
            meta=meta,
        )

    # ------------------------------------------------------------------------------------ media plan
    def _plan_media(self, ref: MediaRef, record: dict[str, Any], raw: dict[str, Any]) -> _MediaPlan:
        info = record.get("media_info") or {}
        members = [m for m in info.get("members", []) if m in raw]
        if ref.kind == "image":
            members = members or [k for k in raw if k in _IMAGE_SUFFIXES][:1]
            if not members:
                raise SkipSample(BAD_RECORD, "image member missing from the shard")
            return _MediaPlan(ref, "image", members)
        kind = info.get("kind") or _infer_video_kind(raw)
        if kind == "frames":
            members = members or sorted(k for k in raw if k.startswith("frame_"))
        elif not members:
            members = [k for k in raw if k == "gif" or k in _VIDEO_SUFFIXES][:1]
        if not members:
            raise SkipSample(BAD_RECORD, "video member missing from the shard")
        clip = clip_bounds(record)
        try:
            if kind == "gif":
                durations = info.get("durations_s") or media.gif_durations(raw[members[0]])
                indices = sample_timed_frames(durations, self.fps, self.max_frames, clip)
                starts = frame_start_times(durations)
                return _MediaPlan(ref, kind, members, indices, [starts[i] for i in indices])
            if kind == "frames":
                fps = float(info.get("fps") or record.get("fps") or self.frames_fps)
                indices = sample_frame_indices(len(members), fps, self.fps, self.max_frames, clip)
                return _MediaPlan(ref, kind, members, indices, [i / fps for i in indices])
            if info.get("num_frames") and info.get("fps"):
                num_frames, native_fps = int(info["num_frames"]), float(info["fps"])
            else:
                num_frames, native_fps = media.probe_video(raw[members[0]])
            indices = sample_frame_indices(num_frames, native_fps, self.fps, self.max_frames, clip)
            return _MediaPlan(ref, "video", members, indices, [i / native_fps for i in indices])
        except EmptyClip as exc:
            raise SkipSample(VIDEO_ERROR, str(exc)) from None
        except media.DecordUnavailable:
            raise
        except Exception as exc:
            raise SkipSample(VIDEO_ERROR, f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------------------------ decoding
    def _decode(self, plan: _MediaPlan, raw: dict[str, Any]) -> torch.Tensor:
        if plan.kind == "image":
            try:
                return self.image_transform(media.decode_image(raw[plan.members[0]])).unsqueeze(0)
            except Exception as exc:
                raise SkipSample(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None
        indices = plan.frame_indices or []
        try:
            if plan.kind == "gif":
                frames = media.decode_gif_frames(raw[plan.members[0]], indices)
            elif plan.kind == "frames":
                frames = [media.decode_image(raw[plan.members[i]]) for i in indices]
            else:
                frames = media.decode_video_frames(raw[plan.members[0]], indices)
            if len(frames) != len(indices):
                raise ValueError(f"decoded {len(frames)} of {len(indices)} frames")
            return torch.stack([self.image_transform(frame) for frame in frames])
        except media.DecordUnavailable:
            raise
        except Exception as exc:
            raise SkipSample(VIDEO_ERROR, f"{type(exc).__name__}: {exc}") from None


def _parse_record(raw: dict[str, Any]) -> dict[str, Any]:
    data = raw.get("json")
    if data is None:
        raise SkipSample(BAD_RECORD, "sample has no .json member")
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkipSample(BAD_RECORD, f"unreadable json: {exc}") from None
    if not isinstance(record, dict):
        raise SkipSample(BAD_RECORD, "json member is not an object")
    return record


def _infer_video_kind(raw: dict[str, Any]) -> str:
    if any(k.startswith("frame_") for k in raw):
        return "frames"
    return "gif" if "gif" in raw else "video"
