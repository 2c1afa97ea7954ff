"""The font of the pictures gazelit writes (routing pictures, gaze-head heatmaps, viewer stills).

Pillow's `load_default()` is, since Pillow 10.1, a small FreeType font whose spaces render 2 pixels wide,
so captions read as run-together words ("Whatshape is ..."). The classic bitmap font has a fixed
6 x 12 pixel cell (`CHAR`, `LINE`): spaces are as wide as letters and text width is predictable.
"""

from __future__ import annotations

from PIL import ImageFont

CHAR, LINE = 6, 12  # the label font's character width and line height (pixels)


def label_font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def drawable(text: str) -> str:
    """`text` as the label font can draw it: characters outside Latin-1 (the bitmap font's range) become
    '?'. The pictures are a quick look; the trace viewer's page shows the exact text."""
    return text.encode("latin-1", "replace").decode("latin-1")
