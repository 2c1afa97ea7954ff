"""The routing viewer's data: one traced generation -> a JSON-able dict the page (and the stills) draw.

`trace_generation(model, prompt)` generates with routing recorded and a probe collecting dense attention
maps, and returns the output with a `ViewerData`:

  tokens        the generated tokens (token t is produced by the query of the previous position)
  units         per visual unit (image or frame): grid, video time, and the units sharing its regions
                (spatio-temporal regions span `region_t` frames), plus its tile boxes (normalised x0 y0 x1 y1)
  images        per unit the picture the model saw, padded to a square as its preprocessing does, as PNG
  selection     (T, layers, heads, k) unit / tile / score of every selected region (-1: none)
  looks         the look spans the model generated (model.look): unit, box (normalised x0 y0 x1 y1), the
                generated tokens [start, end) whose queries they bias, and the text inside them
  dense         dense attention over the visual tokens per (T, layer, head) as uint8 maps scaled by their own
                max (`scale`), or averaged over heads ("layer") or over layers and heads ("mean") when the
                full array would exceed `dense_budget` elements
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from gazelit.analysis.cost import kv_label
from gazelit.analysis.probes import GenerationMapProbe, require_gaze
from gazelit.attention.layout import RegionShape, Unit, unit_groups

from gazelit.datamodules.inference import Prompt, PromptEncoder

DENSE_BUDGET = 4_000_000  # uint8 map values kept in the page before averaging over heads / layers


@dataclass
class ViewerData:
    prompt: str
    answer: str
    tokens: list[str]
    model: dict[str, Any]
    units: list[dict[str, Any]]
    images: list[Image.Image] = field(repr=False)
    selection: dict[str, np.ndarray] = field(repr=False)  # unit, tile: int (T, L, H, k); score: float
    dense: np.ndarray = field(repr=False)  # (T, L', H', V) float32 probabilities
    dense_detail: str = "head"  # head | layer | mean
    looks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def visual_offsets(self) -> list[int]:
        """Start of each unit's tokens in the V axis of `dense` (units in order, raster within a unit)."""
        offsets, total = [], 0
        for u in self.units:
            offsets.append(total)
            total += u["grid"][0] * u["grid"][1]
        return offsets

    def to_json(self, image_side: int = 384) -> dict[str, Any]:
        """Everything the page needs, with images as PNG data URIs and maps as base64 uint8."""
        dense = self.dense
        scale = dense.max(axis=-1, keepdims=True) if dense.size else dense
        quantised = np.zeros(dense.shape, np.uint8) if not dense.size else np.round(
            np.divide(dense, scale, out=np.zeros_like(dense), where=scale > 0) * 255).astype(np.uint8)
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "tokens": self.tokens,
            "model": self.model,
            "units": self.units,
            "looks": self.looks,
            "images": [png_data_uri(img, image_side) for img in self.images],
            "selection": {
                "shape": list(self.selection["unit"].shape),
                "unit": self.selection["unit"].reshape(-1).tolist(),
                "tile": self.selection["tile"].reshape(-1).tolist(),
                "score": [round(float(s), 3) if np.isfinite(s) else None for s in self.selection["score"].reshape(-1)],
            },
            "dense": {
                "detail": self.dense_detail,
                "shape": list(dense.shape),
                "offsets": self.visual_offsets(),
                "data": base64.b64encode(quantised.tobytes()).decode(),
                "scale": [float(f"{v:.4g}") for v in scale.reshape(-1)] if dense.size else [],
            },
        }


