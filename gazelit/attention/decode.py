"""Cached decode: new text queries against a KV cache, reading only text, context and selected regions.

Per layer, a `DecodeState` is built once, at the first decode step after the visual units are cached:
  - region descriptors (mean keys) of every cached region, computed once and reused at every step;
  - a compact copy of the non-visual cached keys/values (text and context tokens, a few per unit).
Each step then
  1. scores the new queries against the descriptors (B, Hq, n, R), takes the top-k available regions;
  2. gathers, once per KV head, the K/V rows of the union of the regions its query heads selected (with
     a shared selection that is exactly k regions); each query head is masked to its own regions;
  3. attends over [compact non-visual keys | keys generated since the state was built | gathered keys],
     every product a (G*n x N) matmul per KV head.
No score against the full cache is formed. Equal to the reference given the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazelit.attention.layout import PAD, VISUAL, GazeLayout
from gazelit.attention.routing import (
    region_descriptors,
    region_scores,
    routing_dtype,
    select_regions,
    selection_table,
)


@dataclass
class DecodeState:
    descriptors: torch.Tensor  # (B, Hkv, R, D), routing dtype
    nonvisual_k: torch.Tensor  # (B, Hkv, Na, D): text and context keys before `built_at`
    nonvisual_v: torch.Tensor
    nonvisual_valid: torch.Tensor  # (B, Na) bool (False for padding slots)
    built_at: int  # cache length the state covers; keys at >= built_at are read from the cache
    nonvisual_pos: torch.Tensor | None = None  # (B, Na) cache positions of the compact rows, -1 for padding
    regions_max: int = 0  # regions of the sample with the most (all are available once decoding starts)
    _tables: DecodeTables | None = None

    def tables(self, layout: GazeLayout) -> DecodeTables:
        """Index tables of the fused CUDA path, made once per state (int32, contiguous)."""
        if self._tables is None:
            self._tables = DecodeTables(
                ready=layout.region_ready.contiguous(),
                tokens=layout.region_tokens.to(torch.int32).contiguous(),
                nonvisual_pos=self.nonvisual_pos.to(torch.int32).contiguous(),
            )
        return self._tables


@dataclass
class DecodeTables:
    ready: torch.Tensor  # (B, R) int64: first position that may see each region
    tokens: torch.Tensor  # (B, R, T) int32: cache positions of each region's tokens, -1 padded
    nonvisual_pos: torch.Tensor  # (B, Na) int32


def build_state(k: torch.Tensor, v: torch.Tensor, layout: GazeLayout, length: int) -> DecodeState:
    """State from the first `length` cached positions. Units must be complete within them."""
    if length < layout.length and bool((layout.region_ready[layout.region_ready < GazeLayout.NEVER] > length).any()):
        raise ValueError("decode started before every visual unit of the layout was cached")
    positions = torch.arange(length, device=k.device)
    kinds = layout.kinds_at(positions)  # (B, length)
    keep = (kinds != VISUAL) & (kinds != PAD)
    counts = keep.sum(1)
    na = int(counts.max().item()) if keep.numel() else 0
    b, h, _, d = k.shape
    # stable order of kept positions first, per sample; slots past the count are padding
    order = torch.argsort(~keep, dim=1, stable=True)[:, :na]
    valid = torch.arange(na, device=k.device)[None, :] < counts[:, None]
    idx = order[:, None, :, None].expand(b, h, na, d)
    return DecodeState(
        descriptors=region_descriptors(k[:, :, :length], layout),
        nonvisual_k=k.gather(2, idx),
        nonvisual_v=v.gather(2, idx),
        nonvisual_valid=valid,
        built_at=length,
        nonvisual_pos=order.masked_fill(~valid, -1),
        regions_max=int(layout.region_count.max()) if layout.batch_size else 0,
    )


def gather_rows(cache: torch.Tensor, kv_head: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """cache[b, kv_head[h], pos[b, h, ...]] -> (*pos.shape, D), one memcpy-like row gather.

    A KV cache (or a length-slice of one) stores each (batch, head) as contiguous D-wide rows, so the
    cache viewed as a (rows, D) matrix is gathered with index_select, much faster than advanced indexing.
    """
    b, _, _, d = cache.shape
    sb, sh, ss, sd = cache.stride()
    if sd != 1 or ss != d or sh % d or sb % d:
        bi = torch.arange(b, device=cache.device).view(b, *[1] * (pos.dim() - 1))
        hi = kv_head.view(1, -1, *[1] * (pos.dim() - 2))
        return cache[bi, hi, pos]
    base = (torch.arange(b, device=cache.device) * (sb // d)).view(b, *[1] * (pos.dim() - 1))
    base = base + (kv_head * (sh // d)).view(1, -1, *[1] * (pos.dim() - 2))
    rows = (base + pos).reshape(-1)
    flat = cache.as_strided((int(rows.max()) + 1 if rows.numel() else 0, d), (d, 1))
    return flat.index_select(0, rows).view(*pos.shape, d)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    state: DecodeState,
    top_k: int | None,
    q_offset: int,
    scale: float | None = None,
    shared: bool = False,
    routing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of text queries q (B, Hq, n, D) at positions [q_offset, q_offset + n).

    k, v: (B, Hkv, S, D) cache with S >= q_offset + n (extra slots of a static cache are ignored).
    Returns (output (B, Hq, n, D), as every path, selected region indices (B, Hq, n, kk), their scores).
    `routing` (B, Hq, n, kk) overrides the selection (for tests).
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    end = q_offset + n
    qpos = torch.arange(q_offset, end, device=q.device)

    avail = (layout.region_ready[:, None, :] <= qpos[None, :, None]).unsqueeze(1)
    if routing is None and (top_k is None or top_k >= int(avail.sum(-1).max())):
        return _every_region(q, k, v, layout, state, qpos, scale, avail)

    # 1. route
    scores = region_scores(q, state.descriptors)  # (B, Hq, n, R)
    if routing is None:
        sel, sel_scores = select_regions(scores, avail, top_k, hkv, shared=shared)
    else:
        sel = routing
        sel_scores = scores.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf"))

    # 2. gather, once per KV head, the token rows of the union of regions its query heads selected
    r = max(layout.num_regions, 1)
    chosen = selection_table(sel, r).view(b, hkv, g, n, r)  # which head / query picked which region
    union = chosen.any(3).any(2)  # (B, Hkv, R)
    u = int(union.sum(-1).max()) if union.numel() else 0
    union_idx = union.to(torch.int8).topk(u, dim=-1, sorted=False).indices  # (B, Hkv, U), members first
    union_ok = union.gather(-1, union_idx)
    tokens = layout.region_tokens  # (B, R, T), -1 padded
    t = tokens.shape[-1]
    pos = tokens[torch.arange(b, device=q.device)[:, None, None], union_idx]  # (B, Hkv, U, T)
    pos = pos.masked_fill(~union_ok[..., None], -1).reshape(b, hkv, u * t)
    kv_heads = torch.arange(hkv, device=q.device)
    k_sel = gather_rows(k, kv_heads, pos.clamp(min=0))  # (B, Hkv, U*T, D)
    v_sel = gather_rows(v, kv_heads, pos.clamp(min=0))
    picked = chosen.gather(-1, union_idx[:, :, None, None, :].expand(b, hkv, g, n, u))  # (B, Hkv, G, n, U)
    sel_ok = picked[..., None].expand(b, hkv, g, n, u, t).reshape(b, hkv, g, n, u * t)
    sel_ok = sel_ok & (pos >= 0)[:, :, None, None, :]

    # 3. attend over: compact non-visual keys | keys since the state was built (causal) | gathered keys
    recent_k, recent_v = k[:, :, state.built_at : end], v[:, :, state.built_at : end]
    recent_pos = torch.arange(state.built_at, end, device=q.device)
    qg = q.reshape(b, hkv, g * n, d)
    parts = [
        (state.nonvisual_k, state.nonvisual_v, state.nonvisual_valid[:, None, None, None, :]),
        (recent_k, recent_v, (recent_pos[None, :] <= qpos[:, None])[None, None, None]),
        (k_sel, v_sel, sel_ok),
    ]
    logits = [
        ((qg @ kk.transpose(-1, -2)) * scale).view(b, hkv, g, n, -1).masked_fill(~ok, float("-inf"))
        for kk, _, ok in parts
    ]
    sizes = [x.shape[-1] for x in logits]
    probs = torch.cat(logits, -1).to(routing_dtype(q.dtype)).softmax(-1).to(q.dtype).split(sizes, -1)
    out = sum(p.reshape(b, hkv, g * n, -1) @ vv for p, (_, vv, _) in zip(probs, parts))
    return out.view(b, hq, n, d), sel, sel_scores


def _every_region(q, k, v, layout, state, qpos, scale, avail):
    """k >= the available regions: text queries see every real earlier token, i.e. plain causal attention.

    One new token of an unpadded batch sees the whole cache prefix, so it needs no mask at all; the
    trace's scores come from the state's descriptors (never a pass over the cached visual keys).
    """
    b, hq, n = q.shape[:3]
    end = int(qpos[-1]) + 1
    padded = any(s.valid[0] > 0 or s.valid[1] < layout.length for s in layout.samples)
    allowed = None
    if n > 1 or padded:
        kpos = torch.arange(end, device=q.device)
        allowed = (layout.kinds_at(kpos) != PAD)[:, None, None, :] & (kpos[None, :] <= qpos[:, None])[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :end], v[:, :, :end], attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    r = avail.shape[-1]
    every = torch.arange(r, device=q.device).expand(b, hq, n, r)
    every = torch.where(avail.expand(b, hq, n, r), every, torch.full_like(every, -1))
    scores = region_scores(q, state.descriptors) if r else q.new_zeros(b, hq, n, 0)
    return out, every, scores.masked_fill(every < 0, float("-inf"))
