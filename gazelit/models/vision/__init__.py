"""Vision encoders: one file per family behind the `VisionEncoder` interface, and the registry.

    encoder = build_vision_encoder("siglip2", pretrained="google/siglip2-so400m-patch16-384")
    features = encoder(pixel_values)              # (N, 24*24, 1152) from the penultimate layer
    to_tensor = encoder.preprocessor()            # PIL.Image -> (3, 384, 384), picklable
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gazelit.models._hf import exactly_one_source
from gazelit.models.vision.base import ImagePreprocessor, VisionEncoder, expand2square
from gazelit.models.vision.clip import CLIPVisionEncoder
from gazelit.models.vision.dinov2 import Dinov2VisionEncoder
from gazelit.models.vision.siglip import Siglip2VisionEncoder, SiglipVisionEncoder

__all__ = [
    "DEFAULT_VISION_FAMILY",
    "VISION_FAMILIES",
    "ImagePreprocessor",
    "VisionEncoder",
    "build_vision_encoder",
    "expand2square",
]

VISION_FAMILIES: dict[str, type[VisionEncoder]] = {
    cls.family: cls
    for cls in (CLIPVisionEncoder, Dinov2VisionEncoder, SiglipVisionEncoder, Siglip2VisionEncoder)
}
DEFAULT_VISION_FAMILY = "siglip2"


def vision_family(family: str) -> type[VisionEncoder]:
    """The encoder class registered under `family`; unknown names list the valid ones."""
    try:
        return VISION_FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"unknown vision family {family!r}; choose one of {', '.join(sorted(VISION_FAMILIES))}"
        ) from None


def build_vision_encoder(
    family: str,
    *,
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    feature_layer: int = -2,
    trainable: bool = False,
    options: Mapping[str, Any] | None = None,
    empty: bool = False,
) -> VisionEncoder:
    """Build a vision encoder of `family` from a checkpoint (`pretrained`: hub id or local directory) or
    from config fields (`config`: random init); exactly one of the two.

    `feature_layer` indexes the hidden states (0 = embeddings, -1 = last block, default -2); blocks after
    it are not kept. The encoder is frozen unless `trainable`. `options`: image_size, pad_to_square,
    attn_implementation, dtype, trust_remote_code, revision (see `base.VISION_OPTIONS`). `empty` (with
    `pretrained`): parameters on the meta device, weights read later (`gazelit.models.sharded_loading`).
    """
    cls = vision_family(family)
    exactly_one_source(pretrained, config, f"build_vision_encoder({family!r})")
    common = {"feature_layer": feature_layer, "trainable": trainable, "options": options}
    if pretrained is not None:
        return cls.from_pretrained(pretrained, empty=empty, **common)
    return cls.from_config(config, **common)
