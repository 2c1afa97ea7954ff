"""CLIP vision tower, through transformers' CLIPVisionModel.

The sequence is [CLS, patches]; CLS takes part in attention and is dropped from the output. The
features are the raw block outputs (LLaVA's `hidden_states[-2][:, 1:]`); `post_layernorm` only normalises
the pooled CLS and is removed. Standard preprocessing: bicubic resize, OpenAI CLIP mean/std.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, PretrainedConfig, PreTrainedModel
from transformers import CLIPVisionModel as HFCLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from gazelit.models.vision.base import VisionEncoder


class CLIPVisionEncoder(VisionEncoder):
    """CLIP ViT tower: one CLS token before the patch tokens."""

    family: ClassVar[str] = "clip"
    default_checkpoint: ClassVar[str] = "openai/clip-vit-large-patch14-336"
    config_class = CLIPVisionConfig
    processor_class = CLIPImageProcessorPil
    image_mean = tuple(OPENAI_CLIP_MEAN)
    image_std = tuple(OPENAI_CLIP_STD)
    model_types = ("clip_vision_model",)
    unused_modules = ("post_layernorm",)

    @classmethod
    def model_class(cls, config: PretrainedConfig) -> type[PreTrainedModel]:
        return HFCLIPVisionModel

    @staticmethod
    def _block_list(model: PreTrainedModel) -> nn.ModuleList:
        return model.encoder.layers

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def _embed(self, pixel_values: Tensor) -> Tensor:
        native = self.model.embeddings.image_size
        resize = tuple(pixel_values.shape[-2:]) != (native, native)
        return self.model.pre_layrnorm(self.model.embeddings(pixel_values, interpolate_pos_encoding=resize))
