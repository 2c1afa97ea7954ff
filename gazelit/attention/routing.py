"""Routing: region descriptors (mean of keys), query-descriptor scores and top-k region selection.

Descriptors are the mean of each region's keys, exactly the keys attention uses (after RoPE), per KV
head, accumulated in float32 (float64 for float64 keys). Selection is discrete: it runs without gradient;
gradients reach queries and keys only through the attention over the selected tokens.

Query head h reads KV head h // G (G = query heads per KV head, the `repeat_kv` convention of
transformers). With `shared=True` one selection is made per KV head from the scores summed over its G
query heads (fewer distinct bytes to read at decode); by default every query head selects on its own.
"""

from __future__ import annotations

import torch

from gazelit.attention.layout import TEXT, VISUAL, GazeLayout


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def region_descriptors(keys: torch.Tensor, layout: GazeLayout, sample: int | None = None) -> torch.Tensor:
    """Mean key of every region: (B, Hkv, R, D), or (Hkv, R, D) for one `sample`.

    `keys` is (B, Hkv, S, D) with S >= the positions of the regions' tokens. Padding regions are zero.
    """
    samples = range(layout.batch_size) if sample is None else [sample]
    out = []
    for b in samples:
        pos, reg = _visual_positions(layout, b)
        h, _, d = keys.shape[1:]
        acc = torch.zeros(h, max(layout.num_regions, 1), d, dtype=routing_dtype(keys.dtype), device=keys.device)
        if pos.numel():
            acc.index_add_(1, reg, keys[b].index_select(1, pos).to(acc.dtype))
            counts = torch.bincount(reg, minlength=acc.shape[1]).clamp(min=1).to(acc.dtype)
            acc = acc / counts[:, None]
        out.append(acc[:, : layout.num_regions])
    return out[0] if sample is not None else torch.stack(out)


