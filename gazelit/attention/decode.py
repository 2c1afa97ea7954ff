"""Cached decode: new text queries against a KV cache, reading only text, context and selected regions.

Per layer, a `DecodeState` is built once, at the first decode step after the visual units are cached:
  - region descriptors (mean keys) of every cached region, computed once and reused at every step;
  - a compact copy of the non-visual cached keys/values (text and context tokens, a few per unit).
Each step then, in a fixed sequence of large ops (index tables made once per state, no per-step loop):
  1. scores the new queries against the descriptors (B, Hq, n, R), takes the top-k regions;
  2. gathers the K/V rows of the selected regions with one index_select each, per query head (per KV head
     with a shared selection), on CPU into a buffer reused by every step (no fresh megabytes per step);
  3. attends over [compact non-visual keys | keys generated since the state was built | gathered keys]
     with one softmax.
No score against the full cache is formed. Equal to the reference given the same selection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from gazelit.attention.layout import PAD, VISUAL, GazeLayout
from gazelit.attention.look import LookSet
from gazelit.attention.reference import with_look_rows
from gazelit.attention.routing import region_descriptors, region_scores, routing_dtype, select_regions


@dataclass
class DecodeState:
    descriptors: torch.Tensor  # (B, Hkv, R, D), routing dtype
    nonvisual_k: torch.Tensor  # (B, Hkv, Na, D): text and context keys before `built_at`
    nonvisual_v: torch.Tensor
    nonvisual_valid: torch.Tensor  # (B, Na) bool (False for padding slots)
    built_at: int  # cache length the state covers; keys at >= built_at are read from the cache
    nonvisual_pos: torch.Tensor | None = None  # (B, Na) cache positions of the compact rows, -1 for padding
    regions_max: int = 0  # regions of the sample with the most (all are available once decoding starts)
    # index tables of the torch path, made once: -inf for padding slots of the compact rows (None: none),
    # real regions (B, 1, 1, R), and every region's token positions (B, R, T) (0 where padded) and validity
    nonvisual_bias: torch.Tensor | None = None
    region_real: torch.Tensor | None = None  # None: every region is real
    region_rows: torch.Tensor | None = None
    region_valid: torch.Tensor | None = None
    regions_full: bool = False  # every region real and of full size: a top-k selection needs no row mask
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
    real = layout.region_ready < GazeLayout.NEVER  # (B, R): False for padding regions
    token_valid = layout.region_tokens >= 0  # (B, R, T): False for the slots of short regions
    return DecodeState(
        descriptors=region_descriptors(k[:, :, :length], layout),
        nonvisual_k=k.gather(2, idx),
        nonvisual_v=v.gather(2, idx),
        nonvisual_valid=valid,
        built_at=length,
        nonvisual_pos=order.masked_fill(~valid, -1),
        regions_max=int(layout.region_count.max()) if layout.batch_size else 0,
        nonvisual_bias=None if bool(valid.all()) else
        torch.zeros(valid.shape, dtype=k.dtype, device=k.device).masked_fill(~valid, float("-inf"))[:, None, None],
        region_real=None if bool(real.all()) else real[:, None, None, :],
        region_rows=layout.region_tokens.clamp(min=0),
        region_valid=token_valid,
        regions_full=bool(real.all() and token_valid.all()),
    )  # fmt: skip


_workspace = threading.local()


def _scratch(count: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """`count` flat CPU buffers of `numel` elements, reused by every decode step of this thread (all layers).

    A step's gathered rows are megabytes; allocated afresh, each step pays the page faults of new memory
    (glibc returns large freed blocks to the OS), which on CPU cost more than the gather itself.
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < count * numel:
        buffers[dtype] = torch.empty(count * numel, dtype=dtype)
    return [buffers[dtype][i * numel : (i + 1) * numel] for i in range(count)]


