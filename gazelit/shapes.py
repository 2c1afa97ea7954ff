"""Shapes a recipe implies, worked out once, without torch, without building the model or downloading.

The one place the projected grid, the regions per unit and the vision input size are derived: the model,
the k schedule, `gazelit validate` and `gazelit cost` all take them from here.

For `gazelit validate`: visual tokens per image / frame, regions per unit, the k schedule's endpoints,
the attended visual fraction at the target k, tokens per image and per video, the global batch size.

The vision tower's image and patch size come from, in order: `model.vision.options.image_size` and the
`config:` mapping (with the family's transformers defaults, `VISION_DEFAULT_SIZES`), the checkpoint's
`config.json` in a local directory or the Hugging Face cache (never the network), or the checkpoint
name (`...-patch16-384`). If none says, the sizes are reported as unknown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gazelit.schema import Recipe, resolve_top_k

# (image_size, patch_size) of each family's transformers config class when a `config:` mapping leaves
# them out (tests/test_shapes.py holds these to transformers' own defaults)
VISION_DEFAULT_SIZES = {"siglip2": (224, 16), "siglip": (224, 16), "clip": (224, 32), "dinov2": (224, 14),
                        "dinov2_with_registers": (224, 16)}

_NAME_SIZES = re.compile(r"patch(\d+)[-_](\d+)")


@dataclass
class VisionSizes:
    image_size: int | None
    patch_size: int | None
    source: str  # where the sizes came from


def vision_sizes(recipe: Recipe) -> VisionSizes:
    spec = recipe.model.vision
    override = (spec.options or {}).get("image_size")
    if spec.config is not None:
        registers = spec.config.get("model_type") == "dinov2_with_registers" or "num_register_tokens" in spec.config
        image, patch = VISION_DEFAULT_SIZES["dinov2_with_registers" if registers else spec.family]
        image = spec.config.get("image_size", image)
        patch = spec.config.get("patch_size", patch)
        return VisionSizes(override or _side(image), _side(patch), "model.vision.config")
    local = _local_config(spec.pretrained)
    if local is not None and "patch_size" in local:
        image = local.get("image_size", VISION_DEFAULT_SIZES.get(spec.family, (None,))[0])
        return VisionSizes(override or _side(image), _side(local["patch_size"]), "local checkpoint config")
    match = _NAME_SIZES.search(spec.pretrained or "")
    if match:
        return VisionSizes(override or int(match.group(2)), int(match.group(1)), f"checkpoint name {spec.pretrained}")
    return VisionSizes(override, None, f"unknown: {spec.pretrained} is not available offline")


def _side(value: Any) -> int:
    return int(value if isinstance(value, int) else value[0])


def _local_config(pretrained: str | None) -> dict[str, Any] | None:
    """The vision part of a checkpoint's config.json: a local directory, else the Hugging Face cache."""
    if not pretrained:
        return None
    path = Path(pretrained) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(pretrained, "config.json")
        except Exception:  # not a repo id, no cache
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config.get("vision_config", config) if isinstance(config, dict) else None


