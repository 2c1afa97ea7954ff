"""Cached decode: new text queries against a KV cache, reading only text, context and selected regions.

Per layer, a `DecodeState` is built once, at the first decode step after the visual units are cached:
  - region descriptors (mean keys) of every cached region, computed once and reused at every step;
  - a compact copy of the non-visual cached keys/values (text and context tokens, a few per unit).
Each step then
  1. scores the new queries against the descriptors (B, Hq, n, R), takes the top-k available regions;
  2. gathers the K/V rows of the selected regions' tokens only (per query head, or per KV head when the
     selection is shared by the group);
  3. attends over [compact non-visual keys | keys generated since the state was built | selected keys].
No score against the full cache is formed. Equal to the reference given the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazelit.attention.layout import PAD, VISUAL, GazeLayout
from gazelit.attention.routing import region_descriptors, region_scores, routing_dtype, select_regions


@dataclass
class DecodeState:
    descriptors: torch.Tensor  # (B, Hkv, R, D), routing dtype
    nonvisual_k: torch.Tensor  # (B, Hkv, Na, D): text and context keys before `built_at`
    nonvisual_v: torch.Tensor
    nonvisual_valid: torch.Tensor  # (B, Na) bool (False for padding slots)
    built_at: int  # cache length the state covers; keys at >= built_at are read from the cache


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
    Returns (output (B, n, Hq, D), selected region indices (B, Hq, n, kk), their scores).
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
        return _every_region(q, k, v, layout, qpos, scale, avail)

    # 1. route
    scores = region_scores(q, state.descriptors)  # (B, Hq, n, R)
    if routing is None:
        sel, sel_scores = select_regions(scores, avail, top_k, hkv, shared=shared)
    else:
        sel = routing
        sel_scores = scores.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf"))

    # 2. gather the selected regions' token rows: per KV head when shared, else per query head
    tokens = layout.region_tokens  # (B, R, T)
    t = tokens.shape[-1]
    heads = hkv if shared else hq
    sel_h = sel.view(b, hkv, g, n, -1)[:, :, 0] if shared else sel  # (B, heads, n, kk)
    kk = sel_h.shape[-1]
    pos = tokens[torch.arange(b, device=q.device)[:, None, None, None], sel_h.clamp(min=0)]  # (B,heads,n,kk,T)
    pos = pos.masked_fill((sel_h < 0)[..., None], -1).reshape(b, heads, n, kk * t)
    kv_head = torch.arange(heads, device=q.device) // (1 if shared else g)
    k_sel = gather_rows(k, kv_head, pos.clamp(min=0))  # (B, heads, n, N, D)
    v_sel = gather_rows(v, kv_head, pos.clamp(min=0))
    sel_valid = pos >= 0

    # 3. attend: compact non-visual keys, keys since the state was built (causal), selected keys
    recent_k, recent_v = k[:, :, state.built_at : end], v[:, :, state.built_at : end]
    a_k = torch.cat([state.nonvisual_k, recent_k], 2)  # (B, Hkv, Na + Nr, D)
    a_v = torch.cat([state.nonvisual_v, recent_v], 2)
    recent_pos = torch.arange(state.built_at, end, device=q.device)
    a_valid = torch.cat(
        [
            state.nonvisual_valid[:, None, :].expand(b, n, -1),
            (recent_pos[None, :] <= qpos[:, None])[None].expand(b, n, -1),
        ],
        -1,
    )  # (B, n, Na + Nr)
    qg = q.reshape(b, hkv, g * n, d)
    s_a = (qg @ a_k.transpose(-1, -2)).view(b, hkv, g, n, -1) * scale
    s_a = s_a.masked_fill(~a_valid[:, None, None], float("-inf"))
    if shared:
        s_b = torch.einsum("bhgnd,bhnsd->bhgns", q.view(b, hkv, g, n, d), k_sel) * scale
        s_b = s_b.masked_fill(~sel_valid[:, :, None], float("-inf"))
    else:
        s_b = torch.einsum("bhnd,bhnsd->bhns", q, k_sel).view(b, hkv, g, n, -1) * scale
        s_b = s_b.masked_fill(~sel_valid.view(b, hkv, g, n, -1), float("-inf"))
    probs = torch.cat([s_a, s_b], -1).to(routing_dtype(q.dtype)).softmax(-1).to(q.dtype)
    na = s_a.shape[-1]
    out = (probs[..., :na].reshape(b, hkv, g * n, -1) @ a_v).view(b, hkv, g, n, d)
    if shared:
        out = out + torch.einsum("bhgns,bhnsd->bhgnd", probs[..., na:], v_sel)
    else:
        out = out + torch.einsum("bhns,bhnsd->bhnd", probs[..., na:].reshape(b, hq, n, -1), v_sel).view(
            b, hkv, g, n, d
        )
    out = out.reshape(b, hq, n, d).transpose(1, 2)
    return out, sel, sel_scores


def _every_region(q, k, v, layout, qpos, scale, avail):
    """k >= the available regions: text queries see every real earlier token, i.e. plain causal attention."""
    end = int(qpos[-1]) + 1
    kpos = torch.arange(end, device=q.device)
    allowed = (layout.kinds_at(kpos) != PAD)[:, None, None, :] & (kpos[None, :] <= qpos[:, None])[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :end], v[:, :, :end], attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    b, hq, n = q.shape[:3]
    r = avail.shape[-1]
    every = torch.arange(r, device=q.device).expand(b, hq, n, r)
    every = torch.where(avail.expand(b, hq, n, r), every, torch.full_like(every, -1))
    scores = region_scores(q, region_descriptors(k[:, :, :end], layout)) if r else q.new_zeros(b, hq, n, 0)
    return out.transpose(1, 2), every, scores.masked_fill(every < 0, float("-inf"))
