"""Projectors: vision features (N, rows*cols, Dv) on a token grid -> LLM embeddings (N, rows'*cols', Dl).

    mlp2x_gelu        Linear(Dv, Dl) -> GELU -> Linear(Dl, Dl) per token (LLaVA-1.5, Cambrian); same grid.
    conv_mlp2x_gelu   a 2x2 stride-2 convolution over the token grid (Dv -> Dv), then mlp2x_gelu: 4x fewer
                      tokens (24x24 = 576 -> 12x12 = 144). An odd side is zero-padded at the bottom / right
                      first, so no token is dropped: the grid becomes ceil(rows/2) x ceil(cols/2).

Tokens are in raster order on both sides. `output_grid(grid)` tells the data pipeline how many visual
tokens to reserve per image before any forward pass.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from gazelit.shapes import projected_grid

__all__ = ["PROJECTORS", "Projector", "MLPProjector", "ConvMLPProjector", "build_projector"]


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class Projector(nn.Module):
    """Maps vision features on a (rows, cols) grid to LLM-width tokens on `output_grid(grid)`."""

    kind: ClassVar[str]

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.vision_hidden = vision_hidden
        self.llm_hidden = llm_hidden

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError

    def _check(self, features: Tensor, grid: tuple[int, int]) -> None:
        rows, cols = grid
        if features.ndim != 3 or features.shape[1] != rows * cols or features.shape[2] != self.vision_hidden:
            raise ValueError(
                f"{self.kind}: expected features (N, {rows}*{cols}={rows * cols}, {self.vision_hidden}) "
                f"for grid {tuple(grid)}, got {tuple(features.shape)}"
            )


class MLPProjector(Projector):
    """Two-layer GELU MLP applied to every token; the grid is unchanged."""

    kind: ClassVar[str] = "mlp2x_gelu"

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__(vision_hidden, llm_hidden)
        self.mlp = _mlp2x_gelu(vision_hidden, llm_hidden)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return projected_grid(self.kind, grid)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        self._check(features, grid)
        return self.mlp(features)


class ConvMLPProjector(Projector):
    """2x2 stride-2 convolution over the token grid (4x token compression), then the GELU MLP."""

    kind: ClassVar[str] = "conv_mlp2x_gelu"

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__(vision_hidden, llm_hidden)
        self.conv = nn.Conv2d(vision_hidden, vision_hidden, kernel_size=2, stride=2)
        self.mlp = _mlp2x_gelu(vision_hidden, llm_hidden)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return projected_grid(self.kind, grid)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        self._check(features, grid)
        rows, cols = grid
        x = features.transpose(1, 2).reshape(features.shape[0], self.vision_hidden, rows, cols)
        x = F.pad(x, (0, cols % 2, 0, rows % 2))  # (left, right, top, bottom): odd side -> even
        x = self.conv(x).flatten(2).transpose(1, 2)  # (N, rows'*cols', Dv), raster order
        return self.mlp(x)


PROJECTORS: dict[str, type[Projector]] = {cls.kind: cls for cls in (MLPProjector, ConvMLPProjector)}


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> Projector:
    """A projector of `kind` from `vision_hidden` to `llm_hidden` features (randomly initialised)."""
    try:
        cls = PROJECTORS[kind]
    except KeyError:
        raise ValueError(f"unknown projector kind {kind!r}; choose one of {', '.join(sorted(PROJECTORS))}") from None
    return cls(vision_hidden, llm_hidden)
