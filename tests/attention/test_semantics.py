"""Every clause of the Gaze Attention definition, checked on the reference mask and outputs.

Brute-force oracles here are written independently of gazelit.attention.routing (explicit loops).
"""

import pytest
import torch
import torch.nn.functional as F

from gazelit.attention import (
    CONTEXT,
    PAD,
    TEXT,
    VISUAL,
    gaze_mask,
    reference_attention,
    reference_routing,
    region_descriptors,
    segmented_attention,
)

from .cases import random_case


def brute_descriptors(k, layout):
    b, h, _, d = k.shape
    out = torch.zeros(b, h, layout.num_regions, d, dtype=k.dtype)
    for i in range(b):
        for r in range(layout.num_regions):
            pos = (layout.region[i] == r).nonzero().flatten()
            if pos.numel():
                out[i, :, r] = k[i, :, pos].mean(1)
    return out


def test_descriptor_is_the_mean_of_the_region_keys():
    case = random_case(0, units=(2, 3))
    assert torch.allclose(region_descriptors(case.k, case.layout), brute_descriptors(case.k, case.layout), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl", ["reference", "segmented"])
def test_k_all_without_context_tokens_is_dense_causal_attention(dtype, tol, impl):
    case = random_case(1, hq=4, hkv=2, dtype=dtype, grad=True, num_context=0, units=(1, 3), padding="none")
    q, k, v, layout = case.q, case.k, case.v, case.layout
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if impl == "reference":
        out = reference_attention(q, k, v, layout, top_k=None)
    else:
        out = segmented_attention(q, k, v, layout, top_k=None)
    real = case.real_rows  # right padding: real rows never see the padding after them
    grad = torch.randn_like(dense) * real
    g_dense = torch.autograd.grad((dense * grad).sum(), (q, k, v))
    g_gaze = torch.autograd.grad((out * grad).sum(), (q, k, v))
    assert ((out - dense) * real).abs().max() < tol
    for a, b in zip(g_gaze, g_dense):
        assert (a - b).abs().max() < tol


def _mask_and_routing(seed, top_k, **kw):
    case = random_case(seed, **kw)
    routing, scores = reference_routing(case.q, case.k, case.layout, top_k)
    mask = gaze_mask(case.layout, routing, 0, case.layout.length, case.layout.length, case.q.shape[1])
    return case, routing, scores, mask


@pytest.mark.parametrize("seed", range(4))
def test_who_sees_what(seed):
    case, routing, _, mask = _mask_and_routing(seed, top_k=2, units=(1, 3), video=seed % 2 == 1)
    layout = case.layout
    hq = mask.shape[1]
    for b, sample in enumerate(layout.samples):
        kind, unit = layout.kind[b], layout.unit[b]
        real = kind != PAD
        for p in range(layout.length):
            row = mask[b, :, p]  # (Hq, S)
            causal = torch.arange(layout.length) <= p
            if kind[p] == VISUAL:  # dense and causal, as the base model
                assert torch.equal(row, (causal & real).expand(hq, -1))
            elif kind[p] == CONTEXT:  # own unit only: its visual tokens and its context up to itself
                own = (unit == unit[p]) & causal
                assert torch.equal(row, own.expand(hq, -1))
                assert row[:, sample.units[unit[p]].start].all()
            elif kind[p] == TEXT:
                # earlier text and itself, always
                assert row[:, (kind == TEXT) & causal].all()
                for u_idx, (u, end) in enumerate(zip(sample.units, sample.unit_end)):
                    ctx_pos = (unit == u_idx) & (kind == CONTEXT)
                    vis_pos = (unit == u_idx) & (kind == VISUAL)
                    if end <= p:  # preceding unit: its context tokens always visible
                        assert row[:, ctx_pos].all()
                    else:  # future unit (or one not yet complete): never attended
                        assert not row[:, ctx_pos | vis_pos].any()
                # visual keys attended are exactly the tokens of the selected regions
                for h in range(hq):
                    chosen = routing[b, h, p][routing[b, h, p] >= 0]
                    expected = torch.isin(layout.region[b], chosen) & (kind == VISUAL)
                    assert torch.equal(row[h] & (kind == VISUAL), expected)
            else:  # padding rows attend only to themselves (outputs are ignored)
                assert torch.equal(row, (torch.arange(layout.length) == p).expand(hq, -1))


@pytest.mark.parametrize("shared", [False, True])
def test_top_k_picks_the_highest_scoring_available_regions(shared):
    case = random_case(5, hq=4, hkv=2, units=(2, 3))
    layout = case.layout
    routing, _ = reference_routing(case.q, case.k, layout, top_k=3, shared=shared)
    desc = brute_descriptors(case.k, layout)
    g = case.q.shape[1] // case.k.shape[1]
    for b in range(layout.batch_size):
        for p in (layout.kind[b] == TEXT).nonzero().flatten().tolist():
            avail = [r for r in range(layout.num_regions) if layout.region_ready[b, r] <= p]
            scores = {h: {r: float(case.q[b, h, p] @ desc[b, h // g, r]) for r in avail} for h in range(4)}
            for h in range(4):
                s = scores[h]
                if shared:
                    group = range((h // g) * g, (h // g + 1) * g)
                    s = {r: sum(scores[j][r] for j in group) for r in avail}
                want = sorted(avail, key=lambda r: -s[r])[:3]  # fewer than k available -> all of them
                got = [r for r in routing[b, h, p].tolist() if r >= 0]
                assert sorted(got) == sorted(want)
            if shared:
                for h in range(4):
                    assert torch.equal(routing[b, h, p], routing[b, (h // g) * g, p])


def test_k_zero_keeps_text_and_context_only():
    case, routing, _, mask = _mask_and_routing(6, top_k=0, units=(1, 2))
    layout = case.layout
    text_rows = layout.kind == TEXT
    assert routing.shape[-1] == 0
    vis_cols = (layout.kind == VISUAL)[:, None, None, :]
    assert not (mask & text_rows[:, None, :, None] & vis_cols).any()


@pytest.mark.parametrize("impl", ["reference", "segmented"])
def test_unselected_regions_get_no_gradient_from_routed_queries(impl):
    case = random_case(7, hq=4, hkv=2, grad=True, units=(2, 3), text_after=6)
    q, k, v, layout = case.q, case.k, case.v, case.layout
    routing, _ = reference_routing(q, k, layout, top_k=1)
    if impl == "reference":
        out = reference_attention(q, k, v, layout, top_k=1)
    else:
        out = segmented_attention(q, k, v, layout, top_k=1)
    # upstream gradient only on text rows that have regions to route among
    routed = (layout.kind == TEXT) & (torch.arange(layout.length)[None] >= layout.region_ready.min(1).values[:, None])
    out.backward(torch.randn_like(out) * routed[:, None, :, None])
    g = q.shape[1] // k.shape[1]
    checked_zero = checked_nonzero = 0
    for b in range(layout.batch_size):
        rows = routed[b].nonzero().flatten()
        for kv in range(k.shape[1]):
            chosen = routing[b, kv * g : (kv + 1) * g][:, rows]
            chosen = set(chosen[chosen >= 0].tolist())
            for r in range(layout.num_regions):
                toks = layout.region_tokens[b, r]
                toks = toks[toks >= 0]
                if not toks.numel():
                    continue
                grad_norm = k.grad[b, kv, toks].abs().sum() + v.grad[b, kv, toks].abs().sum()
                if r in chosen:
                    checked_nonzero += 1
                    assert grad_norm > 0
                else:
                    checked_zero += 1
                    assert grad_norm == 0
    assert checked_zero > 0 and checked_nonzero > 0
