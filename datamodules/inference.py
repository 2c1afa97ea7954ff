"""Prompt -> left-padded generation batch (gazelit.batch contract), and reading media for inference.

A `Prompt` is a user message with images (each one visual unit) or the frames of one video (one unit per
frame), and an optional system prompt. `PromptEncoder` renders it with the tokenizer's chat template and
the generation prompt (`add_generation_prompt=True`, no assistant turn), expands the `<image>`
placeholder into VISUAL + CONTEXT positions exactly as `ChatEncoder` does for training (same placeholder
rules, same unit length), and collates with `Collator`; the right-padded result is then shifted to left
padding, which generation needs (every prompt ends at the last column).

`load_video_frames` / `load_frames_dir` pick frames with the training pipeline's frame sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gazelit.datamodules import media
from gazelit.datamodules.chat import ChatEncoder
from gazelit.datamodules.collate import Collator
from gazelit.datamodules.frame_sampling import frame_start_times, sample_frame_indices, sample_timed_frames
from gazelit.datamodules.records import IMAGE_EXTENSIONS
from gazelit.datamodules.samples import ProcessedSample

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass
class Prompt:
    """One generation request: `text`, at most one image (`images`) or the frames of one video (`frames`,
    one unit each), and the system prompt (None: none). One medium per sample, as in training (the chat
    encoder moves the `<image>` placeholder to the start of the user turn)."""

    text: str
    images: Sequence[Image.Image] = ()
    frames: Sequence[Image.Image] = ()
    system: str | None = DEFAULT_SYSTEM_PROMPT
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.images) and len(self.frames):
            raise ValueError("a prompt has an image or the frames of one video, not both")
        if len(self.images) > 1:
            raise ValueError(f"{len(self.images)} images: one image (or one video) per prompt, as in training")

    @property
    def units(self) -> list[Image.Image]:
        return list(self.frames) if len(self.frames) else list(self.images)


class PromptEncoder:
    """Builds generation batches for one model's tokenizer, visual grid, context tokens and transform."""

    def __init__(
        self,
        tokenizer: Any,
        visual_grid: tuple[int, int],
        num_context: int,
        image_transform: Callable[[Image.Image], torch.Tensor],
        max_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.visual_grid = tuple(visual_grid)
        self.num_context = num_context
        self.image_transform = image_transform
        self.max_length = max_length
        self._pixel_shape: tuple[int, int, int] | None = None

    @classmethod
    def from_model(cls, model: Any, max_length: int | None = None) -> PromptEncoder:
        """For a GazeVLM: its tokenizer, `visual_grid`, `num_context` and `image_transform()`."""
        return cls(model.tokenizer, model.visual_grid, model.num_context, model.image_transform(), max_length)

    def chat_encoder(self, system: str | None) -> ChatEncoder:
        return ChatEncoder(self.tokenizer, self.visual_grid, self.num_context, system_prompt=system)

    def encode(self, prompt: Prompt) -> ProcessedSample:
        """Token ids, kinds and pixels of one prompt, ending with the assistant generation prompt."""
        encoder = self.chat_encoder(prompt.system)
        units = prompt.units
        units_per_media = [len(units)] if len(prompt.frames) else [1] * len(units)
        tokens = encoder.encode_prompt([("user", prompt.text)], units_per_media)
        if len(tokens.unit_starts) != len(units):
            raise ValueError(
                f"the prompt expands to {len(tokens.unit_starts)} units but has {len(units)} images/frames"
            )
        if self.max_length is not None and len(tokens) > self.max_length:
            raise ValueError(f"the prompt takes {len(tokens)} positions, more than max_length {self.max_length}")
        pixels = torch.stack([self.image_transform(u) for u in units]) if units else None
        is_video = bool(len(prompt.frames))
        return ProcessedSample(
            tokens=tokens,
            unit_video=[0 if is_video else -1] * len(units),
            unit_time=list(range(len(units))) if is_video else [0] * len(units),
            pixel_values=pixels,
            meta=dict(prompt.meta),
        )

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        if self._pixel_shape is None:
            self._pixel_shape = tuple(int(d) for d in self.image_transform(Image.new("RGB", (32, 32))).shape)
        return self._pixel_shape

    def batch(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """A left-padded batch (gazelit.batch contract; labels all -100) for `generate_from_batch`."""
        samples = [self.encode(p) for p in prompts]
        collate = Collator(self.tokenizer.pad_token_id, self.visual_grid, self.num_context, self.pixel_shape)
        return left_pad(collate(samples))


def left_pad(batch: dict[str, Any]) -> dict[str, Any]:
    """Move a right-padded batch's padding to the left: each row is rolled by its padding length and
    unit starts shift with it. Returns a new dict; the input is unchanged."""
    lengths = batch["attention_mask"].sum(1)
    width = batch["attention_mask"].shape[1]
    shift = width - lengths
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "token_kind"):
        rows = [torch.roll(batch[key][i], int(shift[i])) for i in range(batch[key].shape[0])]
        out[key] = torch.stack(rows) if rows else batch[key]
    out["unit_start"] = batch["unit_start"] + shift[batch["unit_sample"]]
    return out


# ---------------------------------------------------------------------------------------------- media
def load_image(path: str | Path) -> Image.Image:
    return media.decode_image(Path(path).read_bytes())


def load_video_frames(
    path: str | Path, fps: float = 1.0, max_frames: int = 32
) -> tuple[list[Image.Image], list[float]]:
    """Frames of a video file (decord) or gif sampled at `fps` (at most `max_frames`), with their times in
    seconds. A directory is read as a folder of frames (see `load_frames_dir`)."""
    path = Path(path)
    if path.is_dir():
        return load_frames_dir(path, fps=fps, max_frames=max_frames)
    data = path.read_bytes()
    if path.suffix.lower() == ".gif":
        durations = media.gif_durations(data)
        indices = sample_timed_frames(durations, fps, max_frames)
        starts = frame_start_times(durations)
        return media.decode_gif_frames(data, indices), [starts[i] for i in indices]
    num_frames, native_fps = media.probe_video(data)
    indices = sample_frame_indices(num_frames, native_fps, fps, max_frames)
    return media.decode_video_frames(data, indices), [i / native_fps for i in indices]


def load_frames_dir(
    folder: str | Path, fps: float = 1.0, max_frames: int = 32, folder_fps: float = 1.0
) -> tuple[list[Image.Image], list[float]]:
    """Image files of a folder in name order, taken as a video at `folder_fps`, sampled like a video."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    indices = sample_frame_indices(len(files), folder_fps, fps, max_frames)
    return [load_image(files[i]) for i in indices], [i / folder_fps for i in indices]
