"""The recipe schema: every dataclass a recipe is validated against, in one module free of torch and Lightning.

    model:      ModelConfig (VisionSpec, ProjectorSpec, LLMSpec, TokenizerSpec, GazeSpec, LookSpec)
    train:      TrainConfig (OptimConfig)
    data:       DataConfig (SourceConfig)
    trainer:    TrainerConfig (StrategyConfig)
    schedule:   KScheduleConfig      checkpoint: CheckpointConfig     logging: LoggingConfig
    demo:       DemoDataConfig       run:        RunConfig

Component names (vision families, projector kinds, gaze implementations, LLM model types) are checked
here against name tables; tests hold the registries in gazelit.models to exactly these names. Loading,
merging and interpolation live in gazelit.recipe; shapes a recipe implies in gazelit.shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def resolve_top_k(value: int | str | None) -> int | None:
    """k from a recipe or the command line: an integer >= 0, or "all" / None for every region."""
    if value is None or (isinstance(value, str) and value.lower() == "all"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"top_k must be an integer or 'all', got {value!r}")
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"top_k must be an integer or 'all', got {value!r}") from None
    if k < 0:
        raise ValueError(f"top_k must be >= 0 or 'all', got {value!r}")
    return k


# A saved model directory (GazeVLM.save_pretrained): the ModelConfig as JSON, the weights as safetensors
MODEL_CONFIG_FILE = "gazelit_config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"

# Component names, checked when a recipe loads (the registries in gazelit.models must hold exactly these)
VISION_FAMILY_NAMES = ("siglip2", "siglip", "clip", "dinov2")
PROJECTOR_KINDS = ("mlp2x_gelu", "conv_mlp2x_gelu")
GAZE_IMPLS = ("auto", "segmented", "flex", "reference")
DECODE_PATHS = ("auto", "torch", "triton")
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
    top_k: Any = "all"  # an integer or "all" in a recipe; an int or None (all) once loaded. The schedule lowers it
    region: list[int] = field(default_factory=lambda: [6, 6, 1])  # rows, cols, frames
    num_context: int = 4
    shared_gqa: bool = False
    impl: str = "auto"  # auto | segmented | flex | reference
    selection: str = "dynamic"  # dynamic (re-selected per generated token) | static (first token's, kept)
    chunk: int = 128  # query rows per masked piece on the CPU path
    decode: str = "auto"  # cached decode: auto (the fused Triton kernels on CUDA, torch on CPU) | torch | triton


@dataclass
class LookSpec:
    """Look spans (GazeVLM): `<look>` + a box in location tokens + ... + `</look>` in the token stream."""

    enabled: bool = False  # the tokenizer gains <look>, </look> and `bins` location tokens
    bias: float = -5.0  # added to visual logits outside the box inside a span: negative (soft) or -inf (hard)
    bins: int = 32  # location bins per side of a unit


@dataclass
class ModelConfig:
    vision: VisionSpec = field(default_factory=VisionSpec)
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    gaze: GazeSpec = field(default_factory=GazeSpec)
    look: LookSpec = field(default_factory=LookSpec)
    visual_pool: int = 1  # average-pool the projected grid by this factor (token-matched dense baseline)

    def validate(self) -> ModelConfig:
        """Check values that types alone cannot; returns self."""
        self.gaze.top_k = resolve_top_k(self.gaze.top_k)  # k is an int or None (all) from here on
        for name, spec in (("vision", self.vision), ("llm", self.llm)):
            if spec.pretrained is None and spec.config is None:
                raise ValueError(f"model.{name}: give `pretrained` (a checkpoint) or `config` (a random init)")
            if spec.pretrained is not None:
                # a checkpoint replaces a recipe's config: `model.llm.pretrained=DIR` on the demo recipe
                # needs no `model.llm.config=null` beside it
                spec.config = None
        for key, what, value, names in (
            ("model.vision.family", "vision family", self.vision.family, VISION_FAMILY_NAMES),
            ("model.projector.kind", "projector kind", self.projector.kind, PROJECTOR_KINDS),
            ("model.gaze.impl", "gaze implementation", self.gaze.impl, GAZE_IMPLS),
            ("model.gaze.selection", "gaze selection", self.gaze.selection, ("dynamic", "static")),
            ("model.gaze.decode", "gaze decode path", self.gaze.decode, DECODE_PATHS),
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
        if min(self.gaze.region) < 1:
            raise ValueError(f"model.gaze.region sizes must be >= 1, got {self.gaze.region}")
        if self.gaze.num_context < 0:
            raise ValueError(f"model.gaze.num_context must be >= 0, got {self.gaze.num_context}")
        if self.visual_pool < 1:
            raise ValueError(f"model.visual_pool must be >= 1, got {self.visual_pool}")
        if isinstance(self.look.bias, str):  # "-inf" from the command line
            self.look.bias = float(self.look.bias)
        if not self.look.bias < 0:
            raise ValueError(f"model.look.bias must be negative or -inf (a hard mask), got {self.look.bias}")
        if not 1 <= self.look.bins <= 1000:
            raise ValueError(f"model.look.bins must be in 1..1000, got {self.look.bins}")
        return self

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
            "look": LookSpec,
        }
        for key, kind in parts.items():
            if key in data:
                data[key] = build(kind, data[key])
        return build(cls, data)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """One shard set written by `gazelit convert`: its directory (or manifest.json) and mixing weight."""

    path: str = ""
    weight: float = 1.0
    name: str = ""  # shown in metrics and sample meta; defaults to the directory name


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)
    test_sources: list[SourceConfig] = field(default_factory=list)

    batch_size: int = 8  # per rank
    val_batch_size: int | None = None  # defaults to batch_size
    num_workers: int = 4
    prefetch_factor: int = 2
    pin_memory: bool = False

    # epoch length: steps_per_epoch (batches per rank) if set, else samples_per_epoch, else the total
    # number of samples of all training sources; either way every rank yields the same number of batches
    samples_per_epoch: int | None = None
    steps_per_epoch: int | None = None

    max_length: int = 2048
    system_prompt: str | None = "You are a helpful assistant."
    pad_to_multiple_of: int = 1
    # batches padded to the smallest bucket that holds them (compiled FlexAttention compiles once per
    # bucket instead of once per length); [] pads to the longest sample (rounded to pad_to_multiple_of)
    length_buckets: list[int] = field(default_factory=list)

    max_frames: int = 32
    fps: float = 1.0  # video frames sampled per second
    frames_fps: float = 1.0  # frame rate assumed for frame folders whose shards do not say

    seed: int = 0
    shuffle_buffer: int = 1000  # samples (with their media bytes) held per worker and source
    shuffle_window_shards: int = 4  # shards read together and shuffled; bounds the cost of resuming

    max_skip_fraction: float = 0.05  # per worker and per rank over the whole run; >= 1 disables the guard
    skip_check_min_samples: int = 200  # the fraction applies to at least this many draws (early tolerance)

    # shards are checked against the manifest at start: "size" (default), "hash" (sha256, reads every
    # shard once), or "none"; damaged shards are refused ("refuse") or left out and counted as lost ("skip")
    verify: str = "size"
    damaged_shards: str = "refuse"

    def __post_init__(self):
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"data.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.damaged_shards not in DAMAGED_SHARD_POLICIES:
            raise ValueError(f"data.damaged_shards must be one of {DAMAGED_SHARD_POLICIES}, got {self.damaged_shards!r}")


VERIFY_MODES = ("size", "hash", "none")
DAMAGED_SHARD_POLICIES = ("refuse", "skip")


# ---------------------------------------------------------------------------------------------- training
@dataclass
class OptimConfig:
    lr_projector: float = 1e-3
    lr_llm: float = 2e-5
    lr_vision: float = 2e-6
    lr_context: float | None = None  # default: lr_projector
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # of the total optimiser steps (ignored when warmup_steps is set)
    warmup_steps: int | None = None
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    fused: bool | None = None  # torch AdamW fused kernels (None: torch decides)

    def validate(self) -> OptimConfig:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        return self


STAGES = ("align", "finetune", "grpo")


@dataclass
class GRPOConfig:
    """`train.stage: grpo` (gazelit.models.grpo): sampled groups per prompt, rewarded and compared."""

    group: int = 4  # completions sampled per prompt
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    iterations: int = 1  # optimiser steps on one batch of samples (the clip binds from the second on)
    clip: float = 0.2  # policy ratio clipped to [1 - clip, 1 + clip]
    kl: float = 0.0  # weight of the KL term to a frozen copy of the starting policy (0: no reference kept)
    reward_format: float = 0.25  # well-formed, closed look spans (models with model.look)
    reward_iou: float = 0.5  # IoU of the first look's box with the data's box (models with model.look)
    reward_answer: float = 1.0  # exact answer


@dataclass
class TrainConfig:
    stage: str = "finetune"  # align | finetune | grpo
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def validate(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ValueError(f"train.stage must be one of {STAGES}, got {self.stage!r}")
        self.optim.validate()
        g = self.grpo
        for key, ok, want in (("group", g.group >= 2, ">= 2"), ("max_new_tokens", g.max_new_tokens >= 1, ">= 1"),
                              ("temperature", g.temperature > 0, "> 0"), ("top_p", 0 < g.top_p <= 1, "in (0, 1]"),
                              ("iterations", g.iterations >= 1, ">= 1"), ("clip", g.clip > 0, "> 0"),
                              ("kl", g.kl >= 0, ">= 0")):  # fmt: skip
            if not ok:
                raise ValueError(f"train.grpo.{key} must be {want}, got {getattr(g, key)!r}")
        return self


# ---------------------------------------------------------------------------------------------- run
@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | single | ddp | fsdp2 (ModelParallelStrategy)
    activation_checkpointing: bool = False  # per decoder layer and vision block
    param_dtype: str | None = None  # fsdp2 mixed precision, e.g. bfloat16 (reductions stay float32)
    reshard_after_forward: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # passed to the Lightning strategy


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"  # an int, a list, or "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 1000
    val_check_interval: int | None = None  # optimiser steps between validations (None: end of epoch)
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    torch_threads: int | None = None  # intra-op CPU threads per process (None: torch's default)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


@dataclass
class KScheduleConfig:
    """Progressive k: dense (every region) until `start_step`, then down to model.gaze.top_k over
    `span_steps` optimiser steps; never increasing. span_steps 0: the target k from `start_step` on."""

    start_step: int = 0
    span_steps: int = 0
    shape: str = "linear"  # linear | cosine | step
    steps: int = 4  # plateaus of the step shape


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500
    keep_last: int = 3
    export_final: bool = True  # also write a GazeVLM.save_pretrained directory at the end of fit


@dataclass
class LoggingConfig:
    routing_image_every_n_steps: int = 100  # 0: never
    routing_max_new_tokens: int = 8  # tokens generated (and drawn) for the routing picture
    tensorboard: bool = True


@dataclass
class DemoDataConfig:
    """Generate the demo data set (datamodules.demo_data) into `out` when it is not there yet."""

    out: str = "data/demo"
    train: int = 2000
    val: int = 200
    test: int = 200
    image_size: int = 64
    grid: int = 4
    max_objects: int = 4
    min_objects: int = 2
    colours: int = 5  # distinct colours drawn from (each at most once per board); up to 8
    train_questions: int = 1  # question turns per training image (val/test images have one)
    tasks: list[str] = field(default_factory=lambda: ["colour_at", "shape_of", "locate"])
    video_fraction: float = 0.0
    seed: int = 0
    shard_size: int = 50  # samples per shard: several shards per split, so every rank gets some


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "runs"  # the run directory is root/name


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    schedule: KScheduleConfig = field(default_factory=KScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoDataConfig | None = None
    resume: str | None = None  # "auto" (newest checkpoint of the run) or a checkpoint path
    init_from: str | None = None  # weights only (e.g. stage 2 from stage 1): a checkpoint or model dir
    seed: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name
