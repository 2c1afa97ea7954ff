"""Hand-built GazeVLM batches (gazelit.batch contract) for model tests, independent of datamodules."""

from __future__ import annotations

import torch

from gazelit.attention import CONTEXT, PAD, TEXT, VISUAL


def make_batch(model, samples, padding="right", seed=0, image_size=None):
    """samples: per sample a list of segments: ("text", n) | ("image",) | ("video", frames).

    Text ids are random non-special ids; labels supervise the text after the last unit.
    """
    g = torch.Generator().manual_seed(seed)
    grid = model.visual_grid
    per_unit = grid[0] * grid[1]
    m = model.num_context
    size = image_size or model.vision.image_size
    seqs, units, pixels = [], [], []
    video_id = 0
    for s, segments in enumerate(samples):
        kinds = []
        for seg in segments:
            if seg[0] == "text":
                kinds += [TEXT] * seg[1]
            else:
                frames = 1 if seg[0] == "image" else seg[1]
                for t in range(frames):
                    units.append((s, len(kinds), video_id if seg[0] == "video" else -1, t))
                    kinds += [VISUAL] * per_unit + [CONTEXT] * m
                    pixels.append(torch.randn(3, size, size, generator=g))
                if seg[0] == "video":
                    video_id += 1
        seqs.append(kinds)
    length = max(len(k) for k in seqs)
    b = len(samples)
    kind = torch.full((b, length), PAD)
    shift = []
    for i, k in enumerate(seqs):
        off = length - len(k) if padding == "left" else 0
        kind[i, off : off + len(k)] = torch.tensor(k, dtype=torch.long)
        shift.append(off)
    ids = torch.randint(3, 200, (b, length), generator=g).masked_fill(kind != TEXT, model.tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, k in enumerate(seqs):
        last_unit = max([j for j, kk in enumerate(k) if kk != TEXT], default=-1)
        sl = slice(shift[i] + last_unit + 1, shift[i] + len(k))
        labels[i, sl] = ids[i, sl]
    return dict(
        input_ids=ids,
        attention_mask=(kind != PAD).long(),
        labels=labels,
        token_kind=kind,
        pixel_values=torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size),
        unit_sample=torch.tensor([u[0] for u in units], dtype=torch.long),
        unit_start=torch.tensor([u[1] + shift[u[0]] for u in units], dtype=torch.long),
        unit_grid=torch.tensor([list(grid)] * len(units), dtype=torch.long).view(-1, 2),
        unit_video=torch.tensor([u[2] for u in units], dtype=torch.long),
        unit_time=torch.tensor([u[3] for u in units], dtype=torch.long),
        num_context=m,
    )
