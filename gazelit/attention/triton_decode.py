"""Fused gaze decode for CUDA: one new text token per sample, routed and attended in Triton.

Three launches per layer and step, each reading what it needs once:

1. `_route_kernel`, one program per (sample, KV head): scores of its G query heads against every region
   descriptor (the descriptors are read once), then the top-k per query head, or per KV head from the
   scores summed over its G heads (`shared`), by k passes over the scores it just wrote. Ties go to the
   lower region index, as on every other path.
2. `_attend_kernel`, programs (sample, KV head, split): the work of a KV head is a list of items, the
   text and context rows in blocks, then the selected regions (its G heads' selections; a region two heads
   chose is read once and masked per head). Splits take every SPLITS-th item, so a batch of 1 still fills
   the GPU (as FlashDecoding splits the keys). Each split keeps a running max, sum and weighted values.
3. `_combine_kernel`: merges the splits of every query head.

Rows are read in the cache's dtype and multiplied in float32 (a decode step is bound by memory, not by
arithmetic; float32 products also keep the result closer to the exact one than half-precision products).

Equal to `decode.decode_attention` (the torch path) given the same selection; tested against it with
`TRITON_INTERPRET=1` on CPU tensors. Several new tokens per sample at once (a multi-token step) go to the
torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gazelit.attention.decode import DecodeState, decode_attention, step_with_looks
from gazelit.attention.layout import GazeLayout
from gazelit.attention.look import LookSet

__all__ = ["FUSED_DTYPES", "fused_decode_attention", "fused_route"]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _kv_head_queries(q_ptr, pid, HKV, s_qb, s_qh, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     D_PAD: tl.constexpr):  # fmt: skip
    """For program `pid` = (sample, KV head): its sample, KV head, query-head and dim offsets with their
    masks, and the (G_PAD, D_PAD) queries of its G query heads in float32 (padding rows zero)."""
    b = pid // HKV
    kvh = pid % HKV
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    heads = kvh * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    return q.to(tl.float32), b, kvh, g, d, gmask, dmask, heads


@triton.jit
def _route_kernel(
    q_ptr, desc_ptr, ready_ptr, scores_ptr, sel_ptr, sel_score_ptr,
    qpos, R, KK, HKV,
    s_qb, s_qh, s_db, s_dh, s_dr, s_rb,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    SHARED: tl.constexpr, GIVEN: tl.constexpr,
):  # fmt: skip
    q, b, kvh, g, d, gmask, dmask, heads = _kv_head_queries(q_ptr, tl.program_id(0), HKV, s_qb, s_qh, G, G_PAD, D, D_PAD)
    row = (b * HKV * G + heads) * R  # scores (B, Hq, R), contiguous

    # pass 1: q . descriptor of every available region (-inf elsewhere)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < R
        desc = tl.load(desc_ptr + b * s_db + kvh * s_dh + r[:, None] * s_dr + d[None, :],
                       mask=rmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(desc), input_precision="ieee")  # (G_PAD, BLOCK_R), float32
        ready = tl.load(ready_ptr + b * s_rb + r, mask=rmask, other=0)
        avail = rmask & (ready <= qpos)
        s = tl.where(avail[None, :], s, float("-inf"))
        if SHARED and not GIVEN:  # one selection per KV head, from the scores summed over its heads
            total = tl.sum(tl.where(gmask[:, None], s, 0.0), 0)
            s = tl.zeros([G_PAD, BLOCK_R], dtype=tl.float32) + total[None, :]
        tl.store(scores_ptr + row[:, None] + r[None, :], s, mask=gmask[:, None] & rmask[None, :])
    tl.debug_barrier()

    # pass 2: the j-th pick is the best (score, -index) strictly after the (j-1)-th in that order
    out = (b * HKV * G + heads) * KK
    prev_s = tl.full([G_PAD], float("inf"), tl.float32)
    prev_i = tl.full([G_PAD], -1, tl.int32)
    for j in range(KK):
        if GIVEN:
            pick = tl.load(sel_ptr + out + j, mask=gmask, other=-1)
            score = tl.load(scores_ptr + row + tl.maximum(pick, 0), mask=gmask, other=0.0)
            tl.store(sel_score_ptr + out + j, tl.where(pick >= 0, score, float("-inf")), mask=gmask)
        else:
            best_s = tl.full([G_PAD], float("-inf"), tl.float32)
            best_i = tl.full([G_PAD], 0, tl.int32)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                rmask = r < R
                s = tl.load(scores_ptr + row[:, None] + r[None, :], mask=gmask[:, None] & rmask[None, :],
                            other=float("-inf"))  # fmt: skip
                after = (s < prev_s[:, None]) | ((s == prev_s[:, None]) & (r[None, :] > prev_i[:, None]))
                cand = tl.where(after & (s > float("-inf")), s, float("-inf"))
                block_s = tl.max(cand, 1)
                block_i = (tl.argmax(cand, 1, tie_break_left=True) + r0).to(tl.int32)
                take = block_s > best_s  # blocks come in index order: an equal score keeps the earlier
                best_s = tl.where(take, block_s, best_s)
                best_i = tl.where(take, block_i, best_i)
            found = best_s > float("-inf")
            tl.store(sel_ptr + out + j, tl.where(found, best_i, -1), mask=gmask)
            tl.store(sel_score_ptr + out + j, best_s, mask=gmask)
            prev_s = tl.where(found, best_s, prev_s)
            prev_i = tl.where(found, best_i, prev_i)


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, sel_ptr, tokens_ptr, nv_pos_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    scale, built_at, end, NA, T, R, KK, HKV, SPLITS,
    s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_tb, s_tr, s_nb,
    G: tl.constexpr, G_PAD: tl.constexpr, K_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    q, b, kvh, g, d, gmask, dmask, heads = _kv_head_queries(q_ptr, pid, HKV, s_qb, s_qh, G, G_PAD, D, D_PAD)
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, K_PAD)
    picks = tl.load(sel_ptr + (b * HKV * G + heads)[:, None] * KK + j[None, :],
                    mask=gmask[:, None] & (j < KK)[None, :], other=-1)  # (G_PAD, K_PAD) region indices
    order = g[:, None] * KK + j[None, :]  # an entry's place in the item list

    text_rows = NA + (end - built_at)
    text_items = tl.cdiv(text_rows, BLOCK_T)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    for item in range(split, text_items + G * KK, SPLITS):
        is_text = tl.full([1], item, tl.int32) < text_items  # a (1,) block: it broadcasts everywhere
        # text and context rows: the compact list of earlier ones, then every position since built_at
        idx = item * BLOCK_T + t
        in_list = idx < NA
        listed = tl.load(nv_pos_ptr + b * s_nb + idx, mask=is_text & in_list, other=-1)
        text_pos = tl.where(in_list, listed, built_at + idx - NA)
        text_ok = (in_list & (listed >= 0)) | (~in_list & (idx < text_rows))
        # a selected region: entry e of the (G, KK) selections, read once however many heads chose it
        e = tl.minimum(tl.maximum(item - text_items, 0), G * KK - 1)
        region = tl.load(sel_ptr + (b * HKV * G + kvh * G + e // KK) * KK + e % KK)
        repeat = tl.max(tl.max(((order < e) & (picks == region)).to(tl.int32), 1), 0)  # an earlier entry has it
        region = tl.where(is_text | (repeat > 0), -1, region)
        region_pos = tl.load(tokens_ptr + b * s_tb + tl.maximum(region, 0) * s_tr + t,
                             mask=(t < T) & (region >= 0), other=-1)  # fmt: skip
        chose = tl.max((picks == region).to(tl.int32), 1) > 0  # (G_PAD,) heads that selected it
        pos = tl.where(is_text, text_pos, region_pos)
        ok = (is_text & text_ok) | (~is_text & (region_pos >= 0))
        head_ok = gmask & (is_text | chose)

        keys = tl.load(k_ptr + b * s_kb + kvh * s_kh + pos[:, None] * s_ks + d[None, :],
                       mask=ok[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee") * scale  # (G_PAD, BLOCK_T)
        s = tl.where(head_ok[:, None] & ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alive = m_new > float("-inf")
        alpha = tl.where(alive, tl.exp(m_i - tl.where(alive, m_new, 0.0)), 1.0)
        p = tl.where(alive[:, None], tl.exp(s - tl.where(alive, m_new, 0.0)[:, None]), 0.0)
        values = tl.load(v_ptr + b * s_vb + kvh * s_vh + pos[:, None] * s_vs + d[None, :],
                         mask=ok[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, values.to(tl.float32), input_precision="ieee")
        m_i = m_new

    base = (pid * SPLITS + split) * G + g  # parts (B*Hkv, SPLITS, G[, D])
    tl.store(part_m_ptr + base, m_i, mask=gmask)
    tl.store(part_l_ptr + base, l_i, mask=gmask)
    tl.store(part_acc_ptr + base[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _combine_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, HKV, SPLITS, s_ob, s_oh,
                    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)  # one query head of one sample
    b = pid // (HKV * G)
    h = pid % (HKV * G)
    kvh = h // G
    g = h % G
    sp = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = sp < SPLITS
    base = ((b * HKV + kvh) * SPLITS + sp) * G + g
    m = tl.load(part_m_ptr + base, mask=smask, other=float("-inf"))
    l = tl.load(part_l_ptr + base, mask=smask, other=0.0)
    acc = tl.load(part_acc_ptr + base[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :], other=0.0)
    top = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + b * s_ob + h * s_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(int(n), 1)))


def _splits(device: torch.device, programs: int, items: int) -> int:
    """Splits per KV head so that about two programs run per multiprocessor (batch 1 fills the GPU)."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(items, triton.cdiv(2 * units, max(programs, 1))))


