"""The exact reference: materialise the Gaze Attention mask and run SDPA. The oracle for every fast path.

Memory is O(B * Hq * Lq * S): use it for tests, debugging and small inputs, never for long sequences.
The fast paths use it for the few query rows under a look span (`with_look_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazelit.attention.layout import CONTEXT, PAD, TEXT, VISUAL, GazeLayout
from gazelit.attention.look import LookSet
from gazelit.attention.routing import (
    accumulate_routing_stats,
    available_regions,
    region_descriptors,
    region_scores,
    select_regions,
    selection_table,
)


def reference_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: GazeLayout,
    top_k: int | None,
    q_offset: int = 0,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of every query row: indices and scores (B, Hq, Lq, kk), -1 where nothing is selected.

    Rows that are not text are routed too (harmlessly); only text rows use the result.
    """
    positions = torch.arange(q_offset, q_offset + q.shape[2], device=q.device)
    desc = region_descriptors(k, layout)
    scores = region_scores(q, desc)  # (B, Hq, Lq, R)
    avail = available_regions(layout, positions).unsqueeze(1)  # (B, 1, Lq, R)
    return select_regions(scores, avail, top_k, num_kv_heads=k.shape[1], shared=shared)


def gaze_mask(
    layout: GazeLayout,
    routing: torch.Tensor,
    q_offset: int,
    q_len: int,
    kv_len: int,
    num_heads: int,
    looks: LookSet | None = None,
) -> torch.Tensor:
    """Boolean (B, Hq, Lq, S) mask: True where query row i (position q_offset + i) may attend key j.

    When look spans cover rows of the window the mask is additive instead (float: 0 where allowed, -inf
    where not, the look bias on visual keys outside a span's box), and the regions a span names are
    added to the selection of its rows."""
    device = layout.device
    qpos = torch.arange(q_offset, q_offset + q_len, device=device)
    kpos = torch.arange(kv_len, device=device)
    kind_q, kind_k = layout.kinds_at(qpos), layout.kinds_at(kpos)  # (B, Lq), (B, S)
    unit_q, unit_k = layout.units_at(qpos), layout.units_at(kpos)
    region_k = layout.regions_at(kpos)  # (B, S)
    causal = (kpos[None, :] <= qpos[:, None]).unsqueeze(0)  # (1, Lq, S)
    real_k = (kind_k != PAD).unsqueeze(1)  # (B, 1, S)

    selected = selection_table(routing, max(layout.num_regions, 1))  # (B, Hq, Lq, R)
    tables = None if looks is None else looks.query_tables(q_offset, q_len, kv_len, device)
    if tables is not None:
        active, inside, named = tables
        avail = layout.region_ready[:, None, :] <= qpos[None, :, None]  # (B, Lq, R)
        selected = selected | (named & avail).unsqueeze(1)
    gathered = selected.gather(-1, region_k.clamp(min=0)[:, None, None, :].expand(-1, num_heads, q_len, -1))
    visual_k = (kind_k == VISUAL)[:, None, None, :]
    text_allowed = causal.unsqueeze(1) & real_k.unsqueeze(1) & (~visual_k | gathered)  # (B, Hq, Lq, S)

    dense_allowed = causal & real_k  # visual queries: causal, as the base model
    context_allowed = causal & real_k & (unit_k[:, None, :] == unit_q[:, :, None])
    pad_allowed = (kpos[None, :] == qpos[:, None]).unsqueeze(0).expand_as(dense_allowed)

    kq = kind_q[:, None, :, None]
    mask = torch.where(kq == TEXT, text_allowed, False)
    mask = mask | ((kq == VISUAL) & dense_allowed.unsqueeze(1))
    mask = mask | ((kq == CONTEXT) & context_allowed.unsqueeze(1))
    mask = mask | ((kq == PAD) & pad_allowed.unsqueeze(1))
    if tables is None:
        return mask
    outside = (active & (kind_q == TEXT))[:, None, :, None] & visual_k & ~inside.unsqueeze(1)
    additive = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill(outside, looks.bias)
    return additive.masked_fill(~mask, float("-inf"))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    top_k: int | None,
    *,
    scale: float | None = None,
    q_offset: int = 0,
    shared: bool = False,
    routing: torch.Tensor | None = None,
    stats: dict | None = None,
    looks: LookSet | None = None,
) -> torch.Tensor:
    """Exact Gaze Attention (the paths' common signature; see gazelit.attention). Returns (B, Hq, Lq, D).
    Outputs of padding query rows are meaningless (they attend only to themselves). `looks`: look spans
    (gazelit.attention.look)."""
    if routing is None:
        routing, _ = reference_routing(q, k, layout, top_k, q_offset=q_offset, shared=shared)
    if stats is not None:
        accumulate_routing_stats(stats, layout, routing, q_offset)
    mask = gaze_mask(layout, routing, q_offset, q.shape[2], k.shape[2], q.shape[1], looks)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def with_look_rows(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    top_k: int | None,
    looks: LookSet | None,
    *,
    scale: float | None,
    q_offset: int,
    shared: bool = False,
    routing: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out` (B, Hq, Lq, D) of a fast path with the query rows under look spans recomputed exactly.

    Look spans cover a few rows (a box and a short local reasoning), so every path computes them with the
    reference, per sample and window of nearby spans (spans at most `MERGE_GAP` rows apart share one call;
    the rows between them are computed and discarded): exact forward and backward, memory
    O(Hq * window rows * S).
    """
    if looks is None:
        return out
    lq = q.shape[2]
    samples, changed = [], False
    for b in range(layout.batch_size):
        spans = looks.rows(b, q_offset, lq)
        if not spans:
            samples.append(out[b])
            continue
        changed = True
        one = layout.sample_layout(b)
        one_looks = looks.sample(b, one)
        parts, at = [], 0
        for a, z, inside in _windows(spans, q_offset):
            parts.append(out[b, :, at:a])
            given = None if routing is None else routing[b : b + 1, :, a:z]
            exact = reference_attention(q[b : b + 1, :, a:z], k[b : b + 1], v[b : b + 1], one, top_k, scale=scale,
                                        q_offset=q_offset + a, shared=shared, routing=given, looks=one_looks)  # fmt: skip
            keep = torch.zeros(z - a, dtype=torch.bool, device=out.device)
            for i, j in inside:
                keep[i - a : j - a] = True
            parts.append(torch.where(keep[None, :, None], exact[0].to(out.dtype), out[b, :, a:z]))
            at = z
        parts.append(out[b, :, at:])
        samples.append(torch.cat(parts, 1))
    return torch.stack(samples) if changed else out


MERGE_GAP = 32  # look spans of a sample this close (in rows) are recomputed by one reference call


def _windows(spans, q_offset: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Spans (absolute first, end, look) -> windows (first, end, [span rows]) in rows of the query window."""
    windows: list[tuple[int, int, list[tuple[int, int]]]] = []
    for a, z, _ in spans:
        a, z = a - q_offset, z - q_offset
        if windows and a - windows[-1][1] <= MERGE_GAP:
            first, _, inside = windows[-1]
            windows[-1] = (first, z, inside + [(a, z)])
        else:
            windows.append((a, z, [(a, z)]))
    return windows
