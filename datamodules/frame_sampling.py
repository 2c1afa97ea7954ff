"""Which frames of a video become visual units: pure index arithmetic, no decoding.

Constant frame rate (video files, frame folders), Cambrian-S semantics (cambrian/utils.py): keep every
`step = round(native_fps / fps)`-th frame (at least 1) inside the clip bounds; if that leaves more than
`max_frames`, take `np.linspace(0, n - 1, max_frames)` (truncated to int) over those indices.
Variable frame durations (gifs): one frame per `1 / fps` seconds of display time, then the same cap.
"""

from __future__ import annotations

import numpy as np

from gazelit.datamodules.records import ClipBounds

DEFAULT_GIF_FRAME_SECONDS = 0.1  # what browsers show for frames with a missing or zero duration
WHOLE_VIDEO = ClipBounds()


class EmptyClip(ValueError):
    """The clip bounds select no frame of the video."""


def cap_frames(indices: list[int], max_frames: int) -> list[int]:
    """`indices` if at most `max_frames`, else a uniform subsample keeping the first and the last."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if len(indices) <= max_frames:
        return list(indices)
    picks = np.linspace(0, len(indices) - 1, max_frames).astype(int)
    return [indices[i] for i in picks]


def sample_frame_indices(
    num_frames: int,
    native_fps: float,
    fps: float = 1.0,
    max_frames: int = 32,
    clip: ClipBounds = WHOLE_VIDEO,
) -> list[int]:
    """Frame indices to decode from a constant-rate video of `num_frames` frames at `native_fps`."""
    if num_frames < 1:
        raise EmptyClip("the video has no frames")
    lo, hi = _clip_range(num_frames, native_fps, clip)
    step = max(1, round(native_fps / fps)) if native_fps > 0 and fps > 0 else 1
    return cap_frames(list(range(lo, hi, step)), max_frames)


def sample_timed_frames(
    durations_s: list[float],
    fps: float = 1.0,
    max_frames: int = 32,
    clip: ClipBounds = WHOLE_VIDEO,
) -> list[int]:
    """Frame indices for frames shown for `durations_s[i]` seconds each (a gif): the frame on screen at
    t = start, start + 1/fps, ... (each frame at most once), then capped to `max_frames`."""
    if not durations_s:
        raise EmptyClip("the animation has no frames")
    durations = np.array([d if d and d > 0 else DEFAULT_GIF_FRAME_SECONDS for d in durations_s])
    starts = np.array(frame_start_times(durations_s))
    first = max(0, clip.start_frame) if clip.start_frame is not None else 0
    last = min(len(durations) - 1, clip.end_frame) if clip.end_frame is not None else len(durations) - 1
    if first > last:
        raise EmptyClip(f"clip {clip} selects no frame of {len(durations)} frames")
    t0 = max(float(starts[first]), clip.start_s or 0.0)
    t1 = float(starts[last] + durations[last])
    if clip.end_s is not None:
        t1 = min(t1, clip.end_s)
    step = 1.0 / fps if fps > 0 else DEFAULT_GIF_FRAME_SECONDS
    shown = np.searchsorted(starts, np.arange(t0, t1 - 1e-9, step), side="right") - 1  # 1e-9: float sums
    indices = [int(f) for i, f in enumerate(shown) if i == 0 or f != shown[i - 1]]
    if not indices:
        raise EmptyClip(f"clip {clip} selects no frame of a {float(durations.sum()):.2f}s animation")
    return cap_frames(indices, max_frames)


def frame_start_times(durations_s: list[float]) -> list[float]:
    """When each frame of an animation appears, in seconds (missing durations count as 0.1 s)."""
    durations = [d if d and d > 0 else DEFAULT_GIF_FRAME_SECONDS for d in durations_s]
    return [0.0, *np.cumsum(durations)[:-1].tolist()]


def _clip_range(num_frames: int, native_fps: float, clip: ClipBounds) -> tuple[int, int]:
    lo, hi = 0, num_frames
    if clip.start_frame is not None:
        lo = max(lo, clip.start_frame)
    if clip.end_frame is not None:
        hi = min(hi, clip.end_frame + 1)
    if native_fps > 0:
        if clip.start_s is not None:
            lo = max(lo, round(clip.start_s * native_fps))
        if clip.end_s is not None:
            hi = min(hi, round(clip.end_s * native_fps))
    if hi <= lo:
        raise EmptyClip(f"clip {clip} selects no frame of {num_frames} frames at {native_fps} fps")
    return lo, hi
