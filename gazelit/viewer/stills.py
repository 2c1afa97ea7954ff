"""PNG stills of the routing viewer (for TensorBoard and papers), drawn with Pillow.

One still per generated token: for every image / frame, the selected regions (fill opacity = how many of
the chosen layers x heads selected the region) beside the dense attention map of the same query, with the
token as caption. `summary_png` stacks the stills of several tokens into one figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gazelit.drawing import drawable, label_font
from gazelit.viewer.data import ViewerData

_HEAT = [(0.0, (0, 0, 4)), (0.35, (120, 28, 109)), (0.65, (237, 105, 37)), (1.0, (252, 255, 164))]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 colours (dark purple -> orange -> light yellow), as the page."""
    xs = [s for s, _ in _HEAT]
    return np.stack([np.interp(values, xs, [c[k] for _, c in _HEAT]) for k in range(3)], -1).astype(np.uint8)


def region_frequency(data: ViewerData, t: int, layers: list[int] | None = None,
                     heads: list[int] | None = None) -> dict[tuple[int, int], float]:
    """{(unit, tile): fraction of the chosen (layer, head) pairs selecting it} for token t, expanded to every
    unit of a spatio-temporal region."""
    unit, tile = data.selection["unit"][t], data.selection["tile"][t]  # (L, H, k)
    layers = list(range(unit.shape[0])) if layers is None else layers
    heads = list(range(unit.shape[1])) if heads is None else heads
    counts: dict[tuple[int, int], int] = {}
    for l in layers:
        for h in heads:
            for u, r in zip(unit[l, h].tolist(), tile[l, h].tolist()):
                if u < 0:
                    continue
                for member in data.units[u]["group"]:
                    counts[(member, r)] = counts.get((member, r), 0) + 1
    n = len(layers) * len(heads)
    return {key: c / n for key, c in counts.items()}


def dense_map(data: ViewerData, t: int) -> np.ndarray:
    """(V,) the stored dense maps of token t averaged over everything stored (layers and heads)."""
    return data.dense[t].reshape(-1, data.dense.shape[-1]).mean(0) if data.dense.size else np.zeros(0)


def still(data: ViewerData, t: int, side: int = 224, layers: list[int] | None = None,
          heads: list[int] | None = None) -> Image.Image:
    """The still of token t: per unit, routing (left) and dense attention (right)."""
    freq = region_frequency(data, t, layers, heads)
    dense = dense_map(data, t)
    top = float(dense.max()) if dense.size else 0.0
    offsets = data.visual_offsets()
    per_row = min(len(data.units), 4) or 1
    caption_h, gap = 22, 6
    rows = -(-len(data.units) // per_row) or 1
    canvas = Image.new("RGB", (per_row * (2 * side + 3 * gap), caption_h + rows * (side + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    where = "all layers" if layers is None else f"layers {layers}"
    who = "all heads" if heads is None else f"heads {heads}"
    draw.text((gap, 4), drawable(f"token {t}: {data.tokens[t]!r}  (k={data.model['k']}, {where}, {who}; left: "
                                 f"selected regions, right: dense attention)"), fill="black", font=label_font())
    for u, unit in enumerate(data.units):
        x = (u % per_row) * (2 * side + 3 * gap) + gap
        y = caption_h + (u // per_row) * (side + gap)
        base = data.images[u].convert("RGBA").resize((side, side), Image.Resampling.BICUBIC)
        # routing
        overlay = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        od = ImageDraw.Draw(overlay)
        for (member, tile), f in freq.items():
            if member != u:
                continue
            x0, y0, x1, y1 = (v * side for v in unit["tiles"][tile])
            od.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(26, 115, 232, int(40 + 150 * f)), outline=(11, 61, 145, 255),
                         width=2)
        canvas.paste(Image.alpha_composite(base, overlay).convert("RGB"), (x, y))
        # dense
        grid_rows, grid_cols = unit["grid"]
        values = dense[offsets[u] : offsets[u] + grid_rows * grid_cols].reshape(grid_rows, grid_cols)
        values = values / top if top > 0 else values * 0
        rgba = np.concatenate([heat_colours(values), (255 * (0.15 + 0.7 * values))[..., None].astype(np.uint8)], -1)
        heat = Image.fromarray(rgba, "RGBA").resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(Image.alpha_composite(base, heat).convert("RGB"), (x + side + gap, y))
    return canvas


def summary_png(stills: list[Image.Image], max_rows: int = 8) -> Image.Image:
    """The first `max_rows` stills stacked vertically."""
    chosen = stills[:max_rows]
    width = max(s.width for s in chosen)
    out = Image.new("RGB", (width, sum(s.height for s in chosen)), "white")
    y = 0
    for s in chosen:
        out.paste(s, (0, y))
        y += s.height
    return out


def write_stills(data: ViewerData, out_dir: str | Path, max_tokens: int | None = None, side: int = 224) -> list[Path]:
    """stills/token_XXX.png for each token (the first `max_tokens`) and stills/summary.png."""
    folder = Path(out_dir) / "stills"
    folder.mkdir(parents=True, exist_ok=True)
    count = data.num_tokens if max_tokens is None else min(max_tokens, data.num_tokens)
    images = [still(data, t, side) for t in range(count)]
    paths = []
    for t, image in enumerate(images):
        paths.append(folder / f"token_{t:03d}.png")
        image.save(paths[-1])
    if images:
        paths.append(folder / "summary.png")
        summary_png(images).save(paths[-1])
    return paths


def log_to_tensorboard(paths: list[Path], log_dir: str | Path, tag: str = "routing", step: int = 0) -> None:
    """Write PNG stills as TensorBoard image summaries (one tag per file name)."""
    from torch.utils.tensorboard import SummaryWriter

    writer: Any = SummaryWriter(str(log_dir))
    try:
        for path in paths:
            with Image.open(path) as image:
                writer.add_image(f"{tag}/{path.stem}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
    finally:
        writer.close()
