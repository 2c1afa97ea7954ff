"""Shapes a recipe implies, worked out without building the model or downloading anything.

For `gazelit validate`: visual tokens per image / frame, regions per unit, the k schedule's endpoints,
the attended visual fraction at the target k, tokens per image and per video, the global batch size.

The vision tower's image and patch size come from, in order: `model.vision.options.image_size` and the
`config:` mapping (with the transformers config class's defaults), a local copy of the checkpoint's config
(`local_files_only`: the Hugging Face cache or a local directory, never the network), or the checkpoint
name (`...-patch16-384`). If none says, the sizes are reported as unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from gazelit.recipe import Recipe

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
        from gazelit.models.vision import vision_family

        config = vision_family(spec.family).config_class_for(spec.config)(**{k: v for k, v in spec.config.items()
                                                                              if k != "model_type"})  # fmt: skip
        return VisionSizes(override or _side(config.image_size), _side(config.patch_size), "model.vision.config")
    local = _local_config(spec.pretrained, spec.options or {})
    if local is not None:
        return VisionSizes(override or _side(local.image_size), _side(local.patch_size), "local checkpoint config")
    match = _NAME_SIZES.search(spec.pretrained or "")
    if match:
        return VisionSizes(override or int(match.group(2)), int(match.group(1)), f"checkpoint name {spec.pretrained}")
    return VisionSizes(override, None, f"unknown: {spec.pretrained} is not available offline")


def _side(value: Any) -> int:
    return int(value if isinstance(value, int) else value[0])


def _local_config(pretrained: str | None, options: dict[str, Any]) -> Any:
    if not pretrained:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, local_files_only=True,
                                            trust_remote_code=bool(options.get("trust_remote_code", False)))  # fmt: skip
    except (OSError, ValueError):  # not cached / not a directory / not a known config: the caller falls back
        return None
    return getattr(config, "vision_config", config)


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
    from gazelit.attention import parse_top_k
    from gazelit.models.projectors import PROJECTORS

    m = recipe.model
    vision = vision_sizes(recipe)
    encoder = projected = None
    visual = regions = None
    if vision.image_size and vision.patch_size:
        side = vision.image_size // vision.patch_size
        encoder = (side, side)
        rows, cols = PROJECTORS[m.projector.kind](1, 1).output_grid(encoder)
        projected = (math.ceil(rows / m.visual_pool), math.ceil(cols / m.visual_pool))
        visual = projected[0] * projected[1]
        region = m.region_shape()
        regions = math.ceil(projected[0] / region.h) * math.ceil(projected[1] / region.w)
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
        k_target=parse_top_k(m.gaze.top_k) if m.gaze.enabled else None,
        tokens_per_image=per_unit, tokens_per_video=per_unit * recipe.data.max_frames if per_unit else None,
        max_frames=recipe.data.max_frames, world_size=world, global_batch=batch,
    )  # fmt: skip
