"""A picture of where the model looks: the regions Gaze Attention selects for one fixed validation sample.

Every `every_n_steps` optimiser steps (and when training ends) the model generates an answer for the
same validation sample with routing traced, and the callback draws one panel per generated token: the
sample's image with every region shaded by how many (layer, head) pairs selected it for that token, the
queried object's box (from the sample's meta) outlined in green. Where the sample's meta gives the
question's words naming the object (`target_phrase`), a first panel, labelled "@<phrase>", shows the
selection of the query at the phrase's last token: a causal LM can look the object up there and carry it
to the answer. The regions of the one head that followed the question most at the last validation
(GazeVLMModule.question_head: the largest hit rate on the named object minus on the board's other objects)
are outlined in blue: the summed tint shows where most heads look, the blue where the question is followed.
The picture goes to TensorBoard (`add_image`) and to `<out_dir>/step=NNNNNN.png`, with a copy at
`<out_dir>/latest.png`.

The sample is the first one of the validation stream read as rank 0 of 1, so every rank builds the same
batch without communicating. Under FSDP2 all ranks must run the same forwards: every rank generates
(GazeVLMModule.configure_model registers `generate_from_batch` as an FSDP forward method and marks the LLM
so that transformers keeps the ranks' decode loops in step); rank 0 draws.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw

from gazelit.drawing import CHAR, LINE, drawable, label_font
from gazelit.models.routing_accuracy import last_phrase_end, phrase_spellings

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PANEL = 256  # largest panel side (pixels)
MIN_PANEL = 96  # smallest panel side: many tokens make a wider picture rather than unreadable panels
WIDTH = 1024  # the canvas width panels share
MAX_TOKENS = 10
MAX_UNITS = 4
BLUE = (0, 90, 255)  # the head that follows the question most


# ---------------------------------------------------------------------------------------------- the sample
def prompt_of(batch: dict[str, Any], index: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample `index` of a training-format batch cut just before its first supervised token: the prompt
    (system, first user turn with its media, and the assistant header) as a batch of one, and its meta
    with the first answer's token ids as "expected"."""
    labels = batch["labels"][index]
    supervised = (labels != IGNORE_INDEX).nonzero()
    if supervised.numel() == 0:
        raise ValueError(f"sample {index} of the batch has no supervised token to generate")
    end = int(supervised[0, 0])
    units = batch["unit_sample"] == index
    prompt = {
        "input_ids": batch["input_ids"][index : index + 1, :end],
        "attention_mask": batch["attention_mask"][index : index + 1, :end],
        "labels": torch.full((1, end), IGNORE_INDEX, dtype=torch.long),
        "token_kind": batch["token_kind"][index : index + 1, :end],
        "pixel_values": batch["pixel_values"][units],
        "unit_sample": torch.zeros(int(units.sum()), dtype=torch.long),
        "unit_start": batch["unit_start"][units],
        "unit_grid": batch["unit_grid"][units],
        "unit_video": batch["unit_video"][units],
        "unit_time": batch["unit_time"][units],
        "num_context": batch["num_context"],
    }
    meta = dict(batch["meta"][index]) if batch.get("meta") else {}
    after = labels[end:]
    stop = int((after == IGNORE_INDEX).nonzero()[0, 0]) if bool((after == IGNORE_INDEX).any()) else after.numel()
    meta["expected"] = after[:stop]  # the first answer (a record may hold several turns)
    return prompt, meta


