"""Gaze heads: attention heads whose attention tracks the image region being described.

Following the Gaze Heads summary (shared/seeds/gaze-heads-summary.txt): a few teacher-forced forward
passes over images whose described content is laid out spatially (comic strips, gazelit.analysis
.comic_strips), one correlation score per head.

For every strip: the prompt (the image + "Describe the panels ...") followed by the description, one
forward with k = "all" and the GazeContext probe. For every description token inside a panel's phrase,
every head's dense attention over the visual tokens (softmax of q . k over all keys, from the probe) is
summed per panel (a visual token belongs to the panel containing its centre, in the frame the model
sees: padded to a square when the preprocessing pads). The head's score for that token is the Pearson
correlation, across panels, between this attention mass and the one-hot of the described panel (0 when
the head's mass is the same on every panel); a head's score is the mean over all labelled tokens.

`offset` picks the query: 0 (default) the description token's own position, 1 the query that produced
the token (the position before it, as the routing viewer shows generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from gazelit.analysis.comic_strips import Strip
from gazelit.analysis.probes import RowMapProbe, require_gaze
from gazelit.attention import TEXT

from gazelit.datamodules.inference import Prompt, PromptEncoder
from gazelit.drawing import drawable, label_font


@dataclass
class GazeHeadScores:
    scores: torch.Tensor  # (layers, heads) mean correlation
    tokens: int  # labelled description tokens the mean is over
    strips: int

    def top(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The n best heads as (layer, head, score), best first."""
        flat = self.scores.flatten()
        order = torch.argsort(flat, descending=True)[:n]
        heads = self.scores.shape[1]
        return [(int(i) // heads, int(i) % heads, float(flat[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.tolist(), "tokens": self.tokens, "strips": self.strips,
                "top": [{"layer": l, "head": h, "score": s} for l, h, s in self.top(20)]}


def correlation_scores(attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """attention (..., N, P) mass per panel for N tokens, labels (N,) described panel -> (...) mean over
    tokens of the Pearson correlation (across the P panels) with the one-hot label (0 for a flat row)."""
    y = torch.nn.functional.one_hot(labels, attention.shape[-1]).to(torch.float64)
    a = attention.to(torch.float64)
    ac = a - a.mean(-1, keepdim=True)
    yc = y - y.mean(-1, keepdim=True)
    den = ((ac**2).sum(-1) * (yc**2).sum(-1)).sqrt()
    corr = torch.where(den > 1e-12, (ac * yc).sum(-1) / den.clamp(min=1e-12), torch.zeros_like(den))
    return corr.mean(-1).float()


def panel_of_tokens(grid: tuple[int, int], panels: list[list[float]], image_size: tuple[int, int],
                    pad_to_square: bool) -> torch.Tensor:
    """(rows*cols,) panel index of every visual token of a unit (-1: in no panel), raster order."""
    rows, cols = grid
    w, h = image_size
    side = max(w, h) if pad_to_square else None
    out = torch.full((rows * cols,), -1, dtype=torch.long)
    for r in range(rows):
        for c in range(cols):
            x, y = (c + 0.5) / cols, (r + 0.5) / rows
            if side is not None:  # model frame (padded square) -> image frame
                x, y = (x * side - (side - w) / 2) / w, (y * side - (side - h) / 2) / h
            for p, (x0, y0, x1, y1) in enumerate(panels):
                if x0 <= x < x1 and y0 <= y < y1:
                    out[r * cols + c] = p
                    break
    return out


def teacher_forced(model: Any, strip: Strip, offset: int = 0) -> tuple[dict[str, Any], list[int], list[int]]:
    """The batch (prompt + description tokens) and, for every description token inside a panel phrase,
    the query row to read (its position minus `offset`) and the panel it describes."""
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 (the token's own query) or 1 (the query that produced it), got {offset}")
    batch = PromptEncoder.from_model(model).batch([Prompt(strip.prompt, images=[strip.image])])
    enc = model.tokenizer(strip.description, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)[None]
    start = batch["input_ids"].shape[1]
    batch = dict(batch)
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
    batch["labels"] = torch.cat([batch["labels"], torch.full_like(ids, -100)], 1)
    batch["token_kind"] = torch.cat([batch["token_kind"], torch.full_like(ids, TEXT)], 1)
    rows, labels = [], []
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        panel = strip.panel_of_span(a, b)
        if panel is not None:
            rows.append(start + i - offset)
            labels.append(panel)
    if not rows:
        raise ValueError(f"no description token falls in a panel phrase: {strip.description!r}")
    return batch, rows, labels


@torch.no_grad()
def panel_attention(model: Any, strip: Strip, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """((layers, heads, N, panels) attention mass per panel, (N,) described panel) for one strip."""
    require_gaze(model)
    batch, rows, labels = teacher_forced(model, strip, offset)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    probe = RowMapProbe([rows])
    model(batch, gaze_k=None, probe=probe)  # every region: dense attention maps
    panel = panel_of_tokens(model.visual_grid, strip.panels, strip.image.size,
                            getattr(model.image_transform(), "pad_to_square", False))
    num_panels = len(strip.panels)
    keep = panel >= 0
    per_layer = []
    for layer in range(len(probe.maps)):
        maps = probe.maps[layer][0]  # (heads, N, V) for the single unit
        mass = torch.zeros(*maps.shape[:2], num_panels, dtype=maps.dtype)
        mass.index_add_(2, panel[keep], maps[:, :, keep])
        per_layer.append(mass)
    return torch.stack(per_layer), torch.tensor(labels)


def find_gaze_heads(model: Any, strips: list[Strip], offset: int = 0) -> GazeHeadScores:
    """Score every head of every layer over the strips (panels per strip must be equal)."""
    attention, labels = [], []
    for strip in strips:
        a, y = panel_attention(model, strip, offset)
        attention.append(a)
        labels.append(y)
    if len({a.shape[-1] for a in attention}) > 1:
        raise ValueError("all strips must have the same number of panels")
    return GazeHeadScores(correlation_scores(torch.cat(attention, 2), torch.cat(labels)),
                          tokens=int(sum(len(y) for y in labels)), strips=len(strips))


def heatmap_png(scores: torch.Tensor, path: str | Path, top: int = 5, cell: int = 26,
                title: str = "gaze-head score (mean correlation)") -> Path:
    """A layers x heads heatmap (red positive, blue negative, white 0), the `top` heads framed. The title,
    the legend and a colour scale from -1 to 1 lie inside the image, which is as wide as its widest text."""
    layers, heads = scores.shape
    font = label_font()
    title = drawable(title)
    legend = ["rows: layers, columns: heads", "framed: the top heads", "colour: score from -1 (blue) to +1 (red)"]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(measure.textlength(line, font=font) for line in [title, *legend])
    left, head_row, line = 44, 40, 12
    grid_bottom = head_row + layers * cell
    scale_top = grid_bottom + 8
    width = int(max(left + heads * cell + 10, text_width + 10, 4 + 150 + 40))
    height = scale_top + 12 + 14 + line * len(legend) + 6
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black", font=font)

    def colour(v: float) -> tuple[int, int, int]:
        v = max(-1.0, min(1.0, v))
        fade = int(255 * (1 - abs(v)))
        return (255, fade, fade) if v >= 0 else (fade, fade, 255)

    for h in range(heads):
        if heads <= 16 or h % max(1, heads // 16) == 0:
            draw.text((left + h * cell + 4, head_row - 14), str(h), fill="black", font=font)
    best = {(l, h) for l, h, _ in GazeHeadScores(scores, 0, 0).top(top)}
    for l in range(layers):
        draw.text((4, head_row + l * cell + 6), f"L{l}", fill="black", font=font)
        for h in range(heads):
            box = [left + h * cell, head_row + l * cell, left + (h + 1) * cell - 1, head_row + (l + 1) * cell - 1]
            draw.rectangle(box, fill=colour(float(scores[l, h])), outline=(0, 0, 0) if (l, h) in best else (230, 230, 230),
                           width=2 if (l, h) in best else 1)  # fmt: skip
    for x in range(150):  # the colour scale, -1 .. +1
        draw.line([(4 + x, scale_top), (4 + x, scale_top + 10)], fill=colour(x / 74.5 - 1))
    draw.text((4, scale_top + 12), "-1", fill="black", font=font)
    draw.text((4 + 72, scale_top + 12), "0", fill="black", font=font)
    draw.text((4 + 140, scale_top + 12), "+1", fill="black", font=font)
    for n, text in enumerate(legend):
        draw.text((4, scale_top + 26 + line * n), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