def projected_grid(kind: str, grid: tuple[int, int]) -> tuple[int, int]:
    """The projector's output grid for an encoder grid (mlp2x_gelu keeps it; the stride-2 conv halves it,
    rounding up: an odd side is padded)."""
    rows, cols = int(grid[0]), int(grid[1])
    if kind == "conv_mlp2x_gelu":
        return -(-rows // 2), -(-cols // 2)
    return rows, cols


def pooled_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    return math.ceil(grid[0] / pool), math.ceil(grid[1] / pool)


def regions_per_unit(grid: tuple[int, int], region: list[int]) -> int:
    return math.ceil(grid[0] / region[0]) * math.ceil(grid[1] / region[1])


@dataclass
class DerivedShapes:
    vision: VisionSizes
    encoder_grid: tuple[int, int] | None
    projected_grid: tuple[int, int] | None
    visual_tokens_per_unit: int | None
    context_per_unit: int
    regions_per_unit: int | None
    k_target: int | None
    tokens_per_image: int | None
    tokens_per_video: int | None
    max_frames: int
    world_size: str
    global_batch: str

    def lines(self, recipe: Recipe) -> list[str]:
        g = recipe.model.gaze
        s = recipe.schedule
        unknown = "unknown"
        out = [
            (
                f"vision input:        {self.vision.image_size or unknown} px, patch {self.vision.patch_size or unknown}"
                f" ({self.vision.source})"
            ),
            f"encoder grid:        {_grid(self.encoder_grid)}",
            f"projected grid:      {_grid(self.projected_grid)} ({recipe.model.projector.kind}, pool {recipe.model.visual_pool})",
            (
                f"tokens per image:    {self.tokens_per_image or unknown} "
                f"({self.visual_tokens_per_unit or unknown} visual + {self.context_per_unit} context)"
            ),
            f"tokens per video:    {self.tokens_per_video or unknown} (max_frames {self.max_frames}, {recipe.data.fps} fps)",
        ]
        if g.enabled:
            region = "x".join(str(r) for r in g.region)
            out.append(f"regions per unit:    {self.regions_per_unit or unknown} (region {region})")
            if self.k_target is None:
                out.append("top-k:               all (dense routing; no k schedule)")
            else:
                frac = f"{min(1.0, self.k_target / self.regions_per_unit):.1%}" if self.regions_per_unit else unknown
                out.append(f"top-k:               {self.k_target} per head (one image or frame: {frac} of its regions)")
                if s.span_steps:
                    out.append(f"k schedule:          dense at step {s.start_step}, {s.shape} down to "
                               f"{self.k_target} at step {s.start_step + s.span_steps}")  # fmt: skip
                else:
                    out.append(f"k schedule:          sparse (k={self.k_target}) from step {s.start_step}")
        else:
            out.append("attention:           dense baseline (model.gaze.enabled: false)")
        out += [f"world size:          {self.world_size}", f"global batch:        {self.global_batch}"]
        return out


def _grid(grid: tuple[int, int] | None) -> str:
    return f"{grid[0]}x{grid[1]}" if grid else "unknown"


def derive_shapes(recipe: Recipe) -> DerivedShapes:
    m = recipe.model
    vision = vision_sizes(recipe)
    encoder = projected = None
    visual = regions = None
    if vision.image_size and vision.patch_size:
        side = vision.image_size // vision.patch_size
        encoder = (side, side)
        projected = pooled_grid(projected_grid(m.projector.kind, encoder), m.visual_pool)
        visual = projected[0] * projected[1]
        regions = regions_per_unit(projected, m.gaze.region)
    context = m.num_context
    per_unit = visual + context if visual is not None else None
    t = recipe.trainer
    devices = t.devices if isinstance(t.devices, int) else None
    world = (
        f"{devices * t.num_nodes} ({devices} per node x {t.num_nodes} nodes)"
        if devices
        else f"{t.devices} per node x {t.num_nodes}"
    )
    per_step = recipe.data.batch_size * t.accumulate_grad_batches
    batch = (f"{per_step * devices * t.num_nodes} ({recipe.data.batch_size} per rank x {t.accumulate_grad_batches} "
             f"accumulation x {devices * t.num_nodes} ranks)") if devices else f"{per_step} per rank"  # fmt: skip
    return DerivedShapes(
        vision=vision, encoder_grid=encoder, projected_grid=projected, visual_tokens_per_unit=visual,
        context_per_unit=context, regions_per_unit=regions,
        k_target=resolve_top_k(m.gaze.top_k) if m.gaze.enabled else None,
        tokens_per_image=per_unit, tokens_per_video=per_unit * recipe.data.max_frames if per_unit else None,
        max_frames=recipe.data.max_frames, world_size=world, global_batch=batch,
    )  # fmt: skip
