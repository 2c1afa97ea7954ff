"""Which frames are sampled: 1 FPS stride, clip bounds, the max_frames cap, gif display times."""

from __future__ import annotations

import pytest

from gazelit.datamodules.frame_sampling import EmptyClip, cap_frames, sample_frame_indices, sample_timed_frames
from gazelit.datamodules.records import ClipBounds


@pytest.mark.parametrize(
    ("num_frames", "native_fps", "fps", "max_frames", "clip", "expected"),
    [
        # 10 s at 30 fps, 1 FPS: every 30th frame
        (300, 30.0, 1.0, 32, ClipBounds(), list(range(0, 300, 30))),
        # NTSC rate rounds to a stride of 30
        (150, 29.97, 1.0, 32, ClipBounds(), [0, 30, 60, 90, 120]),
        # 2 FPS from 24 fps: stride 12
        (48, 24.0, 2.0, 32, ClipBounds(), [0, 12, 24, 36]),
        # 100 s at 30 fps capped to 8: linspace(0, 99, 8) -> 0 14 28 42 56 70 84 99, times 30
        (3000, 30.0, 1.0, 8, ClipBounds(), [0, 420, 840, 1260, 1680, 2100, 2520, 2970]),
        # a 1 fps video keeps every frame; slower than 1 fps never gets a stride below 1
        (5, 1.0, 1.0, 32, ClipBounds(), [0, 1, 2, 3, 4]),
        (4, 0.5, 1.0, 32, ClipBounds(), [0, 1, 2, 3]),
        # clip in seconds: [2 s, 5 s) at 30 fps = frames [60, 150)
        (300, 30.0, 1.0, 32, ClipBounds(start_s=2.0, end_s=5.0), [60, 90, 120]),
        # clip in frames, end inclusive
        (100, 10.0, 1.0, 32, ClipBounds(start_frame=5, end_frame=25), [5, 15, 25]),
        # clip plus cap: frames 60..269 every 30 = 7 indices, capped to 3 -> positions 0, 3, 6
        (300, 30.0, 1.0, 3, ClipBounds(start_s=2.0, end_s=9.0), [60, 150, 240]),
    ],
)
def test_constant_rate_sampling(num_frames, native_fps, fps, max_frames, clip, expected):
    assert sample_frame_indices(num_frames, native_fps, fps, max_frames, clip) == expected


def test_clip_outside_the_video_is_an_error():
    with pytest.raises(EmptyClip):
        sample_frame_indices(100, 10.0, 1.0, 8, ClipBounds(start_s=20.0))
    with pytest.raises(EmptyClip):
        sample_frame_indices(0, 10.0)


def test_cap_keeps_first_and_last_uniformly():
    assert cap_frames(list(range(10)), 4) == [0, 3, 6, 9]
    assert cap_frames([3, 5], 4) == [3, 5]


def test_gif_frames_follow_display_time():
    # frames start at 0, 0.5, 1.5 and 2.0 s: at t = 0, 1, 2, 3 s the screen shows frames 0, 1, 3, 3
    assert sample_timed_frames([0.5, 1.0, 0.5, 2.0], fps=1.0) == [0, 1, 3]
    # missing durations count as 0.1 s: 20 frames last 2 s, so t = 0 and 1 s show frames 0 and 10
    assert sample_timed_frames([0.0] * 20, fps=1.0) == [0, 10]
    # 2 FPS over 1 s frames shows each frame once
    assert sample_timed_frames([1.0] * 3, fps=2.0) == [0, 1, 2]
    assert sample_timed_frames([1.0] * 10, fps=1.0, max_frames=4) == [0, 3, 6, 9]


def test_gif_clip_bounds():
    assert sample_timed_frames([1.0] * 10, fps=1.0, clip=ClipBounds(start_s=2.0, end_s=5.0)) == [2, 3, 4]
    assert sample_timed_frames([1.0] * 10, fps=1.0, clip=ClipBounds(start_frame=7)) == [7, 8, 9]
    with pytest.raises(EmptyClip):
        sample_timed_frames([1.0] * 3, clip=ClipBounds(start_s=5.0))
