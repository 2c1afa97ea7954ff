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
