"""The fused CUDA decode kernels (gazelit.attention.triton_decode) against the torch decode path and the
reference, on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU):
fp32 and bf16, GQA 1/2/4, per-head and shared selection, odd grids, video frame groups, padding, ties,
given (static) selections, k = all."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET was set", allow_module_level=True)

from gazelit.attention import reference_attention, reference_routing  # noqa: E402
from gazelit.attention.decode import build_state, decode_attention  # noqa: E402
from gazelit.attention.triton_decode import fused_decode_attention  # noqa: E402

from .cases import random_case  # noqa: E402
from gazelit.attention import RegionShape  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # seed, (hq, hkv), video, padding, num_context, top_k
    (30, (4, 4), False, "left", 2, 1),
    (31, (4, 2), False, "left", 2, 2),
    (32, (4, 1), False, "none", 0, 3),
    (33, (4, 2), True, "left", 2, 2),
    (34, (8, 2), True, "none", 1, 1),
    (35, (2, 2), False, "left", 3, 4),
]


def decode_case(seed, heads, video, padding, m, dtype, extra=3):
    region = RegionShape(2, 2, 2) if video else RegionShape(2, 3, 1)
    case = random_case(seed, hq=heads[0], hkv=heads[1], dtype=torch.float64, num_context=m, region=region,
                       video=video, padding=padding)  # fmt: skip
    layout = case.layout
    b, hkv, length, d = case.k.shape
    g = torch.Generator().manual_seed(seed)
    total = length + extra
    q = torch.randn(b, heads[0], total, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, total, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, total, d, generator=g, dtype=torch.float64)
    return layout.to(DEVICE), *(x.to(dtype).to(DEVICE) for x in (q, k, v)), length


@pytest.mark.parametrize("seed,heads,video,padding,m,top_k", CASES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_equals_the_torch_path_and_the_reference(seed, heads, video, padding, m, top_k, shared, dtype):
    layout, q, k, v, length = decode_case(seed, heads, video, padding, m, dtype)
    state = build_state(k, v, layout, length)
    for start in (length, length + 1, length + 2):  # one new token per step, the cache growing
        step = q[:, :, start : start + 1]
        fused, sel, scores = fused_decode_attention(step, k, v, layout, state, top_k, start, shared=shared)
        torch_out, torch_sel, torch_scores = decode_attention(step, k, v, layout, state, top_k, start, shared=shared)
        assert fused.shape == torch_out.shape and fused.dtype == dtype
        assert torch.equal(sel, torch_sel)  # the same regions, ties included
        finite = torch_scores > float("-inf")
        assert torch.equal(finite, scores > float("-inf"))
        torch.testing.assert_close(scores[finite], torch_scores[finite], rtol=1e-5, atol=1e-5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fused.float(), torch_out.float(), rtol=tol, atol=tol)
        if dtype == torch.float32:  # and the definition itself, on the selection the kernel made
            ref = reference_attention(step.double(), k[:, :, : start + 1].double(), v[:, :, : start + 1].double(),
                                      layout, top_k, q_offset=start, shared=shared, routing=sel)  # fmt: skip
            torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_region_index():
    layout, q, k, v, length = decode_case(40, (4, 2), False, "left", 2, torch.float32)
    visual = (layout.region >= 0)[:, None, :, None]
    n = layout.length
    k[:, :, :n] = torch.where(visual, 1.0, k[:, :, :n])  # every region has the same descriptor: all scores tie
    state = build_state(k, v, layout, length)
    _, sel, _ = fused_decode_attention(q[:, :, length : length + 1], k, v, layout, state, 2, length)
    want, _ = reference_routing(q[:, :, length : length + 1], k[:, :, : length + 1], layout, 2, q_offset=length)
    assert torch.equal(sel, want)
    assert torch.equal(sel[..., 0], torch.zeros_like(sel[..., 0]))


@pytest.mark.parametrize("shared", [False, True])
def test_a_given_selection_is_attended_as_given(shared):
    """Static selection (kept from the first generated token) passes its regions in."""
    layout, q, k, v, length = decode_case(41, (4, 2), True, "left", 2, torch.float32)
    state = build_state(k, v, layout, length)
    first = q[:, :, length : length + 1]
    _, kept, _ = decode_attention(first, k, v, layout, state, 2, length, shared=shared)
    later = q[:, :, length + 1 : length + 2]
    fused, sel, scores = fused_decode_attention(later, k, v, layout, state, 2, length + 1, shared=shared,
                                                routing=kept)  # fmt: skip
    torch_out, torch_sel, torch_scores = decode_attention(later, k, v, layout, state, 2, length + 1, shared=shared,
                                                          routing=kept)  # fmt: skip
    assert torch.equal(sel, kept) and torch.equal(torch_sel, kept)
    torch.testing.assert_close(fused, torch_out, rtol=1e-5, atol=1e-5)
    finite = torch_scores > float("-inf")
    torch.testing.assert_close(scores[finite], torch_scores[finite], rtol=1e-5, atol=1e-5)


def test_k_at_least_every_region_is_dense_attention():
    layout, q, k, v, length = decode_case(42, (4, 2), False, "left", 2, torch.float32)
    state = build_state(k, v, layout, length)
    step = q[:, :, length : length + 1]
    fused, _, _ = fused_decode_attention(step, k, v, layout, state, None, length)
    ref = reference_attention(step, k[:, :, : length + 1], v[:, :, : length + 1], layout, None, q_offset=length)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k,selection", [(None, "dynamic"), (2, "dynamic"), (2, "static")])
def test_generate_through_the_fused_kernels_gives_the_reference_greedy_tokens(top_k, selection):
    """transformers' generate() with decode="triton" (what "auto" picks on CUDA) against the reference path
    (no cache shortcuts: every step a full forward), at k = all and k = 2, dynamic and static selection."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gazelit.attention import GazeContext, GazeLayout, Unit, use_gaze

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=128,
                                  max_position_embeddings=256)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="gaze").eval()
    length = 30
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    layout = GazeLayout.build([[Unit(4, (3, 4))], [Unit(5, (5, 3))]], length, 2, RegionShape(2, 2),
                              valid=[(0, length), (3, length)])  # fmt: skip
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    runs = {}
    for decode in ("triton", "torch"):
        ctx = GazeContext(layout, top_k=top_k, selection=selection, decode=decode, record_routing=True)
        with use_gaze(ctx):
            runs[decode] = (model.generate(**kwargs), [r.indices for r in ctx.routing])
    assert torch.equal(runs["triton"][0], runs["torch"][0])
    for a, b in zip(runs["triton"][1], runs["torch"][1]):
        assert torch.equal(a, b)
    # the reference: generated tokens re-scored by one uncached forward per step must be the argmax
    tokens = runs["triton"][0]
    embed = model.get_input_embeddings()
    for step in range(5):
        upto = length + step
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1)
        ref_layout = GazeLayout.build([[Unit(4, (3, 4))], [Unit(5, (5, 3))]], upto, 2, RegionShape(2, 2),
                                      valid=[(0, upto), (3, upto)])  # fmt: skip
        if selection == "static" and top_k is not None:
            break  # the reference has no notion of "the first token's selection"; the torch path is checked above
        with torch.no_grad(), use_gaze(GazeContext(ref_layout, top_k=top_k, impl="reference")):
            logits = model(inputs_embeds=embed(tokens[:, :upto]), attention_mask=full_mask).logits[:, -1]
        assert torch.equal(logits.argmax(-1), tokens[:, upto])


def test_forcing_the_kernels_onto_cpu_tensors_without_the_interpreter_is_a_clear_error(monkeypatch):
    from gazelit.attention import GazeContext
    from gazelit.attention.hf import decode_path

    layout, q, *_ = decode_case(43, (4, 2), False, "left", 2, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        decode_path(GazeContext(layout, decode="triton"), q.cpu())
    assert decode_path(GazeContext(layout, decode="auto"), q.cpu()).__name__ == "decode_attention"
