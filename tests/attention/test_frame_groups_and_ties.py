"""Candidate regions inside frame groups, the dense limit on both sides, ties, and incoming gradients.

Every path meets layouts with text and images between the frames of one region group (t = 2 and 3, odd
frame counts, several videos), many exact ties, and backward with incoming gradients whose slices are
contiguous (Hq = 1, output transposed before the loss). fp64 against the reference.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import gazelit.attention.flex as flex_module
from gazelit.attention import (
    PAD,
    TEXT,
    GazeLayout,
    RegionShape,
    Unit,
    build_state,
    decode_attention,
    flex_gaze_attention,
    reference_attention,
    reference_routing,
    segmented_attention,
    select_regions,
)

from .cases import frame_group_layout, qkv_for

GROUP_CASES = [(seed, t, heads) for seed, t, heads in [(1, 2, (4, 2)), (2, 3, (4, 1)), (3, 2, (2, 2)), (4, 3, (4, 4)), (5, 2, (1, 1))]]
KS = [None, 0, 1, 2]


def _real(layout):
    return (layout.kind != PAD)[:, None, :, None]


def _text_inside_a_group(layout) -> bool:
    """Some text position sees a visual token whose region is not yet a candidate."""
    for b, s in enumerate(layout.samples):
        for p in (layout.kind[b] == TEXT).nonzero().flatten().tolist():
            if any(u.start < p < r for u, r in zip(s.units, s.unit_ready)):
                return True
    return False


@pytest.mark.parametrize("seed,t,heads", GROUP_CASES)
@pytest.mark.parametrize("top_k", KS)
def test_segmented_hides_frames_of_open_groups_forward_and_backward(seed, t, heads, top_k):
    layout = frame_group_layout(seed, t)
    assert _text_inside_a_group(layout)
    q, k, v = qkv_for(layout, seed, *heads, grad=True)
    ref = reference_attention(q, k, v, layout, top_k)
    out = segmented_attention(q, k, v, layout, top_k, chunk=4)
    real = _real(layout)
    assert ((ref - out) * real).abs().max() < 1e-10
    grad = torch.randn_like(ref) * real
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
    for a, b in zip(g_ref, g_out):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("seed,t,heads", GROUP_CASES[:3])
@pytest.mark.parametrize("top_k", [None, 0, 2])
def test_flex_hides_frames_of_open_groups(seed, t, heads, top_k, monkeypatch):
    monkeypatch.setattr(flex_module, "BLOCK", 8)
    layout = frame_group_layout(seed, t)
    q, k, v = qkv_for(layout, seed, *heads)
    ref = reference_attention(q, k, v, layout, top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_gaze_attention(q, k, v, layout, top_k)
    assert ((ref - out) * _real(layout)).abs().max() < 1e-10


@pytest.mark.parametrize("seed,t,heads", GROUP_CASES)
@pytest.mark.parametrize("top_k", KS)
@pytest.mark.parametrize("shared", [False, True])
def test_decode_after_interleaved_frame_groups(seed, t, heads, top_k, shared):
    layout = frame_group_layout(seed, t, padding="left")
    hq, hkv = heads
    length = layout.length
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, length + 3, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, length + 3, 8, generator=g, dtype=torch.float64)
    state = build_state(k, v, layout, length)
    ref = reference_attention(q, k, v, layout, top_k, q_offset=length, shared=shared)
    out, _, _ = decode_attention(q, k, v, layout, state, top_k, length, shared=shared)
    assert (ref - out).abs().max() < 1e-10


def test_hf_backend_logits_match_reference_with_text_inside_frame_groups():
    from gazelit.attention import GazeContext, use_gaze

    from .test_hf_backend import tiny_llm

    layout = frame_group_layout(7, 2, batch=1, padding="none")
    model = tiny_llm("qwen3", attn="gaze")
    ids = torch.randint(0, 128, (1, layout.length), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("reference", "segmented"):
        with torch.no_grad(), use_gaze(GazeContext(layout, top_k=None, impl=impl)):
            logits[impl] = model(input_ids=ids).logits
    assert (logits["reference"] - logits["segmented"]).abs().max() < 1e-4


def _dense_causal(q, k, v, layout):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def test_dense_limit_holds_when_no_text_lies_inside_a_frame_group():
    """k = all, M = 0, frames of each group adjacent (text only between groups): dense causal attention."""
    units, pos = [], 2
    for f in range(4):
        units.append(Unit(pos, (3, 3), video=0, time=f))
        pos += 9 + (2 if f % 2 else 0)  # text after frames 1 and 3 only: between groups, never inside
    layout = GazeLayout.build([units], pos + 3, 0, RegionShape(2, 2, 2))
    assert not _text_inside_a_group(layout)
    q, k, v = qkv_for(layout, 0, 4, 2, grad=True)
    dense = _dense_causal(q, k, v, layout)
    g_d = torch.autograd.grad(dense.sum(), (q, k, v))
    for fn in (reference_attention, lambda *a: segmented_attention(*a, chunk=4)):
        out = fn(q, k, v, layout, None)
        assert (out - dense).abs().max() < 1e-10
        g_o = torch.autograd.grad(out.sum(), (q, k, v))
        for a, b in zip(g_d, g_o):
            assert (a - b).abs().max() < 1e-10


def test_dense_limit_gives_way_to_the_candidate_clause_inside_a_frame_group():
    """Text between two frames of one group does not see the first frame, even at k = all, M = 0."""
    units = [Unit(1, (3, 3), video=0, time=0), Unit(12, (3, 3), video=0, time=1)]  # text at 10, 11
    layout = GazeLayout.build([units], 25, 0, RegionShape(2, 2, 2))
    q, k, v = qkv_for(layout, 1, 2, 2)
    dense = _dense_causal(q, k, v, layout)
    for fn in (reference_attention, lambda *a: segmented_attention(*a, chunk=4)):
        out = fn(q, k, v, layout, None)
        inside = out[:, :, 10:12]
        # rows 10 and 11 see only text: positions 0, 10, 11 (the first frame is not a candidate yet)
        keys = torch.tensor([0, 10, 11])
        want = F.scaled_dot_product_attention(q[:, :, 10:12], k[:, :, keys], v[:, :, keys],
                                              attn_mask=torch.tensor([[True, True, False], [True, True, True]]))
        assert (inside - want).abs().max() < 1e-10
        assert (inside - dense[:, :, 10:12]).abs().max() > 1e-3
        # after the group ends, text sees everything again: the dense limit holds there
        assert (out[:, :, 21:] - dense[:, :, 21:]).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------- ties
def test_select_regions_breaks_ties_by_the_lower_region_index():
    scores = torch.zeros(2, 3, 4, 12)  # 12 tied regions
    avail = torch.ones(12, dtype=torch.bool)
    for k in (1, 3, 7):
        idx, _ = select_regions(scores, avail, k, num_kv_heads=3)
        assert torch.equal(idx, torch.arange(k).expand(2, 3, 4, k))
    avail = torch.arange(12) % 3 != 0  # regions 0, 3, 6, 9 unavailable
    idx, _ = select_regions(scores, avail, 2, num_kv_heads=3)
    assert torch.equal(idx, torch.tensor([1, 2]).expand(2, 3, 4, 2))
    mixed = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0, 0.0])
    idx, _ = select_regions(mixed.view(1, 1, 6), torch.ones(6, dtype=torch.bool), 4, num_kv_heads=1)
    assert idx.flatten().tolist() == [1, 2, 4, 3]


def _tied_case(hq=4, hkv=2):
    """Every visual key equal (0.5: exact means) and integer queries (exact products), so every region
    scores exactly the same for a query."""
    units = [Unit(2, (5, 7), video=-1), Unit(42, (4, 6), video=-1)]
    layout = GazeLayout.build([units, units], 72, 1, RegionShape(2, 2), valid=[(0, 72), (0, 70)])
    q, k, v = qkv_for(layout, 5, hq, hkv)
    q = q.mul(2).round()
    visual = (layout.kind == 1)[:, None, :, None]
    k = torch.where(visual, torch.full_like(k, 0.5), k)
    return layout, q, k, v


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [1, 3])
def test_every_path_follows_the_tie_rule(shared, top_k, monkeypatch):
    layout, q, k, v = _tied_case()
    routing, _ = reference_routing(q, k, layout, top_k, shared=shared)
    text = layout.kind == TEXT
    after_all = text & (torch.arange(layout.length) >= 71)  # both units ready: 28 regions available
    assert layout.num_regions >= 12
    rows = routing.permute(0, 2, 1, 3)[after_all]  # (n, Hq, kk)
    assert torch.equal(rows, torch.arange(top_k).expand_as(rows))
    ref = reference_attention(q, k, v, layout, top_k, shared=shared)
    seg = segmented_attention(q, k, v, layout, top_k, shared=shared, chunk=4)
    assert ((ref - seg) * _real(layout)).abs().max() < 1e-10
    monkeypatch.setattr(flex_module, "BLOCK", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flx = flex_gaze_attention(q, k, v, layout, top_k, shared=shared)
    assert ((ref - flx) * _real(layout)).abs().max() < 1e-10
    # decode: a new token after the first sample (unpadded) sees all regions tied
    state = build_state(k[:1], v[:1], _first(layout), 70)
    qn = q[:1, :, -1:]
    want = reference_attention(qn, k[:1, :, :71], v[:1, :, :71], _first(layout), top_k, q_offset=70, shared=shared)
    got, sel, _ = decode_attention(qn, k[:1], v[:1], _first(layout), state, top_k, 70, shared=shared)
    assert torch.equal(sel[0, :, 0], torch.arange(top_k).expand(4, top_k))
    assert (want - got).abs().max() < 1e-10


def _first(layout):
    units = layout.samples[0].units
    return GazeLayout.build([units], 70, 1, RegionShape(2, 2))


# ------------------------------------------------------------------------------- incoming gradients
@pytest.mark.parametrize("heads", [(1, 1), (4, 2)])
@pytest.mark.parametrize("top_k", [None, 1])
def test_segmented_backward_never_writes_into_the_incoming_gradient(heads, top_k):
    """Output transposed to (B, Hq, L, D) before the loss, and Hq = 1: slices of the incoming gradient are
    contiguous there, and pieces that override rows must not zero them in the caller's buffer."""
    layout = frame_group_layout(11, 2, num_context=2)
    q, k, v = qkv_for(layout, 11, *heads, grad=True)
    ref = reference_attention(q, k, v, layout, top_k)
    out = segmented_attention(q, k, v, layout, top_k, chunk=4)  # (B, Hq, L, D) view
    grad = torch.randn_like(ref) * _real(layout)  # contiguous in (B, Hq, L, D)
    kept = grad.clone()
    g_out = torch.autograd.grad(out, (q, k, v), grad_outputs=grad)
    assert torch.equal(grad, kept), "the backward wrote into its incoming gradient"
    g_ref = torch.autograd.grad(ref, (q, k, v), grad_outputs=grad)
    for a, b in zip(g_ref, g_out):
        assert (a - b).abs().max() < 1e-10
    # the (B, L, Hq, D) layout transformers uses, with a contiguous incoming gradient too
    native = segmented_attention(q, k, v, layout, top_k, chunk=4).transpose(1, 2)
    g2 = grad.transpose(1, 2).contiguous()
    kept2 = g2.clone()
    g_nat = torch.autograd.grad(native, (q, k, v), grad_outputs=g2)
    assert torch.equal(g2, kept2)
    for a, b in zip(g_ref, g_nat):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("rows", [4, 3000])  # a decode step's few rows (integer keys) and training's many (sort)
