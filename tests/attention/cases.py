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
