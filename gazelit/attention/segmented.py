"""CPU fast path: Gaze Attention as a few fused flash-attention calls per sample, exact forward and backward.

Every query row sees a *window* of keys ending at itself, minus unselected visual tokens for routed text:
  visual rows and unrouted text rows: keys [first real token, row]            (dense causal)
  context rows of unit u:             keys [start of u, row]                  (own unit only)
  routed text rows:                   keys [first real token, row], visual keys only in selected regions

`plan_pieces` cuts each sample's rows into runs with the same rule and each run into pieces; a piece is
one call of torch's CPU flash-attention kernel (`aten._scaled_dot_product_flash_attention_for_cpu`,
native GQA, additive mask, returns the log-sum-exp its backward needs):
  causal: a run that starts where its keys start: one `is_causal` call, no mask (the bulk of the work);
  window: `chunk` rows of a run whose keys start earlier, with a lower-right causal mask shared by heads;
  routed: `chunk` rows of routed text, with a per-head mask built from the top-k selection.
Each row belongs to exactly one piece, so outputs need no merging and the backward is one kernel call per
piece with the saved log-sum-exp. Routed masks are rebuilt in backward from the saved top-k indices.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from gazelit.attention.layout import TEXT, GazeLayout
from gazelit.attention.look import LookSet
from gazelit.attention.reference import with_look_rows
from gazelit.attention.routing import (
    accumulate_visual_stats,
    region_descriptors,
    region_scores,
    select_regions,
    selected_tokens,
    selection_table,
)

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Piece:
    sample: int
    q0: int  # query positions [q0, q1)
    q1: int
    k0: int  # key positions [k0, k1)
    k1: int
    mode: str  # "causal" | "window" | "routed"
    # rows [a, b) this piece computes but a later piece overrides (a causal span running through context
    # rows or a short routed run): their output is replaced and their gradient is zeroed here
    overridden: tuple[tuple[int, int], ...] = ()


def plan_pieces(
    layout: GazeLayout, q_offset: int, q_len: int, kv_len: int, top_k: int | None, chunk: int = 128
) -> list[Piece]:
    """Pieces covering every real query row in [q_offset, q_offset + q_len) exactly once."""
    key = ("pieces", q_offset, q_len, kv_len, top_k, chunk)
    if key in layout._cache:
        return layout._cache[key]
    pieces: list[Piece] = []
    for b, s in enumerate(layout.samples):
        lo, hi = s.valid
        if hi < layout.length and q_offset + q_len > layout.length:
            raise ValueError(
                f"sample {b} is right-padded ({hi} < {layout.length}) but tokens are appended after the layout; "
                "pad on the left for generation"
            )
        end = hi if hi < layout.length else kv_len
        rows = (max(q_offset, lo), min(q_offset + q_len, end))
        ready = sorted(s.region_ready)
        runs: list[tuple[int, int, str, int]] = []  # (start, end, rule, key start)

        def add(a: int, z: int, rule: str, key_start: int) -> None:
            a, z = max(a, rows[0]), min(z, rows[1])
            if a >= z:
                return
            if runs and runs[-1][1] == a and runs[-1][2] == rule and runs[-1][3] == key_start:
                runs[-1] = (runs[-1][0], z, rule, key_start)
            else:
                runs.append((a, z, rule, key_start))

        def add_text(a: int, z: int) -> None:
            # A text run sees the plain causal window only if every visual token before it is in a
            # candidate region (no frame group still open across it) and k covers all candidates.
            # Both are constant over the run: regions become ready only at unit ends.
            hidden = any(u.start < a and r > a for u, r in zip(s.units, s.unit_ready))
            routed = hidden or (top_k is not None and bisect.bisect_right(ready, a) > top_k)
            add(a, z, "routed" if routed else "window", lo)

        prev = lo
        for u, u_end in zip(s.units, s.unit_end):
            add_text(prev, u.start)
            add(u.start, u.start + u.num_visual, "window", lo)
            add(u.start + u.num_visual, u_end, "window", u.start)
            prev = u_end
        add_text(prev, end)

        pieces += _pieces_for_runs(b, runs, lo, chunk)
    layout._cache[key] = pieces
    return pieces


def _pieces_for_runs(b: int, runs: list[tuple[int, int, str, int]], lo: int, chunk: int) -> list[Piece]:
    """Pieces for one sample's runs (start, end, rule, key start).

    The dense runs from the first real token on become one causal call, running through short non-dense
    runs between them (context rows, a few routed text rows), which get their own pieces that override
    those rows. Everything else is cut into `chunk`-row pieces with masks.
    """
    def dense(run) -> bool:
        return run[2] == "window" and run[3] == lo

    span_end, bridged, inside = None, [], []
    if runs and dense(runs[0]) and runs[0][0] == lo:
        span_end = runs[0][1]
        for run in runs[1:]:
            if dense(run):
                span_end, inside = run[1], inside + bridged
                bridged = []
            elif run[1] - run[0] <= chunk:
                bridged.append(run)
            else:
                break
    pieces: list[Piece] = []
    if span_end is not None:
        pieces.append(Piece(b, lo, span_end, lo, span_end, "causal", tuple((r[0], r[1]) for r in inside)))
    for run in runs:
        a, z, rule, ks = run
        if span_end is not None and z <= span_end and (dense(run) or run in inside):
            if dense(run):
                continue  # computed by the span
        elif rule == "window" and a == ks:
            pieces.append(Piece(b, a, z, a, z, "causal"))
            continue
        for c in range(a, z, chunk):
            d = min(z, c + chunk)
            pieces.append(Piece(b, c, d, ks, d, rule))
    return pieces


def _window_mask(rows: int, keys: int, dtype, device) -> torch.Tensor:
    """(1, 1, rows, keys) additive mask: row i sees keys up to keys - rows + i."""
    m = torch.zeros(rows, keys, dtype=dtype, device=device)
    m[:, keys - rows :] = torch.full((rows, rows), float("-inf"), dtype=dtype, device=device).triu(1)
    return m.view(1, 1, rows, keys)


def _routed_mask(layout: GazeLayout, p: Piece, indices: torch.Tensor, dtype, device) -> torch.Tensor:
    """(1, Hq, rows, keys) additive mask for routed text rows from top-k indices (Hq, rows, kk).

    A small (Hq, rows, R + 1) table of 0 / -inf per region (column R, always 0, stands for non-visual
    keys) is written out to the keys span by span (`_key_spans`): non-visual spans are zero-filled, a unit
    whose grid the regions tile exactly is one broadcast copy, other units gather their columns. Then
    the causal corner (only the last `rows` keys can lie after a row) is added in place.
    """
    hq, rows = indices.shape[:2]
    keys = p.k1 - p.k0
    r = max(layout.num_regions, 1)
    table = torch.nn.functional.pad(selection_table(indices, r), (0, 1), value=True)  # (Hq, rows, R + 1)
    per_region = torch.where(
        table, torch.zeros((), dtype=dtype, device=device), torch.full((), float("-inf"), dtype=dtype, device=device)
    )
    mask = torch.empty(hq, rows, keys, dtype=dtype, device=device)
    rh, rw = layout.region_shape.h, layout.region_shape.w
    for span in _key_spans(layout, p, device):
        if span[0] == "zero":
            mask[:, :, span[1] : span[2]] = 0
        elif span[0] == "tiles":
            _, a, base, gh, gw = span
            nrh, nrw = gh // rh, gw // rw
            # one grid row per region row (columns repeated rw times), then that row repeated rh times:
            # broadcast copies with a wide contiguous inner dimension, several times faster than a gather
            row = per_region[:, :, base : base + nrh * nrw].view(hq, rows, nrh, nrw, 1).expand(-1, -1, -1, -1, rw)
            row = row.reshape(hq, rows, nrh, 1, gw)
            mask[:, :, a : a + gh * gw].view(hq, rows, nrh, rh, gw).copy_(row.expand(-1, -1, -1, rh, -1))
        else:
            _, a, z, column = span
            mask[:, :, a:z] = per_region.index_select(-1, column)
    mask[:, :, keys - rows :] += torch.full((rows, rows), float("-inf"), dtype=dtype, device=device).triu(1)
    return mask.unsqueeze(0)


def _key_spans(layout: GazeLayout, p: Piece, device) -> list[tuple]:
    """The key range of a routed piece as spans (offsets relative to p.k0), cached per layout:
    ("zero", a, z) for non-visual keys, ("tiles", a, region base, gh, gw) for a unit tiled exactly by
    its regions, ("columns", a, z, region index per key) for anything else."""
    cache_key = ("routed_spans", p.sample, p.k0, p.k1)
    if cache_key in layout._cache:
        return layout._cache[cache_key]
    rh, rw = layout.region_shape.h, layout.region_shape.w
    r = max(layout.num_regions, 1)
    spans: list[tuple] = []
    at = p.k0
    for u in layout.samples[p.sample].units:
        a, z = u.start, u.start + u.num_visual
        if z <= p.k0 or a >= p.k1:
            continue
        if a < p.k0 or z > p.k1:  # a unit cut by the key range: per-column gather for the whole range
            region = layout.regions_at(torch.arange(p.k0, p.k1, device=device))[p.sample]
            spans = [("columns", 0, p.k1 - p.k0, region.masked_fill(region < 0, r))]
            at = p.k1
            break
        if at < a:
            spans.append(("zero", at - p.k0, a - p.k0))
        gh, gw = u.grid
        if gh % rh == 0 and gw % rw == 0:
            spans.append(("tiles", a - p.k0, int(layout.region[p.sample, a]), gh, gw))
        else:
            spans.append(("columns", a - p.k0, z - p.k0, layout.region[p.sample, a:z].clone()))
        at = z
    if at < p.k1:
        spans.append(("zero", at - p.k0, p.k1 - p.k0))
    layout._cache[cache_key] = spans
    return spans


def _route_piece(q_rows, descriptors, layout, p, top_k, num_kv_heads, shared):
    ready = layout.region_ready[p.sample]
    pos = torch.arange(p.q0, p.q1, device=q_rows.device)
    avail = ready[None, :] <= pos[:, None]  # (rows, R)
    scores = region_scores(q_rows, descriptors)  # (Hq, rows, R)
    return select_regions(scores, avail, top_k, num_kv_heads, shared=shared)[0]


def _uncovered_rows(pieces: list[Piece], batch: int, q_offset: int, q_len: int) -> list[tuple[int, slice]]:
    """Query rows no piece computes (padding), per sample, as (sample, slice of local rows)."""
    spans: dict[int, tuple[int, int]] = {}
    for p in pieces:
        a, z = spans.get(p.sample, (p.q0, p.q1))
        spans[p.sample] = (min(a, p.q0), max(z, p.q1))
    out = []
    for b in range(batch):
        a, z = spans.get(b, (q_offset, q_offset))
        if a > q_offset:
            out.append((b, slice(0, a - q_offset)))
        if z < q_offset + q_len:
            out.append((b, slice(max(z, q_offset) - q_offset, q_len)))
    return out


class _SegmentedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, pieces, q_offset, top_k, shared, scale, stats, routing):
        # q (B, Hq, Lq, D) possibly strided; k, v (B, Hkv, S, D)
        b_, hq, lq, d = q.shape
        out = q.new_empty(b_, lq, hq, d)  # HF layout; written through a transposed view
        out_t = out.transpose(1, 2)
        for b, rows in _uncovered_rows(pieces, b_, q_offset, lq):  # padding rows: zero
            out_t[b, :, rows] = 0
        descriptors = {}
        lses, routes = [], []
        for p in pieces:
            qs = q[p.sample : p.sample + 1, :, p.q0 - q_offset : p.q1 - q_offset]
            ks, vs = k[p.sample : p.sample + 1, :, p.k0 : p.k1], v[p.sample : p.sample + 1, :, p.k0 : p.k1]
            mask, route = None, None
            if p.mode == "window":
                mask = _window_mask(p.q1 - p.q0, p.k1 - p.k0, q.dtype, q.device)
            elif p.mode == "routed":
                if routing is not None:
                    route = routing[p.sample, :, p.q0 - q_offset : p.q1 - q_offset]
                else:
                    if p.sample not in descriptors:
                        descriptors[p.sample] = region_descriptors(k, layout, sample=p.sample)
                    route = _route_piece(qs[0], descriptors[p.sample], layout, p, top_k, k.shape[1], shared)
                mask = _routed_mask(layout, p, route, q.dtype, q.device)
                if stats is not None:
                    positions = torch.arange(p.q0, p.q1, device=q.device)
                    accumulate_visual_stats(stats, layout, p.sample, positions, selected_tokens(layout, p.sample, route))
            o, lse = _FWD(qs, ks, vs, 0.0, p.mode == "causal", attn_mask=mask, scale=scale)
            out_t[p.sample : p.sample + 1, :, p.q0 - q_offset : p.q1 - q_offset] = o
            lses.append(lse)
            routes.append(route if route is not None else lse.new_empty(0, dtype=torch.long))
        ctx.save_for_backward(q, k, v, out, *lses, *routes)
        ctx.layout, ctx.pieces, ctx.q_offset, ctx.scale = layout, pieces, q_offset, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *rest = ctx.saved_tensors
        n = len(ctx.pieces)
        lses, routes = rest[:n], rest[n:]
        layout, off = ctx.layout, ctx.q_offset
        grad_t = grad_out.transpose(1, 2)
        out_t = out.transpose(1, 2)
        dq = torch.empty_like(q)
        for b, rows in _uncovered_rows(ctx.pieces, q.shape[0], off, q.shape[2]):
            dq[b, :, rows] = 0
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for p, lse, route in zip(ctx.pieces, lses, routes):
            b, rows = slice(p.sample, p.sample + 1), slice(p.q0 - off, p.q1 - off)
            keys = slice(p.k0, p.k1)
            mask = None
            if p.mode == "window":
                mask = _window_mask(p.q1 - p.q0, p.k1 - p.k0, q.dtype, q.device)
            elif p.mode == "routed":
                mask = _routed_mask(layout, p, route, q.dtype, q.device)
            grad_rows = grad_t[b, :, rows]
            if p.overridden:  # rows a later piece recomputes: no gradient through this piece
                # a fresh copy: the incoming gradient is the caller's and is never written
                grad_rows = grad_rows.clone(memory_format=torch.contiguous_format)
                for a, z in p.overridden:
                    grad_rows[:, :, a - p.q0 : z - p.q0] = 0
            else:
                grad_rows = grad_rows.contiguous()
            gq, gk, gv = _BWD(
                grad_rows,
                q[b, :, rows],
                k[b, :, keys],
                v[b, :, keys],
                out_t[b, :, rows],
                lse,
                0.0,
                p.mode == "causal",
                attn_mask=mask,
                scale=ctx.scale,
            )
            dq[b, :, rows] = gq
            dk[b, :, keys] += gk
            dv[b, :, keys] += gv
        return dq, dk, dv, None, None, None, None, None, None, None, None


def segmented_attention(
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
    chunk: int = 128,
) -> torch.Tensor:
    """Exact Gaze Attention on CPU (the paths' common signature; see gazelit.attention). Returns
    (B, Hq, Lq, D), a view of a (B, Lq, Hq, D) buffer, so transformers' layout costs no copy. Padding rows
    are zero. `chunk`: query rows per masked piece. Rows under a look span (`looks`) are recomputed by the
    reference (`with_look_rows`)."""
    if q.device.type != "cpu":
        raise RuntimeError("segmented_attention runs on CPU; use the flex path on GPU")
    pieces = plan_pieces(layout, q_offset, q.shape[2], k.shape[2], top_k, chunk)
    if stats is not None:  # text rows that see every candidate region (routed rows count in forward)
        for p in pieces:
            if p.mode != "routed":
                positions = torch.arange(p.q0, p.q1, device=q.device)
                keep = layout.kinds_at(positions)[p.sample] == TEXT
                for a, z in p.overridden:  # counted by the piece that overrides them
                    keep[a - p.q0 : z - p.q0] = False
                text = positions[keep]
                accumulate_visual_stats(stats, layout, p.sample, text, heads=q.shape[1])
    out = _SegmentedAttention.apply(q, k, v, layout, pieces, q_offset, top_k, shared, scale, stats, routing)
    return with_look_rows(out.transpose(1, 2), q, k, v, layout, top_k, looks, scale=scale, q_offset=q_offset,
                          shared=shared, routing=routing)  # fmt: skip
