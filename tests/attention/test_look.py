"""Look spans (gazelit.attention.look): parsing, the exact semantics against an independent construction,
and every path (segmented, flex, torch and Triton decode) equal to the reference, forward and backward,
with spans that open and close while generating."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from gazelit.attention import (
    TEXT,
    VISUAL,
    GazeLayout,
    LookSet,
    LookTokens,
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
from gazelit.attention.look import Look, bins_to_box, box_iou, box_to_bins

from .cases import ODD_GRIDS

BINS = 8
TOKENS = LookTokens(open=1, close=2, locs={10 + i: i for i in range(BINS)})
WORD = 3  # an ordinary text token


def span(box, text=2, close=True):
    return [TOKENS.open] + [10 + c for c in box] + [WORD] * text + ([TOKENS.close] if close else [])


def layout_with_looks(seed, batch=2, num_context=2, region=RegionShape(2, 3, 1), padding="left", tail=14,
                      open_last=False):  # fmt: skip
    """1-2 images per sample (odd grids), then text holding one or two look spans; ids (B, L)."""
    rng = random.Random(seed)
    seqs, units = [], []
    for b in range(batch):
        ids, us = [WORD] * rng.randint(1, 3), []
        for _ in range(rng.randint(1, 2)):
            grid = rng.choice(ODD_GRIDS)
            us.append(Unit(len(ids), grid))
            ids += [0] * (grid[0] * grid[1] + num_context) + [WORD] * rng.randint(0, 2)
        for j in range(rng.randint(1, 2)):
            x0, y0 = rng.randrange(BINS), rng.randrange(BINS)
            box = (x0, y0, rng.randint(x0, BINS - 1), rng.randint(y0, BINS - 1))
            ids += span(box, text=rng.randint(0, 3), close=not (open_last and j == 1)) + [WORD] * rng.randint(0, 2)
        ids += [WORD] * rng.randint(1, 3)
        seqs.append(ids)
        units.append(us)
    length = max(map(len, seqs)) + (tail if padding == "left" else 0)
    padded, shifted, valid = [], [], []
    for ids, us in zip(seqs, units):
        off = length - len(ids) if padding == "left" else 0
        padded.append([0] * off + ids + [0] * (length - off - len(ids)))
        shifted.append([Unit(u.start + off, u.grid) for u in us])
        valid.append((off, off + len(ids)))
    layout = GazeLayout.build(shifted, length, num_context, region, valid=valid)
    return layout, torch.tensor(padded)


def qkv(layout, seed, hq=4, hkv=2, d=8, extra=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    b, n = layout.batch_size, layout.length + extra
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_(grad) for h in (hq, hkv, hkv))


# ------------------------------------------------------------------------------------------------ parsing
def test_spans_are_parsed_from_ids_and_ill_formed_ones_have_no_effect():
    layout = GazeLayout.build([[Unit(1, (3, 4))]], 60, 1, RegionShape(2, 2, 1))
    ids = [WORD] * 14
    ids += span((1, 0, 3, 2), text=2)  # well formed: <look> at 14, last loc at 18, </look> at 21
    ids += [TOKENS.open, 10, WORD, WORD]  # broken box
    ids += [TOKENS.open] + [10 + c for c in (5, 1, 2, 1)]  # x0 > x1
    ids += [TOKENS.close]  # a stray close
    ids += span((0, 0, 1, 1), text=1, close=False)  # still open
    ids += [WORD] * (60 - len(ids))
    looks = LookSet.from_ids(layout, TOKENS, -2.0, torch.tensor([ids]))
    first, last = looks.spans(0)
    assert first == Look(start=18, end=21, unit=0, box=(1, 0, 3, 2))
    assert last.end is None and last.box == (0, 0, 1, 1)
    assert looks.opened(0) == 4
    assert [(a, z) for a, z, _ in looks.rows(0, 0, 60)] == [(18, 21), (last.start, 60)]
    assert looks.rows(0, 19, 1)[0][:2] == (19, 20)


def test_a_look_before_any_unit_and_a_nested_look():
    layout = GazeLayout.build([[Unit(12, (2, 2))]], 40, 0, RegionShape(1, 1, 1))
    ids = span((0, 0, 1, 1), text=1) + [WORD] * 6  # before the image: no unit, no effect
    ids += [0] * 4
    ids += span((0, 0, 0, 0), text=1, close=False) + span((1, 1, 1, 1), text=1)  # nested: closes the first
    ids += [WORD] * (40 - len(ids))
    looks = LookSet.from_ids(layout, TOKENS, float("-inf"), torch.tensor([ids]))
    a, b = looks.spans(0)
    assert a.end == b.start - 4 and a.box == (0, 0, 0, 0) and b.box == (1, 1, 1, 1)


def test_a_span_fed_token_by_token_equals_the_one_parsed_at_once():
    layout, ids = layout_with_looks(3, padding="none")
    whole = LookSet.from_ids(layout, TOKENS, -1.0, ids)
    stepped = LookSet(layout, TOKENS, -1.0)
    for p in range(ids.shape[1]):
        stepped.feed(ids[:, p : p + 1])
    assert [stepped.spans(b) for b in range(2)] == [whole.spans(b) for b in range(2)]


def test_boxes_round_trip_through_bins():
    assert box_to_bins([0.0, 0.0, 1.0, 1.0], 8) == (0, 0, 7, 7)
    assert box_to_bins([0.25, 0.5, 0.5, 0.75], 8) == (2, 4, 3, 5)
    assert bins_to_box((2, 4, 3, 5), 8) == (0.25, 0.5, 0.5, 0.75)
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    with pytest.raises(ValueError, match="negative"):
        LookSet(GazeLayout.build([[]], 4, 0), TOKENS, 0.5)


# ------------------------------------------------------------------------------------------------ semantics
def inside_box(layout, b, look, kv_len):
    """Independent: a visual token is inside when its cell [x/W, (x+1)/W) overlaps [x0/n, (x1+1)/n)."""
    unit = layout.samples[b].units[look.unit]
    rows, cols = unit.grid
    x0, y0, x1, y1 = (c / BINS for c in look.box)
    x1, y1 = x1 + 1 / BINS, y1 + 1 / BINS
    out = torch.zeros(kv_len, dtype=torch.bool)
    for y in range(rows):
        for x in range(cols):
            if x / cols < x1 and (x + 1) / cols > x0 and y / rows < y1 and (y + 1) / rows > y0:
                out[unit.start + y * cols + x] = True
    return out


@pytest.mark.parametrize("bias", [-3.0, float("-inf")])
def test_dense_with_looks_is_dense_attention_plus_the_bias_outside_the_box(bias):
    """k = all, no context tokens: queries in a span see dense attention with `bias` added on every
    visual key outside the box; every other row is dense."""
    layout, ids = layout_with_looks(5, num_context=0)
    looks = LookSet.from_ids(layout, TOKENS, bias, ids)
    q, k, v = qkv(layout, 5)
    b, _, length, _ = q.shape
    out = reference_attention(q, k, v, layout, None, looks=looks)
    pos = torch.arange(length)
    want_mask = torch.zeros(b, 1, length, length)
    for i in range(b):
        lo, hi = layout.samples[i].valid
        real = (pos >= lo) & (pos < hi)
        allowed = (pos[None, :] <= pos[:, None]) & real[None, :]
        allowed |= torch.eye(length, dtype=torch.bool)  # padding rows see themselves
        m = torch.zeros(length, length).masked_fill(~allowed, float("-inf"))
        for look in looks.spans(i):
            rows = slice(look.start, look.end)
            outside = (layout.kind[i] == VISUAL) & ~inside_box(layout, i, look, length)
            m[rows] = m[rows].masked_fill(outside[None, :], bias) if bias == float("-inf") else \
                m[rows] + outside[None, :] * bias  # fmt: skip
        want_mask[i, 0] = m
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=want_mask.double(), enable_gqa=True)
    real_rows = (layout.kind != 3)[:, None, :, None]
    assert ((out - want).abs() * real_rows).max() < 1e-12
    assert looks.spans(0) and (out - reference_attention(q, k, v, layout, None)).abs().max() > 1e-3


def test_the_named_regions_are_forced_into_the_selection():
    """top_k = 0: a span's queries see exactly the regions holding the box (with the bias on their
    tokens outside it), context tokens and text; the rows outside spans see no visual token."""
    layout, ids = layout_with_looks(7)
    looks = LookSet.from_ids(layout, TOKENS, -2.0, ids)
    q, k, v = qkv(layout, 7)
    b, hq, length, _ = q.shape
    routing = torch.full((b, hq, length, layout.num_regions), -1)
    for i in range(b):
        for look in looks.spans(i):
            named = layout.region[i, inside_box(layout, i, look, length)].unique()
            routing[i, :, look.start : look.end, : named.numel()] = named
    given = gaze_mask(layout, routing, 0, length, length, hq)
    got = gaze_mask(layout, reference_routing(q, k, layout, 0)[0], 0, length, length, hq, looks)
    assert torch.equal(got > float("-inf"), given)
    assert ((got < 0) & (got > float("-inf"))).any()  # the bias on the regions' tokens outside the box


@pytest.mark.parametrize("bias", [-1.5, float("-inf")])
@pytest.mark.parametrize("seed,heads,top_k,m,shared", [(20, (4, 2), 1, 2, False), (21, (4, 4), 2, 0, False),
                                                       (22, (4, 1), None, 1, False), (23, (4, 2), 1, 2, True)])  # fmt: skip
def test_segmented_and_flex_equal_the_reference_with_looks_forward_and_backward(seed, heads, top_k, m, shared, bias):
    layout, ids = layout_with_looks(seed, num_context=m, padding="right" if seed % 2 else "left")
    looks = LookSet.from_ids(layout, TOKENS, bias, ids)
    real = (layout.kind != 3)[:, None, :, None]
    results = {}
    for name, path in (("reference", reference_attention), ("segmented", segmented_attention)):
        q, k, v = qkv(layout, seed, *heads, grad=True)
        out = path(q, k, v, layout, top_k, shared=shared, looks=looks)
        (out * real * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        results[name] = (out.detach() * real, q.grad, k.grad, v.grad)
    for got, want in zip(results["segmented"], results["reference"]):
        assert (got - want).abs().max() < 1e-10
    flex = flex_gaze_attention(*qkv(layout, seed, *heads), layout, top_k, shared=shared, looks=looks)  # no CPU backward
    assert (flex * real - results["reference"][0]).abs().max() < 1e-10
    without = reference_attention(*qkv(layout, seed, *heads), layout, top_k, shared=shared)
    assert ((results["reference"][0] - without * real).abs().max()) > 1e-4  # the spans changed something


def test_an_autograd_path_with_looks_does_not_write_into_its_incoming_gradient():
    layout, ids = layout_with_looks(30)
    looks = LookSet.from_ids(layout, TOKENS, -2.0, ids)
    q, k, v = qkv(layout, 30, grad=True)
    out = segmented_attention(q, k, v, layout, 1, looks=looks)
    grad = torch.randn_like(out)
    kept = grad.clone()
    out.backward(grad)
    assert torch.equal(grad, kept)


def decode_paths():
    """The torch decode path, and the Triton one where its interpreter runs it on these CPU tensors (on a
    GPU machine tests/attention/test_gpu.py runs it on CUDA)."""
    paths = [("torch", decode_attention)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from gazelit.attention.triton_decode import fused_decode_attention
        except ImportError:
            return paths
        paths.append(("triton", fused_decode_attention))
    return paths


@pytest.mark.parametrize("name,path", decode_paths())
@pytest.mark.parametrize("top_k,shared,bias", [(1, False, -2.0), (2, True, float("-inf")), (None, False, -2.0)])
def test_cached_decode_with_spans_opening_and_closing_while_generating(name, path, top_k, shared, bias):
    """A prompt, then generated tokens holding a span that opens and closes, then one left open: each
    decode step (looks fed token by token) equals the reference over the whole sequence."""
    layout = GazeLayout.build([[Unit(2, (5, 3))], [Unit(4, (3, 5))]], 24, 2, RegionShape(2, 2, 1),
                              valid=[(0, 24), (2, 24)])  # fmt: skip
    generated = span((1, 2, 5, 6), text=2) + [WORD] * 2 + span((0, 0, 3, 3), text=3, close=False)
    total = layout.length + len(generated)
    prompt = torch.full((2, layout.length), WORD)
    ids = torch.cat([prompt, torch.tensor([generated, generated])], 1)
    q, k, v = qkv(layout, 40, hq=4, hkv=2, extra=len(generated), dtype=torch.float32)
    whole = LookSet.from_ids(layout, TOKENS, bias, ids)
    want = reference_attention(q, k, v, layout, top_k, shared=shared, looks=whole)
    looks = LookSet.from_ids(layout, TOKENS, bias, prompt)
    state = build_state(k, v, layout, layout.length)
    for p in range(layout.length, total):
        looks.feed(ids[:, p : p + 1])
        out, _, _ = path(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], layout, state, top_k, p,
                         shared=shared, looks=looks)  # fmt: skip
        assert (out[:, :, 0] - want[:, :, p]).abs().max() < 1e-5, p
    plain = reference_attention(q, k, v, layout, top_k, shared=shared)
    assert (want[:, :, layout.length + 5] - plain[:, :, layout.length + 5]).abs().max() > 1e-4


def test_text_rows_outside_spans_are_untouched():
    layout, ids = layout_with_looks(9)
    looks = LookSet.from_ids(layout, TOKENS, float("-inf"), ids)
    q, k, v = qkv(layout, 9)
    with_spans = reference_attention(q, k, v, layout, 2, looks=looks)
    without = reference_attention(q, k, v, layout, 2)
    in_span = torch.zeros(layout.batch_size, layout.length, dtype=torch.bool)
    for b in range(layout.batch_size):
        for a, z, _ in looks.rows(b, 0, layout.length):
            in_span[b, a:z] = True
    keep = (~in_span & (layout.kind != 3))[:, None, :, None]
    assert ((with_spans - without).abs() * keep).max() == 0
    assert (layout.kind[in_span] == TEXT).all()


@pytest.mark.parametrize("name,path", decode_paths())
def test_a_given_static_selection_with_looks_adds_the_named_regions_to_it(name, path):
    """Static selection hands the decode step a fixed routing: rows in a span see it plus the box's
    regions, exactly as the reference does under the same routing."""
    layout = GazeLayout.build([[Unit(1, (4, 6))]], 30, 1, RegionShape(2, 2, 1))
    generated = span((0, 0, 2, 3), text=3, close=False)
    ids = torch.cat([torch.full((1, 30), WORD), torch.tensor([generated])], 1)
    q, k, v = qkv(layout, 41, hq=4, hkv=2, extra=len(generated), dtype=torch.float32)
    fixed = torch.tensor([[[5], [1], [0], [3]]])[:, :, None, :]  # (B, Hq, 1, kk): one region per head
    looks = LookSet.from_ids(layout, TOKENS, -3.0, ids)
    state = build_state(k, v, layout, 30)
    for p in range(30, ids.shape[1]):
        rows = slice(p, p + 1)
        want = reference_attention(q[:, :, rows], k[:, :, : p + 1], v[:, :, : p + 1], layout, 1, q_offset=p,
                                   routing=fixed, looks=looks)  # fmt: skip
        got, _, _ = path(q[:, :, rows], k[:, :, : p + 1], v[:, :, : p + 1], layout, state, 1, p, routing=fixed,
                         looks=looks)  # fmt: skip
        assert (got - want).abs().max() < 1e-5
    plain = reference_attention(q[:, :, -1:], k, v, layout, 1, q_offset=ids.shape[1] - 1, routing=fixed)
    assert (want - plain).abs().max() > 1e-4


def test_span_rows_of_samples_with_different_span_counts_are_gathered_and_scattered_back_exactly():
    layout, ids = layout_with_looks(50, padding="right")
    looks = LookSet.from_ids(layout, TOKENS, -2.0, ids)
    counts = [sum(z - a for a, z, _ in looks.rows(b, 0, layout.length)) for b in range(layout.batch_size)]
    assert len(set(counts)) > 1  # one sample has more span rows: the other's are padded
    real = (layout.kind != 3)[:, None, :, None]
    got = []
    for path in (reference_attention, segmented_attention):
        q, k, v = qkv(layout, 50, grad=True)
        out = path(q, k, v, layout, 1, looks=looks)
        (out * real).sum().backward()
        got.append((out.detach() * real, q.grad, k.grad, v.grad))
    for a, b in zip(*got):
        assert (a - b).abs().max() < 1e-10


def test_the_reference_at_gathered_positions_equals_its_rows_of_the_whole_sequence():
    layout, ids = layout_with_looks(51)
    looks = LookSet.from_ids(layout, TOKENS, -2.0, ids)
    q, k, v = qkv(layout, 51)
    whole = reference_attention(q, k, v, layout, 1, looks=looks)
    g = torch.Generator().manual_seed(0)
    take = torch.stack([torch.randperm(layout.length, generator=g)[:7] for _ in range(layout.batch_size)])
    qg = q.gather(2, take[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    rows = reference_attention(qg, k, v, layout, 1, looks=looks, positions=take)
    want = whole.gather(2, take[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    real = (layout.kind.gather(1, take) != 3)[:, None, :, None]
    assert ((rows - want).abs() * real).max() < 1e-12