def fused_decode_attention(
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
    """`decode.decode_attention` in three Triton launches: same arguments, same (output, selection, scores).
    Rows under a look span are computed by the reference, as on the torch path."""
    return step_with_looks(_fused, q, k, v, layout, state, top_k, q_offset, scale, shared, routing, looks)


def _fused(q, k, v, layout, state, top_k, q_offset, scale, shared, routing):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    r = layout.num_regions
    if (n != 1 or r == 0 or q.dtype not in FUSED_DTYPES
            or (routing is None and (top_k is None or top_k >= state.regions_max))):  # fmt: skip
        return decode_attention(q, k, v, layout, state, top_k, q_offset, scale, shared, routing)
    scale = d**-0.5 if scale is None else scale
    kk = routing.shape[-1] if routing is not None else min(int(top_k), r)
    if kk == 0:
        return decode_attention(q, k, v, layout, state, top_k, q_offset, scale, shared, routing)
    tables = state.tables(layout)
    q3 = q[:, :, 0]  # (B, Hq, D)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    k, v = _rows(k), _rows(v)
    dev = q.device
    sel, sel_scores = fused_route(q3, state, tables, q_offset, kk, g, shared, routing)
    g_pad, d_pad = _pow2(g), _pow2(d)

    end = q_offset + 1
    na = tables.nonvisual_pos.shape[1]
    t = tables.tokens.shape[-1]
    block_t = _pow2(t)
    items = triton.cdiv(na + end - state.built_at, block_t) + g * kk
    splits = _splits(dev, b * hkv, items)
    part_acc = torch.empty(b * hkv, splits, g, d, device=dev, dtype=torch.float32)
    part_m = torch.empty(b * hkv, splits, g, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    _attend_kernel[(b * hkv, splits)](
        q3, k, v, sel, tables.tokens, tables.nonvisual_pos, part_acc, part_m, part_l,
        scale, state.built_at, end, na, t, r, kk, hkv, splits,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        tables.tokens.stride(0), tables.tokens.stride(1), tables.nonvisual_pos.stride(0),
        G=g, G_PAD=g_pad, K_PAD=_pow2(kk, 1), D=d, D_PAD=d_pad, BLOCK_T=block_t,
    )  # fmt: skip
    out = torch.empty(b, hq, 1, d, device=dev, dtype=q.dtype)
    _combine_kernel[(b * hq,)](
        part_acc, part_m, part_l, out, hkv, splits, out.stride(0), out.stride(1),
        G=g, D=d, D_PAD=_pow2(d, 1), S_PAD=_pow2(splits, 1),
    )  # fmt: skip
    return out, sel.long()[:, :, None], sel_scores[:, :, None]


def fused_route(q3, state: DecodeState, tables, q_offset: int, kk: int, g: int, shared: bool,
                routing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing launch alone: (B, Hq, kk) int32 region indices and their float32 scores for queries
    q3 (B, Hq, D) (the given `routing` (B, Hq, 1, kk) instead, with its scores)."""
    b, hq, d = q3.shape
    hkv = hq // g
    r = state.descriptors.shape[2]
    dev = q3.device
    scores = torch.empty(b, hq, r, device=dev, dtype=torch.float32)
    sel = (routing[:, :, 0].to(torch.int32).contiguous() if routing is not None
           else torch.empty(b, hq, kk, device=dev, dtype=torch.int32))  # fmt: skip
    sel_scores = torch.empty(b, hq, kk, device=dev, dtype=torch.float32)
    desc = state.descriptors
    _route_kernel[(b * hkv,)](
        q3, desc, tables.ready, scores, sel, sel_scores, q_offset, r, kk, hkv,
        q3.stride(0), q3.stride(1), desc.stride(0), desc.stride(1), desc.stride(2), tables.ready.stride(0),
        G=g, G_PAD=_pow2(g), D=d, D_PAD=_pow2(d), BLOCK_R=min(_pow2(r), 64), SHARED=shared,
        GIVEN=routing is not None,
    )  # fmt: skip
    return sel, sel_scores


def _rows(cache: torch.Tensor) -> torch.Tensor:
    """The kernels step over positions by stride and read each row's D values contiguously."""
    return cache if cache.stride(-1) == 1 else cache.contiguous()
