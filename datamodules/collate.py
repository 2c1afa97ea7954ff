"""Collation of processed samples into the batch contract of gazelit.batch (right padding).

Builds the padded token tensors, the unit table (with video ids unique in the batch) and stacks every
unit's pixels; a text-only batch gets an empty (0, 3, H, W) pixel tensor. Optional keys: `skipped`
(reason -> count since the worker's previous batch) and `meta` (one dict per sample).
"""

from __future__ import annotations

from typing import Any

import torch

from gazelit.attention.layout import PAD

from gazelit.datamodules.chat import IGNORE_INDEX
from gazelit.datamodules.samples import ProcessedSample


def bucket_length(length: int, buckets: list[int], multiple: int = 1) -> int:
    """The padded length: the smallest bucket >= length, else `length` rounded up to `multiple`."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    multiple = max(1, multiple)
    return -(-length // multiple) * multiple


class Collator:
    """Pads to the longest sample, rounded up to the smallest of `length_buckets` that holds it (beyond the
    largest bucket, and without buckets: to a multiple of `pad_to_multiple_of`). Buckets bound the number of
    distinct batch shapes, hence of compilations of the compiled attention."""

    def __init__(
        self,
        pad_token_id: int,
        visual_grid: tuple[int, int],
        num_context: int,
        pixel_shape: tuple[int, int, int],
        pad_to_multiple_of: int = 1,
        length_buckets: list[int] | tuple[int, ...] = (),
    ):
        self.pad_token_id = pad_token_id
        self.visual_grid = tuple(visual_grid)
        self.num_context = num_context
        self.pixel_shape = tuple(pixel_shape)
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)
        self.length_buckets = sorted(int(b) for b in length_buckets)

    def __call__(self, samples: list[ProcessedSample], skipped: dict[str, int] | None = None) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        lengths = [len(s.tokens) for s in samples]
        length = bucket_length(max(lengths), self.length_buckets, self.pad_to_multiple_of)
        b = len(samples)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        token_kind = torch.full((b, length), PAD, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        unit_sample, unit_start, unit_video, unit_time, pixels = [], [], [], [], []
        next_video_id = 0
        for i, sample in enumerate(samples):
            n = lengths[i]
            input_ids[i, :n] = torch.tensor(sample.tokens.input_ids, dtype=torch.long)
            labels[i, :n] = torch.tensor(sample.tokens.labels, dtype=torch.long)
            token_kind[i, :n] = torch.tensor(sample.tokens.token_kind, dtype=torch.long)
            attention_mask[i, :n] = 1
            starts = sample.tokens.unit_starts
            if not starts:
                continue
            if sample.pixel_values is None or sample.pixel_values.shape[0] != len(starts):
                got = None if sample.pixel_values is None else sample.pixel_values.shape[0]
                raise ValueError(f"sample {i}: {len(starts)} units but pixel values for {got}")
            video_id = -1
            if any(v >= 0 for v in sample.unit_video):
                video_id, next_video_id = next_video_id, next_video_id + 1
            unit_sample.extend([i] * len(starts))
            unit_start.extend(starts)
            unit_video.extend(video_id if v >= 0 else -1 for v in sample.unit_video)
            unit_time.extend(sample.unit_time)
            pixels.append(sample.pixel_values)
        n_units = len(unit_start)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "token_kind": token_kind,
            "pixel_values": torch.cat(pixels) if pixels else torch.zeros((0, *self.pixel_shape)),
            "unit_sample": torch.tensor(unit_sample, dtype=torch.long),
            "unit_start": torch.tensor(unit_start, dtype=torch.long),
            "unit_grid": torch.tensor([list(self.visual_grid)] * n_units, dtype=torch.long).reshape(n_units, 2),
            "unit_video": torch.tensor(unit_video, dtype=torch.long),
            "unit_time": torch.tensor(unit_time, dtype=torch.long),
            "num_context": self.num_context,
            "skipped": dict(skipped or {}),
            "meta": [sample.meta for sample in samples],
        }
        return batch
