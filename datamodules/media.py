"""Decoding and probing media bytes: images with Pillow, videos with decord, gifs with Pillow.

Everything works on bytes (what a shard holds), so the same functions serve the converter (probe and
validate files once) and the training stream (decode inside DataLoader workers). decord is imported
lazily: it is only installed on x86_64, and image-only training must not need it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


class DecordUnavailable(RuntimeError):
    """decord is not installed: a setup problem, never a bad sample."""


def require_decord() -> Any:
    """The decord module, or a clear error saying how to get it."""
    try:
        import decord
    except ImportError as exc:  # pragma: no cover - depends on the platform
        raise DecordUnavailable(
            "reading video files needs decord (`pip install decord`, available for x86_64 Linux/Windows); "
            "gifs and frame folders work without it"
        ) from exc
    return decord


def decode_image(data: bytes) -> Image.Image:
    """The image fully decoded and converted to RGB; raises on corrupt or truncated data."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def video_reader(data: bytes) -> Any:
    """A decord VideoReader over in-memory bytes (one thread: workers already run in parallel)."""
    decord = require_decord()
    return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)


def probe_video(data: bytes) -> tuple[int, float]:
    """(number of frames, average fps) of a video file."""
    reader = video_reader(data)
    return len(reader), float(reader.get_avg_fps())


def decode_video_frames(data: bytes, indices: list[int]) -> list[Image.Image]:
    reader = video_reader(data)
    if indices and max(indices) >= len(reader):
        raise ValueError(f"frame {max(indices)} requested from a video of {len(reader)} frames")
    frames = reader.get_batch(indices).asnumpy()
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]


def gif_durations(data: bytes) -> list[float]:
    """Display time in seconds of each frame of a gif (0.0 where the file gives none)."""
    with Image.open(io.BytesIO(data)) as image:
        durations = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            durations.append(float(image.info.get("duration") or 0) / 1000.0)
        return durations


def decode_gif_frames(data: bytes, indices: list[int]) -> list[Image.Image]:
    wanted = set(indices)
    frames: dict[int, Image.Image] = {}
    with Image.open(io.BytesIO(data)) as image:
        for index in sorted(wanted):
            image.seek(index)
            frames[index] = image.convert("RGB")
    return [frames[i] for i in indices]


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) after fully decoding: also validates the data."""
    return decode_image(data).size
