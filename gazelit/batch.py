"""The batch contract between datamodules and GazeVLM: keys, shapes, meanings, and a checker.

A collated batch of B sequences padded to length L (right padding for training) with N visual units in
total (images and video frames, sample-major, in sequence order):

  input_ids       long (B, L)   text token ids; any id (the pad id) at visual, context and pad positions
  attention_mask  long (B, L)   1 for real tokens (text, visual, context), 0 for padding
  labels          long (B, L)   -100 everywhere except supervised (assistant) tokens; not shifted
  token_kind      long (B, L)   TEXT=0, VISUAL=1, CONTEXT=2, PAD=3 (gazelit.attention.layout)
  pixel_values    float (N, 3, H, W)  one preprocessed image per unit; N may be 0
  unit_sample     long (N,)     sample index of each unit
  unit_start      long (N,)     position of the unit's first visual token
  unit_grid       long (N, 2)   (rows, cols) of visual tokens the data expanded for the unit
  unit_video      long (N,)     -1 for an image; frames of one video share an id unique in the batch
  unit_time       long (N,)     frame index within its video (0 for images)
  num_context     int           context tokens after every unit (M)

Optional: `skipped` (dict reason -> count of samples dropped since the previous batch, from the
loader), `meta` (list of per-sample dicts such as id, source, target_box).

Every unit's visual tokens sit at [unit_start, unit_start + rows*cols) followed by `num_context`
context tokens; `GazeLayout.from_token_kinds` checks that against `token_kind`.
"""

from __future__ import annotations

import torch

from gazelit.attention.layout import CONTEXT, PAD, TEXT, VISUAL

__all__ = ["TEXT", "VISUAL", "CONTEXT", "PAD", "REQUIRED_KEYS", "answer_prompts", "check_batch"]

REQUIRED_KEYS = {
    "input_ids": 2,
    "attention_mask": 2,
    "labels": 2,
    "token_kind": 2,
    "pixel_values": 4,
    "unit_sample": 1,
    "unit_start": 1,
    "unit_grid": 2,
    "unit_video": 1,
    "unit_time": 1,
}


def check_batch(batch: dict) -> None:
    """Raise ValueError naming the key whose presence, rank or size breaks the contract."""
    missing = [k for k in [*REQUIRED_KEYS, "num_context"] if k not in batch]
    if missing:
        raise ValueError(f"batch is missing keys {missing}")
    for key, rank in REQUIRED_KEYS.items():
        value = batch[key]
        if not isinstance(value, torch.Tensor) or value.dim() != rank:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"batch[{key!r}] must be a {rank}-d tensor, got {shape}")
    b, length = batch["input_ids"].shape
    for key in ("attention_mask", "labels", "token_kind"):
        if tuple(batch[key].shape) != (b, length):
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {(b, length)}")
    n = batch["pixel_values"].shape[0]
    for key in ("unit_sample", "unit_start", "unit_grid", "unit_video", "unit_time"):
        if batch[key].shape[0] != n:
            raise ValueError(f"batch[{key!r}] describes {batch[key].shape[0]} units but pixel_values has {n}")
    if batch["unit_grid"].numel() and batch["unit_grid"].shape[1] != 2:
        raise ValueError(f"batch['unit_grid'] must be (N, 2), got {tuple(batch['unit_grid'].shape)}")
    real = batch["attention_mask"].bool()
    if ((batch["token_kind"] == PAD) == real).any():
        raise ValueError("batch['token_kind'] marks PAD where attention_mask is 1 (or the reverse)")


def answer_prompts(batch: dict, pad_id: int) -> dict:
    """A teacher-forced batch (labels mark the answers) cut before each sample's first supervised token and
    left-padded: the prompts a model answers at test time, labels all -100. Units keep their images; a
    unit after the cut must not exist (answers follow their media). Raises ValueError naming a sample
    without a supervised token."""
    labels = batch["labels"]
    b = labels.shape[0]
    cut = []
    for i in range(b):
        supervised = (labels[i] != -100).nonzero().flatten()
        if not supervised.numel():
            raise ValueError(f"sample {i} of the batch has no supervised token: no answer to cut its prompt at")
        cut.append(int(supervised[0]))
    n = max(cut)

    def left(t: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((b, n), fill, dtype=t.dtype, device=t.device)
        for i in range(b):
            out[i, n - cut[i] :] = t[i, : cut[i]]
        return out

    shift = torch.tensor([n - c for c in cut], device=labels.device)
    kinds = left(batch["token_kind"], PAD)
    prompts = {key: batch[key] for key in ("pixel_values", "unit_sample", "unit_grid", "unit_video", "unit_time")}
    prompts.update(
        input_ids=left(batch["input_ids"], pad_id), token_kind=kinds, attention_mask=(kinds != PAD).long(),
        labels=torch.full((b, n), -100, device=labels.device), num_context=batch["num_context"],
        unit_start=batch["unit_start"] + shift[batch["unit_sample"]],
    )  # fmt: skip
    return prompts
