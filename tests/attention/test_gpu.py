"""GPU paths (compiled FlexAttention with block sparsity, decode, the backend in bf16) against the reference.

Their CPU twins are test_fast_paths.py and test_hf_backend.py. These run only where CUDA exists.
"""

import pytest
import torch

from gazelit.attention import (
    RegionShape,
    build_state,
    decode_attention,
    flex_gaze_attention,
    reference_attention,
    reference_routing,
)

from .cases import random_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled FlexAttention)"),
]


def cuda_case(seed, video, dtype):
    case = random_case(
        seed, hq=8, hkv=2, d=64, dtype=torch.float32, num_context=4, video=video,
        region=RegionShape(2, 2, 2) if video else RegionShape(2, 3, 1), padding="right",
    )
    layout = case.layout.to("cuda")
    q, k, v = (t.to("cuda", dtype).requires_grad_() for t in (case.q, case.k, case.v))
    real = case.real_rows.to("cuda")
    return layout, q, k, v, real


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_compiled_flex_forward_and_backward_equal_the_reference(video, dtype, tol):
    layout, q, k, v, real = cuda_case(30, video, dtype)
    routing, _ = reference_routing(q.float(), k.float(), layout, 2)
    ref = reference_attention(q.float(), k.float(), v.float(), layout, 2, routing=routing)
    out = flex_gaze_attention(q, k, v, layout, 2, routing=routing, compiled=True).float()
    grad = torch.randn_like(ref) * real
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out * real, ref * real) < tol
    for a, b in zip(g_out, g_ref):
        assert rel(a.float(), b.float()) < tol


def test_decode_on_cuda_equals_the_reference():
    case = random_case(31, hq=8, hkv=2, d=64, dtype=torch.float32, num_context=4, padding="left")
    layout = case.layout.to("cuda")
    b, hkv, length, d = case.k.shape
    k = torch.randn(b, hkv, length + 1, d, device="cuda")
    v = torch.randn(b, hkv, length + 1, d, device="cuda")
    q = torch.randn(b, 8, 1, d, device="cuda")
    state = build_state(k, v, layout, length)
    out, _, _ = decode_attention(q, k, v, layout, state, 2, length)
    ref = reference_attention(q, k, v, layout, 2, q_offset=length)
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("bias", [-3.0, float("-inf")])
def test_look_spans_on_cuda_compiled_flex_and_both_decode_paths_equal_the_reference(bias):
    from gazelit.attention import LookSet

    from .test_look import TOKENS, layout_with_looks, qkv

    layout, ids = layout_with_looks(60, num_context=2, open_last=True)  # the last span is still open
    layout = layout.to("cuda")
    looks = LookSet.from_ids(layout, TOKENS, bias, ids.cuda())
    q, k, v = (t.cuda().float().requires_grad_() for t in qkv(layout, 60, hq=8, hkv=2, d=64))
    real = (layout.kind != 3)[:, None, :, None]
    ref = reference_attention(q, k, v, layout, 1, looks=looks)
    out = flex_gaze_attention(q, k, v, layout, 1, looks=looks, compiled=True)
    grad = torch.randn_like(ref) * real
    g_ref = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * grad).sum(), (q, k, v))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out * real, ref * real) < 2e-3
    for a, b in zip(g_out, g_ref):
        assert rel(a, b) < 2e-3
    from gazelit.attention.triton_decode import fused_decode_attention

    length = layout.length  # one generated token after the prompt, inside the open span
    kk, vv = torch.randn(2, layout.batch_size, 2, length + 1, 64, device="cuda")
    qq = torch.randn(layout.batch_size, 8, 1, 64, device="cuda")
    state = build_state(kk, vv, layout, length)
    want = reference_attention(qq, kk, vv, layout, 1, q_offset=length, looks=looks)
    assert looks.rows(0, length, 1) or looks.rows(1, length, 1)
    for path in (decode_attention, fused_decode_attention):
        got, _, _ = path(qq, kk, vv, layout, state, 1, length, looks=looks)
        assert (got - want).abs().max() < 1e-3
