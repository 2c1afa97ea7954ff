"""SigLIP and SigLIP2 (fixed resolution) vision towers, through transformers' SiglipVisionModel.

Both families share the architecture: no CLS token, a learned position table for a square grid, and a
final norm and attention-pooling head that the patch features never pass through (removed here). They
differ in the recipes' default checkpoint. Fixed-resolution SigLIP2 checkpoints such as
google/siglip2-so400m-patch16-384 (384 px / 16 = 24 x 24 = 576 tokens) are `model_type: siglip`; the
NaFlex variable-resolution ones (`model_type: siglip2`, Siglip2VisionModel) are not supported.

A real checkpoint brings its own preprocessor config; for a config-built (random) tower the standard
SigLIP preprocessing is used: bicubic resize, mean = std = 0.5.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel, SiglipImageProcessorPil, SiglipVisionConfig
from transformers import SiglipVisionModel as HFSiglipVisionModel
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from gazelit.models.vision.base import VisionEncoder

_NAFLEX_HINT = (
    "that is SigLIP2 NaFlex (variable resolution, Siglip2VisionModel), which gazelit does not support; "
    "use a fixed-resolution checkpoint such as google/siglip2-so400m-patch16-384 (model_type 'siglip')"
)


class SiglipVisionEncoder(VisionEncoder):
    """SigLIP vision tower: all tokens are patch tokens."""

    family: ClassVar[str] = "siglip"
    default_checkpoint: ClassVar[str] = "google/siglip-so400m-patch14-384"
    config_class = SiglipVisionConfig
    processor_class = SiglipImageProcessorPil
    image_mean = tuple(IMAGENET_STANDARD_MEAN)
    image_std = tuple(IMAGENET_STANDARD_STD)
    model_types = ("siglip_vision_model",)
    unused_modules = ("post_layernorm", "head")
    model_type_hints = {"siglip2_vision_model": _NAFLEX_HINT, "siglip2": _NAFLEX_HINT}

    @classmethod
    def model_class(cls, config: PretrainedConfig) -> type[PreTrainedModel]:
        return HFSiglipVisionModel

    @staticmethod
    def _block_list(model: PreTrainedModel) -> nn.ModuleList:
        return model.encoder.layers

    def _embed(self, pixel_values: Tensor) -> Tensor:
        native = self.model.embeddings.image_size
        resize = tuple(pixel_values.shape[-2:]) != (native, native)
        return self.model.embeddings(pixel_values, interpolate_pos_encoding=resize)


class Siglip2VisionEncoder(SiglipVisionEncoder):
    """SigLIP2 fixed-resolution tower (the gazelit default): same model class as SigLIP."""

    family: ClassVar[str] = "siglip2"
    default_checkpoint: ClassVar[str] = "google/siglip2-so400m-patch16-384"
