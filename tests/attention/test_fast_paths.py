"""Fast paths (segmented CPU kernel path, FlexAttention, cached decode) equal the reference.

Random batches: odd grids, 1-3 units, images and video frames, GQA ratios 1/2/4, text before, between
and after units, left and right padding, context tokens 0 or 2. The fast paths get the reference's
routing indices injected, and are also checked with their own routing.
"""

import itertools
import warnings

import pytest
import torch

import gazelit.attention.flex as flex_module
from gazelit.attention import (
    PAD,
    GazeLayout,
    RegionShape,
    Unit,
    build_state,
    decode_attention,
    flex_gaze_attention,
    gaze_mask,
    reference_attention,
    reference_routing,
    segmented_attention,
)
from gazelit.attention.flex import build_block_mask, text_routing

from .cases import random_case

CASES = [
    # seed, (hq, hkv), video, padding, num_context, top_k
    (10, (4, 4), False, "right", 2, 1),
    (11, (4, 2), False, "left", 2, 2),
    (12, (4, 1), False, "right", 0, 3),
    (13, (4, 2), True, "left", 2, 2),
    (14, (4, 1), True, "right", 1, None),
    (15, (4, 4), True, "right", 0, 0),
    (16, (4, 2), False, "none", 3, 5),
]


def make(seed, heads, video, padding, m, dtype=torch.float64, grad=False):
    region = RegionShape(2, 2, 2) if video else RegionShape(2, 3, 1)
    hq, hkv = heads
    return random_case(
        seed, hq=hq, hkv=hkv, dtype=dtype, grad=grad, num_context=m, region=region, video=video, padding=padding
    )


@pytest.mark.parametrize("seed,heads,video,padding,m,top_k", CASES)
@pytest.mark.parametrize("inject", [True, False])
def test_segmented_equals_reference_forward_and_backward(seed, heads, video, padding, m, top_k, inject):
    case = make(seed, heads, video, padding, m, grad=True)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    routing, _ = reference_routing(q, k, layout, top_k)
    ref = reference_attention(q, k, v, layout, top_k, routing=routing)
    out = segmented_attention(q, k, v, layout, top_k, chunk=4, routing=routing if inject else None)
    real = case.real_rows
    grad = torch.randn_like(ref) * real
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
    assert ((ref - out) * real).abs().max() < 1e-10
    for a, b in zip(g_ref, g_out):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize(
    "grids,region,video",
    [
        ([(4, 6), (2, 3), (5, 6)], RegionShape(2, 3), False),  # exact tilings and an inexact one side by side
        ([(3, 5), (4, 4)], RegionShape(1, 1), False),  # one token per region
        ([(4, 4)] * 3, RegionShape(2, 2, 2), True),  # video: 2 frames per region, the last group one frame
    ],
)
def test_segmented_routed_masks_on_grids_the_regions_tile_exactly(grids, region, video):
    """Units whose grid the regions tile exactly take the broadcast-copy mask; results equal the reference."""
    units, pos = [], 3
    for t, grid in enumerate(grids):
        units.append(Unit(pos, grid, video=0 if video else -1, time=t))
        pos += grid[0] * grid[1] + 2 + (0 if video else 1)
    layout = GazeLayout.build([units], pos + 9, 2, region)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, layout.length, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    for top_k in (1, 3):
        ref = reference_attention(q, k, v, layout, top_k)
        out = segmented_attention(q, k, v, layout, top_k, chunk=4)
        grad = torch.randn_like(ref)
        g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
        g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
        assert (ref - out).abs().max() < 1e-10
        for a, b in zip(g_ref, g_out):
            assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("shared", [False, True])
def test_segmented_float32_and_shared_gqa(shared):
    case = make(17, (4, 2), False, "right", 2, dtype=torch.float32, grad=True)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    routing, _ = reference_routing(q, k, layout, 2, shared=shared)
    ref = reference_attention(q, k, v, layout, 2, routing=routing)
    out = segmented_attention(q, k, v, layout, 2, shared=shared, routing=routing)
    grad = torch.randn_like(ref) * case.real_rows
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
    assert ((ref - out) * case.real_rows).abs().max() < 1e-5
    for a, b in zip(g_ref, g_out):
        assert (a - b).abs().max() < 1e-5


