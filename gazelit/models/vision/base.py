"""The interface every vision encoder family implements, and the image preprocessing they share.

A `VisionEncoder` wraps one transformers vision tower and returns patch features from a chosen hidden
layer (default -2, the penultimate, as LLaVA and Cambrian do) in raster order, without CLS or register
tokens. The transformer blocks after the feature layer are removed when the encoder is built, along with
the final norm and pooling head: they never contribute to the features, so the result is identical to
`model(pixel_values, output_hidden_states=True).hidden_states[feature_layer]` (minus the prefix tokens)
at a fraction of the compute and memory, and no unused parameter reaches the optimiser or DDP.

A family subclass says which transformers classes it uses (`config_class`, `model_class`, the PIL image
processor and its mean/std), where the blocks live (`_block_list`), and how pixels become the token
sequence the blocks consume (`_embed`). Everything else (loading, truncation, freezing, preprocessing)
lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from gazelit.models._hf import check_options, checkpoint_dtype, resolve_dtype
from gazelit.models.sharded_loading import parameters_on_meta

log = logging.getLogger(__name__)

# Options accepted by every family (name -> default).
VISION_OPTIONS: dict[str, Any] = {
    "image_size": None,  # input resolution; None: the checkpoint's / config's image_size
    "pad_to_square": True,  # LLaVA "pad": keep the aspect ratio, fill with the mean colour
    "attn_implementation": "sdpa",
    "dtype": None,  # None: transformers' default (checkpoint dtype for pretrained, float32 for config)
    "trust_remote_code": False,  # only consulted by AutoConfig / AutoImageProcessor
    "revision": None,
}


class NoBlocks(nn.Module):
    """The block class of a tower without transformer blocks: nothing is an instance of it, so there is
    nothing to shard or checkpoint per block."""


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad `image` to a square, centred, filling the new area with `background` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@dataclass
class ImagePreprocessor:
    """PIL image -> normalised float tensor (3, image_size, image_size) for one vision encoder.

    Pads to square with the mean colour (when `pad_to_square`), then runs a transformers image processor
    (PIL backend) set to resize straight to `image_size` x `image_size`, rescale and normalise. It holds
    only plain data and that processor, so it pickles: build it once and ship it to DataLoader workers.
    """

    processor: BaseImageProcessor
    image_size: int
    pad_to_square: bool = True

    @property
    def background(self) -> tuple[int, int, int]:
        """The padding colour: the normalisation mean in 0..255 (so padding normalises to about 0)."""
        return tuple(int(m * 255) for m in self.processor.image_mean)  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("RGB")
        if self.pad_to_square:
            image = expand2square(image, self.background)
        pixels = self.processor(image, return_tensors="pt")["pixel_values"][0]
        return pixels.to(torch.float32)


def _square(size: int | tuple[int, ...] | list[int], what: str) -> int:
    """An int from a config's image/patch size, which may be written as a pair; only squares are supported."""
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ValueError(f"only square {what} is supported, got {size}")


