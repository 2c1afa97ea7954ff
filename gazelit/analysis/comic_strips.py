"""Comic strips for gaze-head discovery: images whose described content is laid out spatially.

A strip is a row of `panels` panels, each holding one coloured shape (every colour once per strip), and
the description names them in reading order: "red circle, then blue square, then ...". Each record
keeps the panel boxes and the character span of every panel's phrase in the description, so every
description token can be labelled with the panel it describes.

JSONL record: {"image": "strip_000.png", "prompt": ..., "description": ...,
               "panels": [[x0, y0, x1, y1], ...] (normalised to the image), "spans": [[start, end, panel], ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gazelit.datamodules.demo_data import COLOURS, SHAPES

PROMPT = "Describe the panels from left to right."


@dataclass
class Strip:
    image: Image.Image
    prompt: str
    description: str
    panels: list[list[float]]  # normalised boxes in the image
    spans: list[tuple[int, int, int]]  # (start, end, panel) character spans of the description

    def panel_of_span(self, start: int, end: int) -> int | None:
        """The panel whose phrase overlaps the non-space characters of description[start:end]."""
        text = self.description
        chars = [i for i in range(start, end) if not text[i].isspace()]
        for a, b, panel in self.spans:
            if any(a <= i < b for i in chars):
                return panel
        return None


def draw_strip(
    colours: list[str], shapes: list[str], size: int = 128, solid: bool = False
) -> tuple[Image.Image, list[list[float]]]:
    """A square image split into len(colours) vertical panels (white, thin grey frames), each with its
    shape; `solid` fills every panel with its colour instead (no frame: the cleanest signal)."""
    n = len(colours)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    boxes = []
    for i, (colour, shape) in enumerate(zip(colours, shapes)):
        x0, x1 = round(i * size / n), round((i + 1) * size / n)
        boxes.append([x0 / size, 0.0, x1 / size, 1.0])
        rgb = COLOURS[colour]
        if solid:
            draw.rectangle([x0, 0, x1 - 1, size - 1], fill=rgb)
            continue
        draw.rectangle([x0, 0, x1 - 1, size - 1], outline=(90, 90, 90), width=max(1, size // 64))
        w = x1 - x0
        m = w * 0.15
        cy = size / 2
        left, right, top, bottom = x0 + m, x1 - m, cy - (w - 2 * m) / 2, cy + (w - 2 * m) / 2
        if shape == "square":
            draw.rectangle([left, top, right, bottom], fill=rgb)
        elif shape == "circle":
            draw.ellipse([left, top, right, bottom], fill=rgb)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=rgb)
    return image, boxes


def make_strip(rng: np.random.Generator, panels: int = 4, size: int = 128, solid: bool = False,
               phrase: str = "{colour} {shape}", joiner: str = ", then ") -> Strip:
    colours = [str(c) for c in rng.choice(list(COLOURS), size=panels, replace=False)]
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(panels)]
    image, boxes = draw_strip(colours, shapes, size, solid)
    description, spans = "", []
    for i, (colour, shape) in enumerate(zip(colours, shapes)):
        if i:
            description += joiner
        text = phrase.format(colour=colour, shape=shape)
        spans.append((len(description), len(description) + len(text), i))
        description += text
    return Strip(image, PROMPT, description + ".", boxes, spans)


def generate_strips(out: str | Path, count: int = 8, panels: int = 4, size: int = 128, seed: int = 0,
                    solid: bool = False, phrase: str = "{colour} {shape}") -> Path:
    """Write `count` strips as PNGs and strips.jsonl under `out`; returns the JSONL path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = out / "strips.jsonl"
    with path.open("w") as f:
        for i in range(count):
            strip = make_strip(rng, panels, size, solid, phrase)
            name = f"strip_{i:03d}.png"
            strip.image.save(out / name)
            f.write(json.dumps({"image": name, "prompt": strip.prompt, "description": strip.description,
                                "panels": strip.panels, "spans": [list(s) for s in strip.spans]}) + "\n")
    return path


def load_strips(path: str | Path) -> list[Strip]:
    """Strips from a JSONL file (image paths relative to the file)."""
    path = Path(path)
    strips = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        missing = {"image", "description", "panels", "spans"} - set(r)
        if missing:
            raise ValueError(f"{path}:{number}: missing {sorted(missing)}")
        with Image.open(path.parent / r["image"]) as image:
            strips.append(Strip(image.convert("RGB"), r.get("prompt", PROMPT), r["description"], r["panels"],
                                [tuple(s) for s in r["spans"]]))
    return strips
