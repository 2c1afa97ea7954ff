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
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of every query row: indices and scores (B, Hq, Lq, kk), -1 where nothing is selected.

    Rows that are not text are routed too (harmlessly); only text rows use the result. `positions` (B, Lq):
    each sample's own query positions instead of [q_offset, q_offset + Lq).
    """
    if positions is None:
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
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B, Hq, Lq, S) mask: True where query row i (position q_offset + i, or positions[b, i]) may
    attend key j.

    When look spans cover some of the rows the mask is additive instead (float: 0 where allowed, -inf
    where not, the look bias on visual keys outside a span's box), and the regions a span names are
    added to the selection of its rows."""
    device = layout.device
    b = layout.batch_size
    qpos = positions if positions is not None else torch.arange(q_offset, q_offset + q_len, device=device).expand(b, -1)
    kpos = torch.arange(kv_len, device=device)
    kind_q, kind_k = layout.kinds_at(qpos), layout.kinds_at(kpos)  # (B, Lq), (B, S)
    unit_q, unit_k = layout.units_at(qpos), layout.units_at(kpos)
    region_k = layout.regions_at(kpos)  # (B, S)
    causal = kpos[None, None, :] <= qpos[:, :, None]  # (B, Lq, S)
    real_k = (kind_k != PAD).unsqueeze(1)  # (B, 1, S)

    selected = selection_table(routing, max(layout.num_regions, 1))  # (B, Hq, Lq, R)
    tables = None if looks is None else looks.position_tables(qpos, kv_len, device)
    if tables is not None:
        active, inside, named = tables
        avail = layout.region_ready[:, None, :] <= qpos[:, :, None]  # (B, Lq, R)
        selected = selected | (named & avail).unsqueeze(1)
    gathered = selected.gather(-1, region_k.clamp(min=0)[:, None, None, :].expand(-1, num_heads, q_len, -1))
    visual_k = (kind_k == VISUAL)[:, None, None, :]
    text_allowed = causal.unsqueeze(1) & real_k.unsqueeze(1) & (~visual_k | gathered)  # (B, Hq, Lq, S)

    dense_allowed = causal & real_k  # visual queries: causal, as the base model
    context_allowed = causal & real_k & (unit_k[:, None, :] == unit_q[:, :, None])
    pad_allowed = kpos[None, None, :] == qpos[:, :, None]

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
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact Gaze Attention (the paths' common signature; see gazelit.attention). Returns (B, Hq, Lq, D).
    Outputs of padding query rows are meaningless (they attend only to themselves). `looks`: look spans
    (gazelit.attention.look). `positions` (B, Lq): each sample's own query positions (rows gathered from
    anywhere in the sequence) instead of [q_offset, q_offset + Lq)."""
    if routing is None:
        routing, _ = reference_routing(q, k, layout, top_k, q_offset=q_offset, shared=shared, positions=positions)
    if stats is not None:
        if positions is not None:
            raise ValueError("statistics are collected for contiguous query windows only (positions=None)")
        accumulate_routing_stats(stats, layout, routing, q_offset)
    mask = gaze_mask(layout, routing, q_offset, q.shape[2], k.shape[2], q.shape[1], looks, positions)
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
    reference: the span rows of every sample gathered into one (B, Hq, N, D) call at their own positions
    (N: the most span rows of a sample), then scattered back. Exact forward and backward; memory
    O(B * Hq * N * S).
    """
    if looks is None:
        return out
    b, hq, lq, d = out.shape
    rows = [[p - q_offset for a, z, _ in looks.rows(i, q_offset, lq) for p in range(a, z)] for i in range(b)]
    n = max(map(len, rows))
    if n == 0:
        return out
    # padding slots compute row 0 again and land in an extra row that is cut off (index lq)
    take = torch.zeros(b, n, dtype=torch.long, device=out.device)
    put = torch.full((b, n), lq, dtype=torch.long, device=out.device)
    for i, r in enumerate(rows):
        take[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        put[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    qg = q.gather(2, take[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    given = None if routing is None else routing.gather(2, take[:, None, :, None].expand(-1, hq, -1, routing.shape[-1]))
    exact = reference_attention(qg, k, v, layout, top_k, scale=scale, shared=shared, routing=given, looks=looks,
                                positions=take + q_offset)  # fmt: skip
    extended = torch.cat([out, out.new_zeros(b, hq, 1, d)], 2)
    return extended.scatter(2, put[:, None, :, None].expand(-1, hq, -1, d), exact.to(out.dtype))[:, :, :lq]
