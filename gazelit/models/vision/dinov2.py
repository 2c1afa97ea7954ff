"""DINOv2 vision tower, with or without registers, through transformers' Dinov2Model /
Dinov2WithRegistersModel.

The sequence is [CLS, registers..., patches]; CLS and the registers take part in attention and are
dropped from the output. Which model is built follows the config: `model_type: dinov2_with_registers`
(or a `num_register_tokens` field in a `config:` mapping) selects the registers variant. The position
table is always interpolated to the input grid, so any resolution works; the checkpoints' config says
518 px (37 x 37 tokens): pass `options={"image_size": 378}` for 27 x 27 as Cambrian does.
Standard preprocessing: bicubic resize, ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn
from transformers import (
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gazelit.models.vision.base import VisionEncoder


class Dinov2VisionEncoder(VisionEncoder):
    """DINOv2 ViT tower: one CLS token and `num_register_tokens` registers before the patch tokens."""

    family: ClassVar[str] = "dinov2"
    default_checkpoint: ClassVar[str] = "facebook/dinov2-large"
    config_class = Dinov2Config
    processor_class = BitImageProcessorPil
    image_mean = tuple(IMAGENET_DEFAULT_MEAN)
    image_std = tuple(IMAGENET_DEFAULT_STD)
    model_types = ("dinov2", "dinov2_with_registers")
    unused_modules = ("layernorm",)

    @classmethod
    def common_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """DINOv2 sizes its MLP by `mlp_ratio`; `intermediate_size` (the other families' name) maps onto it."""
        if "intermediate_size" in fields:
            intermediate = fields.pop("intermediate_size")
            hidden = fields.get("hidden_size", Dinov2Config().hidden_size)
            if intermediate % hidden:
                raise ValueError(f"dinov2: intermediate_size {intermediate} must be a multiple of hidden_size "
                                 f"{hidden} (DINOv2 sets its MLP width as hidden_size x mlp_ratio)")  # fmt: skip
            fields.setdefault("mlp_ratio", intermediate // hidden)
        return fields

    @classmethod
    def config_class_for(cls, mapping: Mapping[str, Any]) -> type[PretrainedConfig]:
        registers = mapping.get("model_type") == "dinov2_with_registers" or "num_register_tokens" in mapping
        return Dinov2WithRegistersConfig if registers else Dinov2Config

    @classmethod
    def model_class(cls, config: PretrainedConfig) -> type[PreTrainedModel]:
        return Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model

    @staticmethod
    def _block_list(model: PreTrainedModel) -> nn.ModuleList:
        return model.encoder.layer

    def _drop_unused_parameters(self, model: PreTrainedModel) -> None:
        # The mask token is only used for masked-image pretraining (bool_masked_pos), never here.
        model.embeddings.mask_token = None

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + getattr(self.model.config, "num_register_tokens", 0)

    def _embed(self, pixel_values: Tensor) -> Tensor:
        return self.model.embeddings(pixel_values)