def _visual_positions(layout: GazeLayout, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("visual_positions", b)
    if key not in layout._cache:
        pos = (layout.kind[b] == VISUAL).nonzero().flatten()
        layout._cache[key] = (pos, layout.region[b, pos])
    return layout._cache[key]


@torch.no_grad()
def region_scores(queries: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
    """q . descriptor for grouped heads: queries (..., Hq, N, D), descriptors (..., Hkv, R, D) -> (..., Hq, N, R)."""
    hq, n, d = queries.shape[-3:]
    hkv, r = descriptors.shape[-3:-1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    lead = queries.shape[:-3]
    q = queries.to(descriptors.dtype).reshape(*lead, hkv, (hq // hkv) * n, d)
    s = q @ descriptors.transpose(-1, -2)
    return s.reshape(*lead, hq, n, r)


@torch.no_grad()
def select_regions(
    scores: torch.Tensor, available: torch.Tensor, k: int | None, num_kv_heads: int, shared: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k regions per query head among the available ones.

    scores (..., Hq, N, R); available broadcastable to it (bool; None: every region). Returns (indices, scores) of shape
    (..., Hq, N, kk) with kk = min(k, R); an index is -1 where fewer than k regions are available.
    k=None selects every available region (in index order). Equal scores: the lower region index wins.
    """
    r = scores.shape[-1]
    masked = scores if available is None else scores.masked_fill(~available, float("-inf"))
    hq, n = scores.shape[-3:-1]
    if shared:
        lead = scores.shape[:-3]
        g = hq // num_kv_heads
        masked = masked.reshape(*lead, num_kv_heads, g, n, r).sum(-3)
    if k is None or k >= r:
        kk = r
        top_s, top_i = masked, torch.arange(r, device=scores.device).expand_as(masked)
    else:
        kk = max(int(k), 0)
        top_s, top_i = _top_k_lower_index_first(masked, kk)
    top_i = top_i.masked_fill(top_s == float("-inf"), -1)
    if shared:
        lead = scores.shape[:-3]
        g = hq // num_kv_heads
        top_i = top_i.unsqueeze(-3).expand(*lead, num_kv_heads, g, n, kk).reshape(*lead, hq, n, kk)
        top_s = top_s.unsqueeze(-3).expand(*lead, num_kv_heads, g, n, kk).reshape(*lead, hq, n, kk)
    return top_i, top_s


def _top_k_lower_index_first(scores: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk largest scores of each row, in descending order, equal scores by ascending index, which
    torch.topk does not promise. A stable descending sort keeps exactly that order on every device; for
    a few rows (a decode step) on CPU a plain top-k of kk + 1 is used when it shows no tie, and for a few
    rows of float32 scores one top-k over distinct integer keys gives the same result several times faster
    than the sort (for many short rows, as in training, the sort is faster)."""
    if kk == 0:
        return scores[..., :0], torch.zeros_like(scores[..., :0], dtype=torch.long)
    r = scores.shape[-1]
    few_rows = scores.numel() <= 1024 * r
    if few_rows and kk < r and scores.device.type == "cpu":
        # the kk + 1 largest strictly decreasing: the top kk and their order are unique, whatever the method
        values, index = scores.topk(kk + 1, dim=-1)
        if not bool((values[..., 1:] == values[..., :-1]).any()):
            return values[..., :kk], index[..., :kk]
    if scores.dtype == torch.float32 and few_rows:
        return _top_k_by_unique_key(scores, kk)
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :kk], index[..., :kk]


def _top_k_by_unique_key(scores: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scores: one top-k over int64 keys (the score's bits, made order-preserving, above the
    reversed region index), which are all distinct, so the order is (score desc, index asc) exactly."""
    r = scores.shape[-1]
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes +0.0, equal scores tie
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude, smaller key
    index = torch.arange(r - 1, -1, -1, device=scores.device)
    top = ((bits << 32) | index).topk(kk, dim=-1).indices
    return scores.gather(-1, top), top


def selection_table(indices: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Boolean (..., R) table from indices (..., kk) with -1 for none."""
    table = torch.zeros(*indices.shape[:-1], num_regions + 1, dtype=torch.bool, device=indices.device)
    table.scatter_(-1, indices.clamp(min=-1) % (num_regions + 1), True)
    return table[..., :num_regions]


def available_regions(layout: GazeLayout, positions: torch.Tensor) -> torch.Tensor:
    """(B, N, R) bool: region r is visible to a query at position p (its units all end before p)."""
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(layout.batch_size, -1)
    return layout.region_ready.unsqueeze(1) <= pos.unsqueeze(-1)


@torch.no_grad()
def accumulate_visual_stats(
    stats: dict,
    layout: GazeLayout,
    sample: int,
    positions: torch.Tensor,
    attended: torch.Tensor | None = None,
    heads: int = 1,
) -> None:
    """Add text queries at `positions` (n,) of one sample to `stats` (attended / available visual tokens).

    `attended` (Hq, n) is the selected tokens per head and query, or None for queries that see every
    candidate region (k >= their number; `heads` query heads). Queries without a candidate are skipped.
    """
    sizes = (layout.region_tokens[sample] >= 0).sum(-1)  # (R,)
    ready = layout.region_ready[sample]
    available = ((ready[None, :] <= positions[:, None]) * sizes).sum(-1)  # (n,)
    counted = available > 0
    if not bool(counted.any()):
        return
    heads = attended.shape[0] if attended is not None else heads
    got = available[counted].sum() * heads if attended is None else attended[:, counted].sum()
    stats["attended_visual"] = stats.get("attended_visual", 0) + float(got)
    stats["available_visual"] = stats.get("available_visual", 0) + float(available[counted].sum() * heads)


def accumulate_routing_stats(stats: dict, layout: GazeLayout, routing: torch.Tensor, q_offset: int) -> None:
    """`accumulate_visual_stats` for the text rows of a whole (B, Hq, Lq, kk) routing (reference path)."""
    positions = torch.arange(q_offset, q_offset + routing.shape[2], device=routing.device)
    text = layout.kinds_at(positions) == TEXT  # (B, Lq)
    for b in range(layout.batch_size):
        rows = text[b].nonzero().flatten()
        if rows.numel():
            attended = selected_tokens(layout, b, routing[b][:, rows])  # (Hq, n)
            accumulate_visual_stats(stats, layout, b, positions[rows], attended)


def selected_tokens(layout: GazeLayout, sample: int, indices: torch.Tensor) -> torch.Tensor:
    """Visual tokens covered by selected region indices (..., kk) of one sample -> (...)."""
    sizes = (layout.region_tokens[sample] >= 0).sum(-1)
    return torch.where(indices >= 0, sizes[indices.clamp(min=0)], 0).sum(-1)