def png_data_uri(image: Image.Image, side: int | None = None) -> str:
    if side and max(image.size) != side:
        image = image.resize((side, round(side * image.height / image.width)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def model_view(image: Image.Image, transform: Any) -> Image.Image:
    """The image as the model's preprocessing frames it: padded to a square with the mean colour when the
    transform does that (gazelit's ImagePreprocessor), so that tile boxes land where the tokens are."""
    image = image.convert("RGB")
    if getattr(transform, "pad_to_square", False) and image.width != image.height:
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(getattr(transform, "background", (127, 127, 127))))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return square
    return image


def reduce_dense(maps: torch.Tensor, budget: int = DENSE_BUDGET) -> tuple[np.ndarray, str]:
    """(T, L, H, V) -> itself, its mean over heads (T, L, 1, V), or over layers and heads (T, 1, 1, V),
    whichever first fits `budget` elements."""
    t, layers, heads, v = maps.shape
    if t * layers * heads * v <= budget:
        return maps.numpy().astype(np.float32), "head"
    if t * layers * v <= budget:
        return maps.mean(2, keepdim=True).numpy().astype(np.float32), "layer"
    return maps.mean((1, 2), keepdim=True).numpy().astype(np.float32), "mean"


def region_groups(units: list[dict[str, Any]], frames_per_region: int) -> list[list[int]]:
    """For each unit, the units whose tokens share its regions (itself for images, its run of
    `frames_per_region` frames for video), taken from the layout's own grouping."""
    as_units = [Unit(i, tuple(u.get("grid", (1, 1))), u["video"], u["time"]) for i, u in enumerate(units)]
    groups: list[list[int]] = [[i] for i in range(len(units))]
    for group in unit_groups(as_units, RegionShape(1, 1, frames_per_region)):
        for i in group:
            groups[i] = group
    return groups


@torch.no_grad()
def trace_generation(
    model: Any,
    prompt: Prompt,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    gaze_k: Any = None,
    dense_budget: int = DENSE_BUDGET,
    **generate_kwargs: Any,
) -> tuple[Any, ViewerData]:
    """Generate for one prompt with routing traced and dense maps probed; (GenerationOutput, ViewerData).
    Further keyword arguments go to `GazeVLM.generate_from_batch` (and on to transformers' generate)."""
    encoder = PromptEncoder.from_model(model)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoder.batch([prompt]).items()}
    probe = GenerationMapProbe(model.llm.config.num_hidden_layers)
    require_gaze(model)
    out = model.generate_from_batch(batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p, **({} if gaze_k is None else {"gaze_k": gaze_k}), trace=True, probe=probe,
                                    **generate_kwargs)[0]
    trace = out.trace
    steps = len(trace.tokens)
    maps = probe.maps()[:steps]
    dense, detail = reduce_dense(maps, dense_budget)
    grid = model.visual_grid
    units = [{"grid": list(g), "video": int(v), "time": int(t)}
             for g, v, t in zip(trace.unit_grids, batch["unit_video"].tolist(), batch["unit_time"].tolist())]
    for u, group in zip(units, region_groups(units, trace.region_shape[2])):
        u["group"] = group
        u["tiles"] = [list(trace.tile_box(group[-1], tile)) for tile in range(_tiles(u["grid"], trace.region_shape))]
    k = model.top_k if gaze_k is None else gaze_k
    transform = model.image_transform()
    return out, ViewerData(
        prompt=prompt.text,
        answer=out.text,
        tokens=list(trace.tokens),
        model={
            "layers": int(trace.region.shape[1]), "heads": int(trace.region.shape[2]),
            "k": "all" if k is None else k, "region": list(trace.region_shape), "num_context": model.num_context,
            "kv_size": kv_label(model.config, grid, None if k in (None, "all") else int(k), units=max(len(units), 1),
                                video=bool(len(prompt.frames))),
        },
        units=units,
        images=[model_view(img, transform) for img in prompt.units],
        selection={"unit": trace.unit.numpy(), "tile": trace.tile.numpy(), "score": trace.score.numpy()},
        dense=dense,
        dense_detail=detail,
        looks=[{"unit": look.unit, "box": [round(c, 4) for c in look.box], "start": look.start,
                "end": steps if look.end is None else look.end, "text": look.text} for look in out.looks],
    )


def _tiles(grid: list[int], region_shape: tuple[int, int, int]) -> int:
    rows, cols = grid
    return -(-rows // region_shape[0]) * -(-cols // region_shape[1])
