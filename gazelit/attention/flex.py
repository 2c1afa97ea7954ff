"""GPU fast path: FlexAttention with a BlockMask built from the routing indices and an exact mask_mod.

The block lists (which 128x128 tiles a compiled kernel visits) are a superset of the exact mask, built
without evaluating the mask on every (query, key) pair:
  a query block holding visual, context or padding rows visits every tile up to its diagonal;
  a query block holding text rows visits tiles that hold a non-visual key or a token of a region that
  one of its rows selected (union over its rows and, per head, from the top-k indices).
Tiles strictly below the diagonal of a query block of visual rows, whose keys are all real, are *full*
(no mask_mod call). Everything else is *partial*: the exact `mask_mod` decides per element, so the result
equals the reference whatever the tiling.

Eager (and CPU) FlexAttention ignores the block lists and evaluates mask_mod densely; it has no CPU
backward. Compiled on CUDA it skips unlisted tiles, which is where the savings come from. CPU tests check
the forward against the reference and that the block lists cover the exact mask.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from gazelit.attention.layout import CONTEXT, PAD, TEXT, VISUAL, GazeLayout
from gazelit.attention.look import LookSet
from gazelit.attention.reference import with_look_rows
from gazelit.attention.routing import (
    accumulate_visual_stats,
    available_regions,
    region_descriptors,
    region_scores,
    select_regions,
    selection_table,
)

BLOCK = 128
_compiled_flex = None


def _flex():
    """flex_attention compiled once per process. Shapes are static (`dynamic=False`): pad batches to a few
    lengths (`data.length_buckets`) and it compiles once per bucket. Past torch's recompile limit dynamo
    would run FlexAttention eagerly, which on CUDA materialises the full score matrix; here that raises
    instead (`fail_on_recompile_limit_hit`)."""
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo

        torch._dynamo.config.fail_on_recompile_limit_hit = True
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def compilations() -> int:
    """Frames dynamo has compiled so far in this process (tests and benchmarks count recompiles with it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _text_rows(layout: GazeLayout, q_offset: int, q_len: int, device) -> tuple[torch.Tensor, int, list]:
    """Per forward, cached on the layout: which query rows are text, their count and per-sample rows (the
    host syncs happen here once, not in every layer)."""
    key = ("flex_text_rows", q_offset, q_len, str(device))
    if key not in layout._cache:
        qpos = torch.arange(q_offset, q_offset + q_len, device=device)
        is_text = layout.kinds_at(qpos) == TEXT  # (B, Lq)
        t = int(is_text.sum(1).max().item()) if q_len else 0
        rows = [is_text[i].nonzero().flatten() for i in range(layout.batch_size)]
        layout._cache[key] = (is_text, t, rows)
    return layout._cache[key]


def text_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: GazeLayout,
    top_k: int | None,
    q_offset: int,
    shared: bool,
    routing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection table for text query rows only: (B, Hq, T, R) bool and the row map (B, Lq) -> [0, T]."""
    b, hq, lq, _ = q.shape
    qpos = torch.arange(q_offset, q_offset + lq, device=q.device)
    _, t, text_rows = _text_rows(layout, q_offset, lq, q.device)
    row_of = torch.full((b, lq), t, dtype=torch.long, device=q.device)  # t = dummy row (no selection)
    r = max(layout.num_regions, 1)
    table = torch.zeros(b, hq, t + 1, r + 1, dtype=torch.bool, device=q.device)
    if t == 0 or layout.num_regions == 0:
        return table, row_of
    desc = region_descriptors(k, layout) if routing is None else None
    for i in range(b):
        rows = text_rows[i]
        if not rows.numel():
            continue
        row_of[i, rows] = torch.arange(rows.numel(), device=q.device)
        if routing is not None:
            idx = routing[i][:, rows]
        else:
            scores = region_scores(q[i, :, rows], desc[i])  # (Hq, n, R)
            avail = available_regions(layout, qpos[rows])[i]  # (n, R)
            idx, _ = select_regions(scores, avail, top_k, k.shape[1], shared=shared)
        table[i, :, : rows.numel(), :r] = selection_table(idx, r)
    return table, row_of


def build_block_mask(
    layout: GazeLayout, table: torch.Tensor, row_of: torch.Tensor, q_offset: int, q_len: int, kv_len: int
) -> BlockMask:
    """BlockMask with exact mask_mod and block lists covering it (see module docstring). What depends only
    on the layout is built once per forward (`_static_blocks`); per layer only the routing-dependent tiles."""
    device = table.device
    b, hq = table.shape[:2]
    r = table.shape[-1] - 1
    s = _static_blocks(layout, q_offset, q_len, kv_len, r, device)
    kind_q, kind_k, unit_q, unit_k, region_k = s["kind_q"], s["kind_k"], s["unit_q"], s["unit_k"], s["region_k"]

    def mask_mod(bi, h, q_idx, kv_idx):
        p = q_idx + q_offset
        kq, kk = kind_q[bi, q_idx], kind_k[bi, kv_idx]
        causal = (kv_idx <= p) & (kk != PAD)
        picked = table[bi, h, row_of[bi, q_idx], region_k[bi, kv_idx]]
        text_ok = causal & ((kk != VISUAL) | picked)
        ctx_ok = causal & (unit_k[bi, kv_idx] == unit_q[bi, q_idx])
        pad_ok = kv_idx == p
        return torch.where(
            kq == TEXT, text_ok, torch.where(kq == VISUAL, causal, torch.where(kq == CONTEXT, ctx_ok, pad_ok))
        )

    nqb = -(-q_len // BLOCK)
    # regions selected by any text row of a query block, per head: one-hot(block of text row) @ table
    t = table.shape[2] - 1
    text_block = torch.full((b, t + 1), -1, dtype=torch.long, device=device)
    text_block.scatter_(1, row_of, (torch.arange(q_len, device=device) // BLOCK).expand(b, -1))
    text_block[:, t] = -1
    onehot = (text_block[:, :, None] == torch.arange(nqb, device=device)).float()  # (B, T+1, nqb)
    sel_blocks = onehot.transpose(1, 2)[:, None] @ table[..., :r].float()  # (B, Hq, nqb, R)
    visual_tiles = ((sel_blocks > 0).float() @ s["region_blocks"][:, None, :r]) > 0  # (B, Hq, nqb, nkb)

    text_tiles = s["text_rows"][:, None, :, None] & (s["nonvisual_keys"][:, None, None, :] | visual_tiles)
    tiles = s["causal_blocks"] & (s["dense_rows"][:, None, :, None] | text_tiles)  # (B, Hq, nqb, nkb)
    full = s["full"].expand(b, hq, -1, -1)
    partial = tiles & ~full

    def to_lists(flags: torch.Tensor):
        counts = flags.sum(-1, dtype=torch.int32)
        order = torch.argsort(~flags, dim=-1, stable=True).to(torch.int32)  # listed blocks first
        return counts, order

    kv_num, kv_idx = to_lists(partial)
    full_num, full_idx = to_lists(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
    )


def _static_blocks(layout: GazeLayout, q_offset: int, q_len: int, kv_len: int, r: int, device) -> dict:
    """The layout-only parts of the BlockMask (token roles, causal and dense tiles, region -> key blocks),
    computed once per forward and shared by every layer."""
    key = ("flex_static", q_offset, q_len, kv_len, r, BLOCK, str(device))
    if key in layout._cache:
        return layout._cache[key]
    b = layout.batch_size
    kpos = torch.arange(kv_len, device=device)
    qpos = torch.arange(q_offset, q_offset + q_len, device=device)
    kind_k, kind_q = layout.kinds_at(kpos), layout.kinds_at(qpos)  # (B, S), (B, Lq)
    regions = layout.regions_at(kpos)
    region_k = regions.masked_fill(regions < 0, r)  # -1 -> dummy column
    nqb, nkb = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    kblock = kpos // BLOCK
    last_pos = torch.clamp(torch.arange(nqb, device=device) * BLOCK + BLOCK - 1, max=q_len - 1) + q_offset
    first_pos = torch.arange(nqb, device=device) * BLOCK + q_offset
    region_blocks = torch.zeros(b, r + 1, nkb, dtype=torch.float32, device=device)
    region_blocks[torch.arange(b, device=device)[:, None], region_k, kblock[None, :]] = 1.0
    only_visual_rows = ~_any_per_block(kind_q != VISUAL, nqb)
    all_real_keys = ~_any_per_block(kind_k == PAD, nkb)
    block_end = (torch.arange(nkb, device=device) + 1) * BLOCK  # exclusive
    below_diag = (block_end[None, :] <= first_pos[:, None]) & (block_end[None, :] <= kv_len)
    out = {
        "kind_q": kind_q, "kind_k": kind_k, "unit_q": layout.units_at(qpos), "unit_k": layout.units_at(kpos),
        "region_k": region_k, "region_blocks": region_blocks,
        "causal_blocks": (torch.arange(nkb, device=device) * BLOCK)[None, :] <= last_pos[:, None],  # (nqb, nkb)
        "dense_rows": _any_per_block(kind_q != TEXT, nqb),  # (B, nqb)
        "text_rows": _any_per_block(kind_q == TEXT, nqb),
        "nonvisual_keys": _any_per_block((kind_k != VISUAL) & (kind_k != PAD), nkb),  # (B, nkb)
        "full": (only_visual_rows[:, :, None] & all_real_keys[:, None, :] & below_diag[None]).unsqueeze(1),
    }  # fmt: skip
    layout._cache[key] = out
    return out


def _accumulate_stats(stats: dict, layout: GazeLayout, table, row_of, q_offset: int) -> None:
    r = table.shape[-1] - 1
    t = table.shape[2] - 1
    for b in range(layout.batch_size):
        rows = (row_of[b] < t).nonzero().flatten()
        if not rows.numel() or not r:
            continue
        sizes = (layout.region_tokens[b] >= 0).sum(-1).to(torch.float32)  # (R,)
        attended = table[b, :, row_of[b, rows], :r].float() @ sizes  # (Hq, n)
        accumulate_visual_stats(stats, layout, b, rows + q_offset, attended)


def _any_per_block(flags: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, N) bool -> (B, blocks): any flag inside each BLOCK-long slice (the tail padded with False)."""
    padded = torch.nn.functional.pad(flags, (0, blocks * BLOCK - flags.shape[1]), value=False)
    return padded.view(flags.shape[0], blocks, BLOCK).any(-1)


def flex_gaze_attention(
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
    compiled: bool | None = None,
) -> torch.Tensor:
    """Exact Gaze Attention through FlexAttention (the paths' common signature); returns (B, Hq, Lq, D).

    `compiled` defaults to True on CUDA (block sparsity only takes effect compiled) and False elsewhere.
    Rows under a look span (`looks`) are recomputed by the reference (`with_look_rows`).
    """
    table, row_of = text_routing(q, k, layout, top_k, q_offset, shared, routing)
    if stats is not None:
        _accumulate_stats(stats, layout, table, row_of, q_offset)
    use_compiled = q.is_cuda if compiled is None else compiled
    if use_compiled:
        # the routing table's text rows and regions differ from batch to batch at one padded length: dynamic
        # dims, so the compiled kernel is specialised on the (bucketed) sequence length only
        torch._dynamo.mark_dynamic(table, 2)
        torch._dynamo.mark_dynamic(table, 3)
    block_mask = build_block_mask(layout, table, row_of, q_offset, q.shape[2], k.shape[2])
    fn = _flex() if use_compiled else flex_attention
    out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return with_look_rows(out, q, k, v, layout, top_k, looks, scale=scale, q_offset=q_offset, shared=shared,
                          routing=routing)  # fmt: skip
