"""A small picklable image preprocessing (resize + normalise) for tests, the demo and benchmarks.

Real runs get the vision encoder's own preprocessing from the model; any picklable callable
PIL.Image -> float tensor (3, H, W) can take this one's place.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ResizeNormalize:
    """Resize to `size` x `size` (bicubic), scale to [0, 1], then (x - mean) / std per channel."""

    def __init__(
        self,
        size: int = 64,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std)

    def __repr__(self) -> str:
        return f"ResizeNormalize(size={self.size})"
