"""Typed configuration of a GazeVLM: which backbones, which projector, and how Gaze Attention is set.

These dataclasses are the `model:` section of a recipe (validated by omegaconf against these types) and
what `GazeVLM.save_pretrained` writes to gazelit_config.json. Components are named, never code: swapping
SigLIP2 for CLIP is `vision.family: clip`; backbone-specific settings go in the free `options` mapping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gazelit.attention import RegionShape, parse_top_k


# Component names, checked when a recipe loads (the registries in gazelit.models must hold exactly these)
VISION_FAMILY_NAMES = ("siglip2", "siglip", "clip", "dinov2")
PROJECTOR_KINDS = ("mlp2x_gelu", "conv_mlp2x_gelu")
GAZE_IMPLS = ("auto", "segmented", "flex", "reference")
LLM_MODEL_TYPES = ("qwen3", "qwen2", "llama")  # decoders whose attention modules the gaze backend is tested on


@dataclass
class VisionSpec:
    family: str = "siglip2"  # siglip2 | siglip | clip | dinov2
    pretrained: str | None = None  # hub id or local directory
    config: dict[str, Any] | None = None  # config fields for a random init (tests, demo)
    feature_layer: int = -2
    trainable: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProjectorSpec:
    kind: str = "mlp2x_gelu"  # mlp2x_gelu | conv_mlp2x_gelu (4x token compression)


@dataclass
class LLMSpec:
    pretrained: str | None = None
    config: dict[str, Any] | None = None  # must hold model_type, e.g. qwen3 / qwen2 / llama
    dtype: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerSpec:
    pretrained: str | None = None  # default: the LLM's `pretrained`
    tiny_corpus: str | None = None  # a text file: train a tiny BPE tokenizer on it (config-built LLMs)
    vocab_size: int = 512


@dataclass
class GazeSpec:
    enabled: bool = True  # False: the dense baseline (the LLM's own attention, no context tokens)
    top_k: Any = "all"  # an integer or "all"; the training schedule lowers it
    region: list[int] = field(default_factory=lambda: [6, 6, 1])  # rows, cols, frames
    num_context: int = 4
    shared_gqa: bool = False
    impl: str = "auto"  # auto | segmented | flex | reference
    chunk: int = 128  # query rows per masked piece on the CPU path


@dataclass
class ModelConfig:
    vision: VisionSpec = field(default_factory=VisionSpec)
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    gaze: GazeSpec = field(default_factory=GazeSpec)
    visual_pool: int = 1  # average-pool the projected grid by this factor (token-matched dense baseline)

    def validate(self) -> ModelConfig:
        """Check values that types alone cannot; returns self."""
        parse_top_k(self.gaze.top_k)
        for key, what, value, names in (
            ("model.vision.family", "vision family", self.vision.family, VISION_FAMILY_NAMES),
            ("model.projector.kind", "projector kind", self.projector.kind, PROJECTOR_KINDS),
            ("model.gaze.impl", "gaze implementation", self.gaze.impl, GAZE_IMPLS),
        ):
            if value not in names:
                raise ValueError(f"{key}: unknown {what} {value!r}; choose one of {', '.join(names)}")
        model_type = (self.llm.config or {}).get("model_type")
        if self.llm.config is not None and model_type not in LLM_MODEL_TYPES:
            raise ValueError(
                f"model.llm.config.model_type: unknown {model_type!r}; the gaze backend supports "
                f"{', '.join(LLM_MODEL_TYPES)}"
            )
        if len(self.gaze.region) not in (2, 3):
            raise ValueError(f"model.gaze.region must be [rows, cols] or [rows, cols, frames], got {self.gaze.region}")
        self.region_shape()
        if self.gaze.num_context < 0:
            raise ValueError(f"model.gaze.num_context must be >= 0, got {self.gaze.num_context}")
        if self.visual_pool < 1:
            raise ValueError(f"model.visual_pool must be >= 1, got {self.visual_pool}")
        for name, spec in (("vision", self.vision), ("llm", self.llm)):
            if (spec.pretrained is None) == (spec.config is None):
                raise ValueError(f"model.{name}: give exactly one of `pretrained` and `config`")
        return self

    def region_shape(self) -> RegionShape:
        return RegionShape(*self.gaze.region)

    @property
    def num_context(self) -> int:
        """Context tokens per unit as the model builds them (none for the dense baseline)."""
        return self.gaze.num_context if self.gaze.enabled else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"unknown {kind.__name__} field(s) {unknown}")
            return kind(**values)

        data = dict(data)
        parts = {
            "vision": VisionSpec,
            "projector": ProjectorSpec,
            "llm": LLMSpec,
            "tokenizer": TokenizerSpec,
            "gaze": GazeSpec,
        }
        for key, kind in parts.items():
            if key in data:
                data[key] = build(kind, data[key])
        return build(cls, data)
