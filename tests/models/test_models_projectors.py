"""Projectors: shapes, grid halving with odd sides, token placement, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from gazelit.models.projectors import PROJECTORS, build_projector
from gazelit.models.tiny import TINY_VISION
from gazelit.models.vision import build_vision_encoder

DV, DL = 8, 16


def features(n: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, rows * cols, DV, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (1, 1)])
def test_mlp_keeps_the_grid(grid):
    proj = build_projector("mlp2x_gelu", DV, DL)
    assert proj.output_grid(grid) == grid
    out = proj(features(2, *grid), grid)
    assert out.shape == (2, grid[0] * grid[1], DL)
    # Token-wise: a token's output depends only on that token.
    x = features(1, *grid)
    y = x.clone()
    y[:, -1] += 1
    changed = (proj(x, grid) - proj(y, grid)).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False] * (grid[0] * grid[1] - 1) + [True]


def test_mlp_layout():
    proj = build_projector("mlp2x_gelu", DV, DL)
    layers = list(proj.mlp)
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].in_features, layers[2].out_features) == (
        DV, DL, DL, DL,
    )


def test_conv_compresses_576_to_144_tokens():
    proj = build_projector("conv_mlp2x_gelu", DV, DL)
    assert proj.output_grid((24, 24)) == (12, 12)
    out = proj(features(2, 24, 24), (24, 24))
    assert out.shape == (2, 144, DL)


@pytest.mark.parametrize(
    "grid, expected", [((4, 4), (2, 2)), ((5, 7), (3, 4)), ((1, 1), (1, 1)), ((3, 2), (2, 1)), ((27, 27), (14, 14))]
)
def test_conv_output_grid_is_ceil_half(grid, expected):
    proj = build_projector("conv_mlp2x_gelu", DV, DL)
    assert proj.output_grid(grid) == expected
    assert proj(features(1, *grid), grid).shape == (1, expected[0] * expected[1], DL)


@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])
def test_conv_every_token_lands_in_its_2x2_cell(grid):
    """Perturbing input token (r, c) changes exactly output token (r // 2, c // 2), in raster order;
    on an odd grid the last row / column (padded) still reaches the output: no token is dropped."""
    proj = build_projector("conv_mlp2x_gelu", DV, DL).eval()
    rows, cols = grid
    out_rows, out_cols = proj.output_grid(grid)
    x = features(1, rows, cols)
    base = proj(x, grid)
    for r in range(rows):
        for c in range(cols):
            y = x.clone()
            y[0, r * cols + c] += 1.0
            changed = ((proj(y, grid) - base).abs().sum(-1)[0] > 1e-6).nonzero().flatten().tolist()
            assert changed == [(r // 2) * out_cols + c // 2], (r, c)
    assert out_rows * out_cols == -(-rows // 2) * -(-cols // 2)


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_gradients_reach_every_parameter_and_the_features(kind):
    proj = build_projector(kind, DV, DL)
    x = features(2, 5, 5).requires_grad_(True)
    proj(x, (5, 5)).pow(2).mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_no_images(kind):
    proj = build_projector(kind, DV, DL)
    rows, cols = proj.output_grid((5, 5))
    assert proj(torch.zeros(0, 25, DV), (5, 5)).shape == (0, rows * cols, DL)


def test_encoder_to_projector():
    enc = build_vision_encoder("siglip2", config={**TINY_VISION["siglip2"], "image_size": 40})
    grid = enc.token_grid()
    assert grid == (5, 5)
    proj = build_projector("conv_mlp2x_gelu", enc.hidden_size, 64)
    out = proj(enc(torch.randn(2, 3, 40, 40)), grid)
    assert out.shape == (2, 9, 64) and proj.output_grid(grid) == (3, 3)


def test_bad_input():
    with pytest.raises(ValueError) as err:
        build_projector("mlp", DV, DL)
    assert str(err.value) == "unknown projector kind 'mlp'; choose one of conv_mlp2x_gelu, mlp2x_gelu"
    proj = build_projector("conv_mlp2x_gelu", DV, DL)
    with pytest.raises(ValueError, match=r"expected features \(N, 4\*4=16, 8\) for grid \(4, 4\), got \(2, 15, 8\)"):
        proj(torch.zeros(2, 15, DV), (4, 4))
    with pytest.raises(ValueError, match="expected features"):
        proj(torch.zeros(2, 16, DV + 1), (4, 4))