def test_segmented_with_a_query_offset_continues_a_cached_sequence():
    """A later chunk of queries (holding a new unit) against the cache, as in a multi-turn prefill."""
    case = make(18, (4, 2), False, "none", 2)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    start = min(s.units[-1].start for s in layout.samples) - 1  # text, then each sample's last unit
    ref = reference_attention(q[:, :, start:], k, v, layout, 2, q_offset=start)
    out = segmented_attention(q[:, :, start:], k, v, layout, 2, q_offset=start)
    real = case.real_rows[:, :, start:]
    assert ((ref - out) * real).abs().max() < 1e-10


def test_attended_visual_statistics_agree_across_paths():
    """Selected / available visual tokens over text queries with candidate regions: exact counts."""
    case = make(19, (4, 2), False, "right", 2)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    routing, _ = reference_routing(q, k, layout, 1)
    sizes = [(layout.region_tokens[b] >= 0).sum(-1) for b in range(layout.batch_size)]
    attended = available = 0
    for b in range(layout.batch_size):
        for p in (layout.kind[b] == 0).nonzero().flatten().tolist():
            avail = int(sizes[b][layout.region_ready[b] <= p].sum())
            if avail:
                available += avail * 4
                attended += sum(int(sizes[b][r]) for r in routing[b, :, p].flatten().tolist() if r >= 0)
    seg, flex = {}, {}
    segmented_attention(q, k, v, layout, 1, stats=seg, chunk=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex_gaze_attention(q.float(), k.float(), v.float(), layout, 1, stats=flex)
    assert seg == flex == {"attended_visual": attended, "available_visual": available}
    assert 0 < attended < available
    dense = {}
    segmented_attention(q, k, v, layout, None, stats=dense, chunk=4)
    assert dense["attended_visual"] == dense["available_visual"] == available


@pytest.mark.parametrize("seed,heads,video,padding,m,top_k", CASES[:5])
def test_flex_equals_reference_and_block_lists_cover_the_mask(seed, heads, video, padding, m, top_k, monkeypatch):
    monkeypatch.setattr(flex_module, "BLOCK", 8)  # small tiles so that tiling decisions matter
    case = make(seed, heads, video, padding, m, dtype=torch.float32)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    routing, _ = reference_routing(q, k, layout, top_k)
    ref = reference_attention(q, k, v, layout, top_k, routing=routing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_gaze_attention(q, k, v, layout, top_k, routing=routing)
        own = flex_gaze_attention(q, k, v, layout, top_k)
    assert ((ref - out) * case.real_rows).abs().max() < 1e-5
    assert ((ref - own) * case.real_rows).abs().max() < 1e-5

    length, hq = layout.length, q.shape[1]
    table, row_of = text_routing(q, k, layout, top_k, 0, False, routing)
    block_mask = build_block_mask(layout, table, row_of, 0, length, length)
    listed = block_mask.to_dense().bool()  # partial + full tiles
    exact = gaze_mask(layout, routing, 0, length, length, hq)
    n = -(-length // 8)
    exact_tiles = torch.nn.functional.pad(exact, (0, n * 8 - length, 0, n * 8 - length))
    exact_tiles = exact_tiles.view(*exact.shape[:2], n, 8, n, 8).any(3).any(-1)
    assert not (exact_tiles & ~listed).any(), "a tile with an allowed (query, key) pair is not listed"
    # full tiles (no mask_mod) must be entirely allowed
    full = torch.zeros_like(listed)
    if block_mask.full_kv_num_blocks is not None:
        for b, h, i in itertools.product(range(listed.shape[0]), range(listed.shape[1]), range(n)):
            hh = min(h, block_mask.full_kv_num_blocks.shape[1] - 1)
            cnt = int(block_mask.full_kv_num_blocks[b, hh, i])
            full[b, h, i, block_mask.full_kv_indices[b, hh, i, :cnt].long()] = True
    padded = torch.nn.functional.pad(exact, (0, n * 8 - length, 0, n * 8 - length), value=True)
    all_allowed = padded.view(*exact.shape[:2], n, 8, n, 8).all(3).all(-1)
    assert not (full & ~all_allowed).any()


@pytest.mark.parametrize("seed,heads,video,padding,m,top_k", [c for c in CASES if c[3] != "right"])
@pytest.mark.parametrize("shared", [False, True])
def test_decode_equals_reference(seed, heads, video, padding, m, top_k, shared):
    """New text queries after the prompt: decode over gathered K/V equals the reference mask."""
    case = make(seed, heads, video, padding, m)
    layout = case.layout
    b, hkv, length, d = case.k.shape
    g = torch.Generator().manual_seed(seed)
    total = length + 5
    q = torch.randn(b, heads[0], total, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, total + 3, d, generator=g, dtype=torch.float64)  # +3: unused static-cache slots
    v = torch.randn(b, hkv, total + 3, d, generator=g, dtype=torch.float64)
    state = build_state(k, v, layout, length)
    for start, n in [(length, 2), (length + 2, 1), (length + 3, 2)]:
        rows = slice(start, start + n)
        ref = reference_attention(q[:, :, rows], k[:, :, : start + n], v[:, :, : start + n], layout, top_k,
                                  q_offset=start, shared=shared)
        out, sel, _ = decode_attention(q[:, :, rows], k, v, layout, state, top_k, start, shared=shared)
        assert (ref - out).abs().max() < 1e-10
        want, _ = reference_routing(q[:, :, rows], k[:, :, : start + n], layout, top_k, q_offset=start, shared=shared)
        assert torch.equal(sel, want)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_over_full_size_regions_equals_reference(shared, dtype, padded):
    """Every region real and full (grids a multiple of the region, same units in every sample): one new
    row needs no mask with a shared selection and one constant per-head mask without padding; one and
    several new rows, per-head and shared selection, with and without left padding."""
    g = torch.Generator().manual_seed(5)
    units = [Unit(2, (4, 6)), Unit(2 + 24 + 2 + 1, (4, 6))]
    valid_from = [0, 3] if padded else [3, 3]
    layout = GazeLayout.build([[Unit(u.start + off, u.grid) for u in units] for off in valid_from], 3 + 53 + 4, 2,
                              RegionShape(2, 3, 1), valid=[(off, 60) for off in valid_from])  # fmt: skip
    b, hq, hkv, d, length = 2, 4, 2, 8, layout.length
    q = torch.randn(b, hq, length + 6, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, length + 6, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, length + 6, d, generator=g, dtype=dtype)
    state = build_state(k, v, layout, length)
    assert state.regions_full and (state.nonvisual_bias is None) != padded
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with torch.no_grad():  # the scratch-buffer path generation takes
        for start, n in [(length, 1), (length + 1, 3), (length + 4, 1)]:
            rows = slice(start, start + n)
            for top_k in (1, 3):
                ref = reference_attention(q[:, :, rows], k[:, :, : start + n], v[:, :, : start + n], layout, top_k,
                                          q_offset=start, shared=shared)  # fmt: skip
                out, sel, _ = decode_attention(q[:, :, rows], k, v, layout, state, top_k, start, shared=shared)
                assert (ref - out)[:, :, :].abs().max() < tol
                want, _ = reference_routing(q[:, :, rows], k[:, :, : start + n], layout, top_k, q_offset=start,
                                            shared=shared)  # fmt: skip
                assert torch.equal(sel, want)


def test_decode_steps_under_autograd_keep_their_own_rows():
    """Two steps whose graphs are alive at once (the rows a step saves for backward are its own, not a
    buffer a later step reuses): the queries' gradients equal the reference's. (The cache's own gradient
    is not a decode concern.)"""
    case = make(22, (4, 2), False, "left", 2)
    layout = case.layout
    b, hkv, length, d = case.k.shape
    g = torch.Generator().manual_seed(22)
    q = torch.randn(b, 4, 2, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, length + 2, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, length + 2, d, generator=g, dtype=torch.float64)
    state = build_state(k, v, layout, length)
    steps = [decode_attention(q[:, :, i : i + 1], k, v, layout, state, 2, length + i)[0] for i in range(2)]
    ref = [reference_attention(q[:, :, i : i + 1], k[:, :, : length + i + 1], v[:, :, : length + i + 1], layout, 2,
                               q_offset=length + i) for i in range(2)]  # fmt: skip
    (grad,) = torch.autograd.grad(sum((x * (i + 1)).sum() for i, x in enumerate(steps)), q)
    (want,) = torch.autograd.grad(sum((x * (i + 1)).sum() for i, x in enumerate(ref)), q)
    assert (grad - want).abs().max() < 1e-10


def test_decode_never_reads_unselected_visual_rows():
    """Poison every visual key/value outside the selected regions: the decode output must not change."""
    case = make(20, (4, 2), False, "left", 2)
    layout = case.layout
    b, hkv, length, d = case.k.shape
    q = torch.randn(b, 4, 1, d, dtype=torch.float64)
    k = torch.cat([case.k, torch.randn(b, hkv, 1, d, dtype=torch.float64)], 2)
    v = torch.cat([case.v, torch.randn(b, hkv, 1, d, dtype=torch.float64)], 2)
    state = build_state(k, v, layout, length)
    out, sel, _ = decode_attention(q, k, v, layout, state, 1, length, shared=True)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for i in range(b):
        for h in range(hkv):
            chosen = sel[i, h * 2, 0][sel[i, h * 2, 0] >= 0]
            keep = torch.isin(layout.region[i], chosen)
            kill = (layout.region[i] >= 0) & ~keep
            poisoned_k[i, h, : layout.length][kill] = float("nan")
            poisoned_v[i, h, : layout.length][kill] = float("nan")
    again, _, _ = decode_attention(q, poisoned_k, poisoned_v, layout, state, 1, length, shared=True)
    assert torch.equal(out, again)


def test_descriptors_are_computed_once_per_layer_state():
    case = make(21, (4, 2), False, "left", 2)
    layout = case.layout
    k = torch.cat([case.k, case.k[:, :, :4]], 2)
    v = torch.cat([case.v, case.v[:, :, :4]], 2)
    state = build_state(k, v, layout, layout.length)
    before = state.descriptors.clone()
    k[:, :, : layout.length] += 1.0  # later steps never recompute descriptors from the cache
    decode_attention(case.q[:, :, -1:], k, v, layout, state, 2, layout.length)
    assert torch.equal(state.descriptors, before)


def test_layout_without_units_routes_nothing():
    layout = GazeLayout.build([[], []], 12, 0, valid=[(0, 12), (3, 12)])
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    ref = reference_attention(q, k, v, layout, 2)
    out = segmented_attention(q, k, v, layout, 2)
    real = (layout.kind != PAD)[:, None, :, None]
    assert ((ref - out) * real).abs().max() < 1e-12


def test_every_path_has_one_signature_one_layout_and_collects_statistics():
    """reference, segmented and flex: the same keyword arguments, (B, Hq, Lq, D) out, identical stats."""
    import inspect

    from gazelit.attention.hf import PATHS

    common = ["q", "k", "v", "layout", "top_k", "scale", "q_offset", "shared", "routing", "stats"]
    for name, fn in PATHS.items():
        params = list(inspect.signature(fn).parameters)
        assert params[: len(common)] == common, name
    case = make(22, (4, 2), True, "left", 2, dtype=torch.float32)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    outs, stats = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in PATHS.items():
            stats[name] = {}
            outs[name] = fn(q, k, v, layout, 2, scale=0.3, q_offset=0, shared=False, stats=stats[name])
    for name in PATHS:
        assert outs[name].shape == q.shape
        assert ((outs[name] - outs["reference"]) * case.real_rows).abs().max() < 1e-5, name
        assert stats[name] == stats["reference"] and stats[name]["available_visual"] > 0, name