def gather_rows(
    caches: tuple[torch.Tensor, ...], kv_head: torch.Tensor, pos: torch.Tensor, scratch: bool = False
) -> list[torch.Tensor]:
    """cache[b, kv_head[h], pos[b, h, ...]] -> (*pos.shape, D) for each cache, one memcpy-like row gather.

    A KV cache (or a length-slice of one) stores each (batch, head) as contiguous D-wide rows, so the
    cache viewed as a (rows, D) matrix is gathered with index_select, much faster than advanced indexing.
    The row numbers are computed once for caches laid out alike (keys and values). With `scratch` (CPU,
    no autograd graph that could save the rows) the results live in a per-thread buffer: valid until the
    next scratch gather of this thread.
    """
    b, h, length, d = caches[0].shape
    sb, sh, ss, sd = caches[0].stride()
    if sd != 1 or ss != d or sh % d or sb % d or any(c.stride() != caches[0].stride() for c in caches):
        bi = torch.arange(b, device=pos.device).view(b, *[1] * (pos.dim() - 1))
        hi = kv_head.view(1, -1, *[1] * (pos.dim() - 2))
        return [c[bi, hi, pos] for c in caches]
    base = (torch.arange(b, device=pos.device) * (sb // d)).view(b, *[1] * (pos.dim() - 1))
    rows = (base + (kv_head * (sh // d)).view(1, -1, *[1] * (pos.dim() - 2)) + pos).reshape(-1)
    extent = ((b - 1) * sb + (h - 1) * sh + (length - 1) * ss) // d + 1  # rows the (B, H, S) view spans
    flat = [c.as_strided((extent, d), (d, 1)) for c in caches]
    if not scratch or caches[0].device.type != "cpu":
        return [f.index_select(0, rows).view(*pos.shape, d) for f in flat]
    out = _scratch(len(caches), rows.numel() * d, caches[0].dtype)
    return [torch.index_select(f, 0, rows, out=o.view(-1, d)).view(*pos.shape, d) for f, o in zip(flat, out)]


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
    looks: LookSet | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of text queries q (B, Hq, n, D) at positions [q_offset, q_offset + n).

    k, v: (B, Hkv, S, D) cache with S >= q_offset + n (extra slots of a static cache are ignored).
    Returns (output (B, Hq, n, D), as every path, selected region indices (B, Hq, n, kk), their scores).
    `routing` (B, Hq, n, kk) overrides the selection (static selection, tests). Rows under a look span
    (`looks`) are computed by the reference (`with_look_rows`); the selection returned is the top-k's.

    A step is a fixed, short sequence of large ops (no loop over heads, samples or regions): score the
    descriptors, take the top-k, gather the selected regions' rows with one index_select per K and V from
    index tables made once per state, and attend over [non-visual rows | rows since the state was built |
    selected rows] with one softmax. Rows are gathered per selection group: every query head on its own
    (a region two heads of a KV head chose is gathered twice, the second time from the CPU cache), or every
    KV head with a shared selection.
    """
    return step_with_looks(_decode_attention, q, k, v, layout, state, top_k, q_offset, scale, shared, routing, looks)


def step_with_looks(step, q, k, v, layout, state, top_k, q_offset, scale, shared, routing, looks):
    """A decode step (`step`: the torch or the Triton one, same arguments and results) with the rows under
    look spans recomputed exactly (`with_look_rows`); the selection returned is the step's top-k."""
    out, sel, scores = step(q, k, v, layout, state, top_k, q_offset, scale, shared, routing)
    if looks is not None:
        out = with_look_rows(out, q, k, v, layout, top_k, looks, scale=scale, q_offset=q_offset, shared=shared,
                             routing=routing)  # fmt: skip
    return out, sel, scores


def _decode_attention(q, k, v, layout, state, top_k, q_offset, scale, shared, routing):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    end = q_offset + n
    if routing is None and (top_k is None or top_k >= state.regions_max):
        qpos = torch.arange(q_offset, end, device=q.device)
        avail = (layout.region_ready[:, None, :] <= qpos[None, :, None]).unsqueeze(1)
        return _every_region(q, k, v, layout, state, qpos, scale, avail)

    # 1. route (every real region is available: decoding starts after the last unit)
    scores = region_scores(q, state.descriptors)  # (B, Hq, n, R)
    if routing is None:
        sel, sel_scores = select_regions(scores, state.region_real, top_k, hkv, shared=shared)
    else:
        sel = routing
        sel_scores = scores.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf"))

    # 2. gather the selected regions' rows, per selection group
    by_kv = shared and routing is None  # a given routing may differ between the heads of a KV head
    groups, per = (hkv, g) if by_kv else (hq, 1)
    chosen = sel[:, ::g] if by_kv else sel  # (B, groups, n, kk)
    kk, r, t = chosen.shape[-1], state.region_rows.shape[1], state.region_rows.shape[2]
    # one row gather from the (B * R, T) table of the regions' token positions
    flat = (chosen.clamp(min=0) + (torch.arange(b, device=q.device) * r).view(b, 1, 1, 1)).view(-1)
    rows = state.region_rows.view(b * r, t).index_select(0, flat)  # (B * groups * n * kk, T)
    width = n * kk * t
    kv_head = torch.arange(groups, device=q.device) // (1 if by_kv else g)
    # a graph that could save the gathered rows for backward must get rows of its own
    scratch = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    k_sel, v_sel = gather_rows((k, v), kv_head, rows.view(b, groups, width), scratch)  # (B, groups, width, D)
    ok = None  # which gathered rows each query row may see (None: all)
    if routing is not None or not state.regions_full:  # padded regions, or -1 in the selection
        ok = state.region_valid.view(b * r, t).index_select(0, flat).view(b, groups, n, kk, t) & chosen[..., None].ge(0)
    if n == 1:
        ok = None if ok is None else ok.view(b, groups, 1, width)
    else:  # each query row sees only its own selection
        own = torch.eye(n, dtype=torch.bool, device=q.device)[:, :, None]  # (n, n, 1)
        ok = torch.ones(b, groups, n, kk, t, dtype=torch.bool, device=q.device) if ok is None else ok
        ok = (ok.view(b, groups, 1, n, kk * t) & own).view(b, groups, 1, n, width)
        ok = ok.expand(b, groups, per, n, width).reshape(b, groups, per * n, width)

    # 3. one softmax over: compact non-visual rows | rows since the state was built | selected rows
    qs = q * scale
    qg = qs.reshape(b, hkv, g * n, d)
    recent_k, recent_v = k[:, :, state.built_at : end], v[:, :, state.built_at : end]
    nonvisual = qg @ state.nonvisual_k.transpose(-1, -2)
    if state.nonvisual_bias is not None:
        nonvisual = nonvisual + state.nonvisual_bias
    recent = qg @ recent_k.transpose(-1, -2)
    if n > 1:
        causal = torch.ones(n, recent.shape[-1], dtype=torch.bool, device=q.device).tril(recent.shape[-1] - n)
        recent = recent.masked_fill(~causal.repeat(g, 1), float("-inf"))
    selected = qs.reshape(b, groups, per * n, d) @ k_sel.transpose(-1, -2)
    if ok is not None:
        selected = selected.masked_fill(~ok, float("-inf"))
    logits = torch.cat([x.reshape(b, hq, n, -1) for x in (nonvisual, recent, selected)], -1)
    probs = logits.to(routing_dtype(q.dtype)).softmax(-1).to(q.dtype)
    p_nonvisual, p_recent, p_selected = probs.split([nonvisual.shape[-1], recent.shape[-1], width], -1)
    out = p_nonvisual.reshape(b, hkv, g * n, -1) @ state.nonvisual_v
    out = out + p_recent.reshape(b, hkv, g * n, -1) @ recent_v
    out = out.view(b, hq, n, d) + (p_selected.reshape(b, groups, per * n, width) @ v_sel).view(b, hq, n, d)
    return out, sel, sel_scores


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
    if q.is_cuda:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, :end], v[:, :, :end], attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    else:  # on CPU a grouped matmul is several times faster than SDPA for a few query rows
        hkv, d = k.shape[1], q.shape[-1]
        qg = (q * scale).reshape(b, hkv, (hq // hkv) * n, d)
        logits = (qg @ k[:, :, :end].transpose(-1, -2)).view(b, hq, n, end)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.to(routing_dtype(q.dtype)).softmax(-1).to(q.dtype)
        out = (probs.reshape(b, hkv, (hq // hkv) * n, end) @ v[:, :, :end]).view(b, hq, n, d)
    r = avail.shape[-1]
    every = torch.arange(r, device=q.device).expand(b, hq, n, r)
    every = torch.where(avail.expand(b, hq, n, r), every, torch.full_like(every, -1))
    scores = region_scores(q, state.descriptors) if r else q.new_zeros(b, hq, n, 0)
    return out, every, scores.masked_fill(every < 0, float("-inf"))
