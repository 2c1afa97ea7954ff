"""Random packed batches for attention tests: odd grids, 1-3 units, images and video frames, padding,
text before / between / after units."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gazelit.attention import PAD, GazeLayout, RegionShape, Unit

ODD_GRIDS = [(3, 5), (5, 3), (5, 7), (3, 3), (4, 5), (7, 5)]


@dataclass
class Case:
    layout: GazeLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def real_rows(self) -> torch.Tensor:
        """(B, 1, L, 1) bool: rows that are not padding."""
        return (self.layout.kind != PAD)[:, None, :, None]


def random_layout(
    seed: int,
    batch: int = 2,
    units: tuple[int, int] = (1, 3),
    num_context: int = 2,
    region: RegionShape = RegionShape(2, 3, 1),
    video: bool = False,
    padding: str = "right",
    text_before: bool = True,
    text_after: int = 5,
) -> GazeLayout:
    rng = random.Random(seed)
    samples, lengths = [], []
    for b in range(batch):
        pos = rng.randint(1, 4) if text_before else 0
        sample_units = []
        n = rng.randint(*units)
        grid = rng.choice(ODD_GRIDS)
        for t in range(n):
            if not video:
                grid = rng.choice(ODD_GRIDS)
            sample_units.append(Unit(pos, grid, video=b if video else -1, time=t))
            pos += grid[0] * grid[1] + num_context
            if not video and t < n - 1:
                pos += rng.randint(0, 3)  # text between images (0: adjacent units)
        pos += rng.randint(1, text_after)
        samples.append(sample_units)
        lengths.append(pos)
    length = max(lengths) + (1 if padding != "none" else 0)
    valid = []
    shifted = []
    for sample_units, n in zip(samples, lengths):
        if padding == "left":
            off = length - n
            shifted.append([Unit(u.start + off, u.grid, u.video, u.time) for u in sample_units])
            valid.append((off, length))
        else:
            shifted.append(sample_units)
            valid.append((0, n))
    return GazeLayout.build(shifted, length, num_context, region, valid=valid)


def random_case(
    seed: int, hq: int = 4, hkv: int = 2, d: int = 8, dtype=torch.float64, grad: bool = False, **layout_kwargs
) -> Case:
    layout = random_layout(seed, **layout_kwargs)
    g = torch.Generator().manual_seed(seed)
    b, length = layout.batch_size, layout.length

    def make(h):
        return torch.randn(b, h, length, d, generator=g, dtype=dtype).requires_grad_(grad)

    return Case(layout, make(hq), make(hkv), make(hkv))


def frame_group_layout(
    seed: int, t: int, batch: int = 2, num_context: int = 1, padding: str = "left", text_after: int = 3
) -> GazeLayout:
    """Videos whose region groups (t frames each) have text and images placed *between* their frames.

    Per sample: 1-2 videos with an odd number of frames (3 or 5), frames of the videos interleaved, text
    runs (1-3 tokens, sometimes none) and now and then an image between frames, text at the end. Regions
    are (2, 2, t): a region of one video is a candidate only once all t frames of its group have ended.
    """
    rng = random.Random(seed)
    region = RegionShape(2, 2, t)
    samples, lengths = [], []
    for b in range(batch):
        videos = rng.randint(1, 2)
        frames = {v: rng.choice([3, 5]) for v in range(videos)}
        grids = {v: rng.choice([(3, 3), (3, 5), (4, 4)]) for v in range(videos)}
        order = [(v, f) for v in range(videos) for f in range(frames[v])]
        order.sort(key=lambda vf: (vf[1], vf[0]))  # frames of the videos interleaved in time
        pos = rng.randint(0, 2)
        units = []
        for i, (v, f) in enumerate(order):
            units.append(Unit(pos, grids[v], video=b * 10 + v, time=f))
            pos += grids[v][0] * grids[v][1] + num_context
            if i < len(order) - 1:
                pos += rng.choice([0, 1, 2, 3])  # text inside (or between) frame groups
                if rng.random() < 0.3:  # an image inside a frame group
                    grid = rng.choice(ODD_GRIDS)
                    units.append(Unit(pos, grid))
                    pos += grid[0] * grid[1] + num_context + rng.randint(0, 1)
        pos += rng.randint(1, text_after)
        samples.append(units)
        lengths.append(pos)
    length = max(lengths) + (1 if padding != "none" else 0)
    valid, shifted = [], []
    for units, n in zip(samples, lengths):
        off = length - n if padding == "left" else 0
        shifted.append([Unit(u.start + off, u.grid, u.video, u.time) for u in units])
        valid.append((off, off + n))
    return GazeLayout.build(shifted, length, num_context, region, valid=valid)


def qkv_for(layout: GazeLayout, seed: int, hq: int, hkv: int, d: int = 8, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    b, length = layout.batch_size, layout.length
    return tuple(
        torch.randn(b, h, length, d, generator=g, dtype=dtype).requires_grad_(grad) for h in (hq, hkv, hkv)
    )