def test_top_k_keeps_the_stable_sort_order_on_every_method(rows):
    from gazelit.attention.routing import _top_k_lower_index_first

    g = torch.Generator().manual_seed(rows)
    for r, kk in [(16, 4), (37, 8), (512, 8), (5, 5)]:
        x = torch.randint(-3, 3, (rows, r), generator=g).float()  # many exact ties
        x[x == -3] = float("-inf")
        x[:, 0] = -0.0  # equal to +0.0: a tie, not a smaller score
        x[:, -1] = 0.0
        values, index = _top_k_lower_index_first(x, kk)
        want_values, want_index = x.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(index, want_index[:, :kk]) and torch.equal(values, want_values[:, :kk])


def test_top_k_of_a_decode_step_without_ties_and_with_a_tie_at_the_cut():
    """The plain top-k a decode step takes when its kk + 1 largest are distinct, and the fallbacks when two of
    them tie (at the cut, inside the top kk, between -0.0 and 0.0), all equal to the stable sort."""
    from gazelit.attention.routing import _top_k_lower_index_first

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(2, 8, 1, 37, generator=g).to(dtype)
        for kk in (1, 4, 36, 37):
            for tie in (None, "cut", "inside", "zero"):
                y = x.clone()
                top = y.sort(dim=-1, descending=True, stable=True).indices
                if tie == "cut" and kk < 37:  # the kk-th and (kk+1)-th largest are equal
                    y.scatter_(-1, top[..., kk : kk + 1], y.gather(-1, top[..., kk - 1 : kk]))
                elif tie == "inside" and kk > 1:
                    y.scatter_(-1, top[..., 1:2], y.gather(-1, top[..., 0:1]))
                elif tie == "zero":
                    y.scatter_(-1, top[..., 0:2], torch.tensor([0.0, -0.0], dtype=dtype).expand(2, 8, 1, 2))
                values, index = _top_k_lower_index_first(y, kk)
                want_values, want_index = y.sort(dim=-1, descending=True, stable=True)
                assert torch.equal(index, want_index[..., :kk]), (dtype, kk, tie)
                assert torch.equal(values, want_values[..., :kk])