def _layers_to_keep(feature_layer: int, num_layers: int) -> int:
    """How many blocks produce hidden_states[feature_layer] (hidden_states[0] is the embedding output)."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"feature_layer {feature_layer} out of range for a {num_layers}-layer encoder "
            f"(valid: {-(num_layers + 1)}..{num_layers}, indexing hidden_states of length {num_layers + 1})"
        )
    return feature_layer % (num_layers + 1)


class VisionEncoder(nn.Module):
    """A frozen-by-default vision tower returning (N, rows*cols, hidden_size) patch features.

    Frozen (`trainable=False`, the default): every parameter has requires_grad False, `forward` runs
    without building an autograd graph, and the tower stays in eval mode even when a parent module is put
    in train mode (so dropout / drop-path never fire, and features do not depend on the training flag).
    Trainable: ordinary train/eval behaviour and gradients. Switch with `set_trainable`.
    """

    family: ClassVar[str]
    default_checkpoint: ClassVar[str]  # what recipes use for this family; never loaded implicitly
    config_class: ClassVar[type[PretrainedConfig]]
    processor_class: ClassVar[type[BaseImageProcessor]]
    image_mean: ClassVar[tuple[float, float, float]]
    image_std: ClassVar[tuple[float, float, float]]
    model_types: ClassVar[tuple[str, ...]]  # accepted `model_type` of the (vision) config
    unused_modules: ClassVar[tuple[str, ...]] = ()  # attributes of the model off the feature path
    model_type_hints: ClassVar[dict[str, str]] = {}  # model_type -> advice when it is rejected

    hidden_size: int
    image_size: int
    patch_size: int

    def __init__(
        self,
        model: PreTrainedModel,
        processor: BaseImageProcessor,
        *,
        feature_layer: int = -2,
        trainable: bool = False,
        image_size: int | None = None,
        pad_to_square: bool = True,
    ) -> None:
        """Wrap a built transformers model of this family; its unused blocks and heads are removed in place."""
        super().__init__()
        config = model.config
        self.hidden_size = config.hidden_size
        self.patch_size = _square(config.patch_size, "patch_size")
        self.image_size = image_size or _square(config.image_size, "image_size")
        self.feature_layer = feature_layer

        blocks = self._block_list(model)
        # a tower saved at feature_layer 0 has no blocks left (only the patch embedding)
        self._block_class = type(blocks[0]) if len(blocks) else NoBlocks
        keep = _layers_to_keep(feature_layer, len(blocks))
        del blocks[keep:]
        # Keep the config truthful about the weights it now describes.
        config.num_hidden_layers = keep
        for name in self.unused_modules:
            if getattr(model, name, None) is not None:
                setattr(model, name, nn.Identity())
        self._drop_unused_parameters(model)

        self.model = model
        self._preprocessor = ImagePreprocessor(processor, self.image_size, pad_to_square)
        self.set_trainable(trainable)

    # ---- what a family provides -------------------------------------------------------------------

    @staticmethod
    def _block_list(model: PreTrainedModel) -> nn.ModuleList:
        """The ModuleList of transformer blocks inside `model`."""
        raise NotImplementedError

    def _embed(self, pixel_values: Tensor) -> Tensor:
        """Pixels -> the token sequence the first block consumes (prefix tokens included)."""
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the sequence (CLS, registers), dropped from the output."""
        return 0

    @classmethod
    def model_class(cls, config: PretrainedConfig) -> type[PreTrainedModel]:
        """The transformers model class for a (vision) config of this family."""
        raise NotImplementedError

    @classmethod
    def config_class_for(cls, mapping: Mapping[str, Any]) -> type[PretrainedConfig]:
        """The config class for a `config:` mapping (families with variants override this)."""
        return cls.config_class

    def _drop_unused_parameters(self, model: PreTrainedModel) -> None:
        """Remove parameters that are not on the feature path and are not a module of their own."""

    # ---- the interface ------------------------------------------------------------------------------

    def token_grid(self, image_size: int | None = None) -> tuple[int, int]:
        """(rows, cols) of patch tokens for a square input of `image_size` (default: self.image_size)."""
        side = (image_size or self.image_size) // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        """Patch tokens per image at `image_size`."""
        rows, cols = self.token_grid()
        return rows * cols

    @property
    def block_class(self) -> type[nn.Module]:
        """The transformer block class, for FSDP auto-wrapping and activation checkpointing."""
        return self._block_class

    def preprocessor(self) -> ImagePreprocessor:
        """The picklable PIL -> (3, image_size, image_size) preprocessing that matches this encoder."""
        return self._preprocessor

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, rows*cols, hidden_size) features of the feature layer, raster order."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (N, 3, H, W), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:  # a batch without images; HF attention cannot reshape 0 elements
            tokens = (pixel_values.shape[-2] // self.patch_size) * (pixel_values.shape[-1] // self.patch_size)
            weight = next(self.model.parameters())
            return weight.new_zeros(0, tokens, self.hidden_size)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self._embed(pixel_values)
            for block in self._block_list(self.model):
                hidden = block(hidden, None)  # positional: required by HF's gradient checkpointing
        return hidden[:, self.num_prefix_tokens :]

    def set_trainable(self, trainable: bool) -> None:
        """Freeze (requires_grad False, eval mode kept) or unfreeze the whole tower."""
        self.trainable = trainable
        self.model.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def extra_repr(self) -> str:
        rows, cols = self.token_grid()
        return (
            f"family={self.family!r}, image_size={self.image_size}, grid={rows}x{cols}, "
            f"feature_layer={self.feature_layer}, trainable={self.trainable}"
        )

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def check_model_type(cls, model_type: str) -> None:
        """Reject a config of another family (or an unsupported variant) with a message saying why."""
        if model_type not in cls.model_types:
            hint = cls.model_type_hints.get(model_type, "")
            raise ValueError(
                f"vision family {cls.family!r} expects model_type in {list(cls.model_types)}, "
                f"got {model_type!r}{'; ' + hint if hint else ''}"
            )

    @classmethod
    def common_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Translate the ViT fields every family understands (hidden_size, intermediate_size, layers, heads,
        image_size, patch_size) into this family's names, so a recipe swaps families with one key."""
        return fields

    @classmethod
    def config_from_mapping(cls, mapping: Mapping[str, Any]) -> PretrainedConfig:
        """A config from plain fields; unknown field names are an error (transformers would keep them)."""
        fields = cls.common_fields(dict(mapping))
        config_cls = cls.config_class_for(fields)
        model_type = fields.pop("model_type", config_cls.model_type)
        cls.check_model_type(model_type)
        if model_type != config_cls.model_type:
            raise ValueError(f"model_type {model_type!r} contradicts the other fields ({config_cls.__name__})")
        unknown = sorted(set(fields) - set(config_cls().to_dict()))
        if unknown:
            raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown} in the {cls.family} vision config")
        return config_cls(**fields)

    @classmethod
    def default_processor(cls, image_size: int) -> BaseImageProcessor:
        """The family's standard preprocessing (mean/std, resampling) resizing to `image_size`."""
        return cls.processor_class(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=list(cls.image_mean),
            image_std=list(cls.image_std),
        )

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        feature_layer: int = -2,
        trainable: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> VisionEncoder:
        """A randomly initialised encoder from config fields (tests, demos, benchmarks)."""
        opts = check_options(options, VISION_OPTIONS, f"{cls.family} vision")
        hf_config = cls.config_from_mapping(config)
        extra: dict[str, Any] = {"attn_implementation": opts["attn_implementation"]}
        if (dtype := resolve_dtype(opts["dtype"])) is not None:
            extra["dtype"] = dtype
        model = AutoModel.from_config(hf_config, **extra)
        expected = cls.model_class(hf_config)
        if type(model) is not expected:  # the auto mapping is transformers' business; make sure
            raise TypeError(f"AutoModel built {type(model).__name__} for {cls.family}, expected {expected.__name__}")
        image_size = opts["image_size"] or _square(hf_config.image_size, "image_size")
        return cls(
            model,
            cls.default_processor(image_size),
            feature_layer=feature_layer,
            trainable=trainable,
            image_size=image_size,
            pad_to_square=opts["pad_to_square"],
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        feature_layer: int = -2,
        trainable: bool = False,
        options: Mapping[str, Any] | None = None,
        empty: bool = False,
    ) -> VisionEncoder:
        """Load the vision tower (and its image processor) from a hub id or a local directory.

        A full image-text checkpoint (SigLIP, CLIP) works too: only its vision tower is loaded. A checkpoint
        that lacks some of the tower's weights is an error rather than a silently random-initialised tower.
        `empty`: build the tower with parameters on the meta device and read no weights (they are read
        after sharding, by `gazelit.models.sharded_loading`).
        """
        opts = check_options(options, VISION_OPTIONS, f"{cls.family} vision")
        hub: dict[str, Any] = {"revision": opts["revision"]} if opts["revision"] else {}
        hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=opts["trust_remote_code"], **hub)
        vision_config = getattr(hf_config, "vision_config", None)
        vision_config = hf_config if vision_config is None else vision_config
        cls.check_model_type(vision_config.model_type)

        load: dict[str, Any] = {"attn_implementation": opts["attn_implementation"], **hub}
        load["dtype"] = resolve_dtype(opts["dtype"]) or "auto"  # None: the checkpoint's dtype
        if empty:
            load["dtype"] = checkpoint_dtype(hf_config, load["dtype"])
            with parameters_on_meta():
                model = cls.model_class(vision_config)._from_config(
                    vision_config, attn_implementation=load["attn_implementation"], dtype=load["dtype"]
                )
        else:
            model, info = cls.model_class(vision_config).from_pretrained(pretrained, output_loading_info=True, **load)
            bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
            if bad:
                raise ValueError(f"{pretrained}: the checkpoint does not hold these {cls.family} weights: {bad[:8]}")

        image_size = opts["image_size"] or _square(model.config.image_size, "image_size")
        return cls(
            model,
            cls._load_processor(pretrained, image_size, opts["trust_remote_code"], hub),
            feature_layer=feature_layer,
            trainable=trainable,
            image_size=image_size,
            pad_to_square=opts["pad_to_square"],
        )

    @classmethod
    def _load_processor(
        cls, pretrained: str, image_size: int, trust_remote_code: bool, hub: Mapping[str, Any]
    ) -> BaseImageProcessor:
        """The checkpoint's image processor (PIL backend), set to resize straight to `image_size`.

        Resizing the mean-padded square image straight to image_size equals the processors' usual
        shortest-edge resize + centre crop of the same size, and it holds for any `image_size` override.
        A local directory without a preprocessor config falls back to the family's standard one.
        """
        try:
            return AutoImageProcessor.from_pretrained(
                pretrained,
                backend="pil",
                size={"height": image_size, "width": image_size},
                do_center_crop=False,
                trust_remote_code=trust_remote_code,
                **hub,
            )
        except OSError:
            if not Path(pretrained).is_dir():
                raise
            log.warning(
                "%s has no image processor config; using the standard %s preprocessing (mean %s, std %s)",
                pretrained,
                cls.family,
                cls.image_mean,
                cls.image_std,
            )
            return cls.default_processor(image_size)