def first_validation_prompt(datamodule: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The prompt of the first validation sample with media, identical on every rank; None without
    validation data."""
    from gazelit.datamodules.datamodule import GazeDataModule

    config = datamodule.config
    if not config.val_sources:
        return None
    reader = GazeDataModule(
        config, datamodule.tokenizer, datamodule.image_transform, datamodule.visual_grid,
        datamodule.num_context, rank=0, world_size=1,
    )  # fmt: skip
    stream = reader.make_stream(config.val_sources, batch_size=1, shuffle=False, fixed_length=False)
    for batch in stream:
        if batch["pixel_values"].shape[0] > 0:
            return prompt_of(batch)
    return None


# ---------------------------------------------------------------------------------------------- drawing
def to_rgb(pixels: torch.Tensor, transform: Any = None) -> np.ndarray:
    """(3, H, W) normalised pixels -> (H, W, 3) uint8, undoing the transform's mean/std when known."""
    x = pixels.detach().float().cpu().numpy()
    mean, std = _mean_std(transform)
    if mean is not None:
        x = x * std.reshape(3, 1, 1) + mean.reshape(3, 1, 1)
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def _mean_std(transform: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    processor = getattr(transform, "processor", None)
    mean = getattr(processor, "image_mean", None) if processor is not None else getattr(transform, "mean", None)
    std = getattr(processor, "image_std", None) if processor is not None else getattr(transform, "std", None)
    if mean is None or std is None:
        return None, None
    return np.asarray(mean, dtype=np.float32).reshape(-1), np.asarray(std, dtype=np.float32).reshape(-1)


def prepend_step(first: Any, rest: Any, label: str) -> Any:
    """A RoutingTrace whose step 0 is `first`'s single step (labelled `label`) followed by `rest`'s steps."""
    kk = max(first.region.shape[-1], rest.region.shape[-1])

    def joined(name: str, fill: float) -> torch.Tensor:
        a, b = getattr(first, name), getattr(rest, name)
        pad = lambda t: torch.nn.functional.pad(t, (0, kk - t.shape[-1]), value=fill)  # noqa: E731
        return torch.cat([pad(a[:1]), pad(b)])

    looks = [dataclasses.replace(look, start=look.start + 1, end=None if look.end is None else look.end + 1)
             for look in rest.looks]  # fmt: skip
    return dataclasses.replace(rest, region=joined("region", -1), score=joined("score", float("-inf")),
                               unit=joined("unit", -1), tile=joined("tile", -1), tokens=[label, *rest.tokens],
                               looks=looks)  # fmt: skip


def selection_counts(trace: Any) -> dict[tuple[int, int, int], int]:
    """(token, unit, tile) -> number of (layer, head) pairs that selected that tile for that token."""
    counts: dict[tuple[int, int, int], int] = {}
    unit, tile = trace.unit, trace.tile
    for t in range(unit.shape[0]):
        valid = unit[t] >= 0
        pairs = torch.stack([unit[t][valid], tile[t][valid]], dim=1).tolist()
        for u, g in pairs:
            counts[(t, u, g)] = counts.get((t, u, g), 0) + 1
    return counts


def draw_routing(
    images: list[np.ndarray],
    trace: Any,
    target_box: list[float] | None = None,
    title: str | list[str] = "",
    head: tuple[int, int] | None = None,
) -> Image.Image:
    """Rows: the sample's units (images / frames); columns: generated tokens. Each region selected for a
    token is tinted faintly by how many (layer, head) pairs chose it, relative to the token's most chosen
    region, and *outlined* in red when at least half as many chose it as that one (the image's own colours
    stay visible); the queried object's box is outlined in green. `head` (layer, head): that one head's
    regions are also outlined in blue, inside the red. Panels share a canvas of about `WIDTH` pixels;
    header lines wrap to it and each token's label fits under its own panel. `title`: header lines above
    the panels."""
    tokens = min(len(trace.tokens) or trace.unit.shape[0], MAX_TOKENS)
    rows = min(len(images), MAX_UNITS)
    side = max(MIN_PANEL, min(PANEL, WIDTH // max(1, tokens)))
    counts = selection_counts(trace)
    most = {t: max((n for (ct, _, _), n in counts.items() if ct == t), default=1) for t in range(tokens)}
    font = label_font()
    width = max(1, tokens) * side
    lines = [w for line in ([title] if isinstance(title, str) else list(title))
             for w in (textwrap.wrap(line, max(20, width // CHAR)) or [""])]  # fmt: skip
    header, caption = 4 + LINE * len(lines), LINE + 2
    canvas = Image.new("RGB", (width, header + rows * (side + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, 2 + LINE * i), drawable(line), fill=(0, 0, 0), font=font)
    for t in range(tokens):
        for u in range(rows):
            x0, y0 = t * side, header + u * (side + caption)
            panel = Image.fromarray(images[u]).resize((side, side), Image.Resampling.NEAREST).convert("RGBA")
            marks = Image.new("RGBA", panel.size, (0, 0, 0, 0))
            marks_draw = ImageDraw.Draw(marks)
            for (ct, cu, tile), n in counts.items():
                if ct == t and cu == u:
                    share = n / most[t]
                    box = [round(v * side) for v in trace.tile_box(u, tile)]
                    box[2], box[3] = box[2] - 1, box[3] - 1
                    outline = (230, 0, 0, 255) if share >= 0.5 else None  # the regions most heads chose
                    marks_draw.rectangle(box, fill=(255, 0, 0, int(60 * share)), outline=outline,
                                         width=1 + round(2 * share))  # fmt: skip
            for tile in head_tiles(trace, head, t, u):
                box = [round(v * side) for v in trace.tile_box(u, tile)]
                marks_draw.rectangle([box[0] + 4, box[1] + 4, box[2] - 5, box[3] - 5], outline=BLUE + (255,), width=2)
            panel = Image.alpha_composite(panel, marks).convert("RGB")
            if target_box is not None and u == 0:
                ImageDraw.Draw(panel).rectangle([v * side for v in target_box], outline=(0, 200, 0), width=2)
            canvas.paste(panel, (x0, y0))
            label = repr(trace.tokens[t])[1:-1] if t < len(trace.tokens) else str(t)
            label = label[: max(1, side // CHAR - 1)]
            draw.text((x0 + 2, y0 + side + 1), drawable(label), fill=(0, 0, 0), font=font)
        if t:
            draw.line([(t * side, header), (t * side, canvas.height)], fill=(255, 255, 255), width=2)
    return canvas


def head_tiles(trace: Any, head: tuple[int, int] | None, token: int, unit: int) -> list[int]:
    """The tiles of `unit` that one (layer, head) selected for `token` (query heads, as in the validation
    metric; a GQA-shared selection is expanded to them); none without a head or where the trace has no
    such layer / head."""
    if head is None:
        return []
    layer, h = head
    if not (0 <= layer < trace.tile.shape[1] and 0 <= h < trace.tile.shape[2]):
        return []
    units, tiles = trace.unit[token, layer, h], trace.tile[token, layer, h]
    return [int(tile) for u, tile in zip(units.tolist(), tiles.tolist()) if u == unit]


def trace_at_phrase(model: Any, prompt: dict[str, Any], phrase: str | None) -> Any:
    """The one-step routing trace of the prompt's query at the phrase's last token (None: no phrase, not
    found, or nothing routed there)."""
    if not phrase or not model.gaze_enabled:
        return None
    row = last_phrase_end(prompt["input_ids"][0], phrase_spellings(model.tokenizer, phrase))
    return None if row is None else model.trace_row(prompt, row)


# ---------------------------------------------------------------------------------------------- callback
class RoutingImageLogger(L.Callback):
    """Draws the routing of one fixed validation sample every `every_n_steps` steps and at the end."""

    def __init__(
        self, every_n_steps: int, out_dir: str | Path, max_new_tokens: int = 8, tag: str = "routing/val_sample"
    ):
        self.every_n_steps = every_n_steps
        self.out_dir = Path(out_dir)
        self.max_new_tokens = max_new_tokens
        self.tag = tag
        self.sample: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.last_step: int | None = None
        self.last_path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is not None:
            self.sample = first_validation_prompt(trainer.datamodule)
        if self.sample is None:
            log.warning("no validation sample with media: the routing picture is off")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self.render(trainer, pl_module)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Generate with routing traced on every rank; rank 0 draws, saves and logs. Returns the PNG path."""
        self.last_step = trainer.global_step
        if self.sample is None or not pl_module.model.gaze_enabled:
            return None
        prompt, meta = self.sample
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in prompt.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            output = pl_module.model.generate_from_batch(batch, max_new_tokens=self.max_new_tokens, trace=True)[0]
            at_phrase = trace_at_phrase(pl_module.model, batch, meta.get("target_phrase"))  # every rank: same forwards
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero or output.trace is None:
            return None
        trace = output.trace
        if at_phrase is not None:
            trace = prepend_step(at_phrase, trace, f"@{meta['target_phrase']}")
        transform = getattr(trainer.datamodule, "image_transform", None)
        images = [to_rgb(p, transform) for p in prompt["pixel_values"]]
        k = pl_module.model.top_k
        head = getattr(pl_module, "question_head", None)
        expected = pl_module.model.tokenizer.decode(meta["expected"].tolist(), skip_special_tokens=True)
        title = [
            f"question: {meta['question']}" if meta.get("question") else "",
            f"expected {expected!r}, generated {output.text!r}",
            (f"step {trainer.global_step}, k={'all' if k is None else k}: per generated token, red = regions most "
             "layer x head pairs selected (tint: how many); green = the object asked about"),
            (f"first panel '@{meta['target_phrase']}': the selection at the question's word naming the object"
             if at_phrase is not None else ""),
            (f"blue = layer {head[0]} head {head[1]}, the head that follows the question most at the answer token "
             f"(last validation: hit rate on the named object minus on the others {head[2]:+.2f})"
             if head is not None else ""),
        ]  # fmt: skip
        title = [line for line in title if line]
        picture = draw_routing(images, trace, meta.get("target_box"), title, head=None if head is None else head[:2])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step={trainer.global_step:06d}.png"
        picture.save(path)
        picture.save(self.out_dir / "latest.png")
        self.last_path = path
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(self.tag, np.asarray(picture).transpose(2, 0, 1), trainer.global_step)
        return path
