"""The "gaze" transformers backend: stock Qwen3 / Qwen2 / Llama decoder layers run it unchanged."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from gazelit.attention import GazeContext, GazeLayout, RegionShape, Unit, use_gaze

TINY = {
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=128),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, vocab_size=128),
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, intermediate_size=96, vocab_size=128),
}


def tiny_llm(family, attn="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY[family], max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).eval()


def prompt_batch(num_context=0):
    """Two left-padded prompts with one 3x4 'image' each (any embeddings work: the layout says where)."""
    length = 24 + num_context
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    layout = GazeLayout.build(
        [[Unit(4, (3, 4))], [Unit(5, (3, 4))]], length, num_context, RegionShape(2, 2), valid=[(0, length), (3, length)]
    )
    return ids, mask, layout


@pytest.mark.parametrize("family", sorted(TINY))
def test_k_all_without_context_tokens_matches_sdpa_logits_and_greedy_tokens(family):
    model = tiny_llm(family)
    ids, mask, layout = prompt_batch()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    ref_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("gaze")
    for impl in ("segmented", "reference"):
        with torch.no_grad(), use_gaze(GazeContext(layout, top_k=None, impl=impl)):
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert (logits - ref_logits)[mask.bool()].abs().max() < 1e-5
    for cache in ("dynamic", "static"):
        ctx = GazeContext(layout, top_k=None)
        with use_gaze(ctx):
            tokens = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache
            )
        assert torch.equal(tokens, ref_tokens)
        assert set(ctx.decode_states) == {0, 1}  # every layer went through the cached decode path


def test_without_a_context_the_backend_is_the_base_model():
    model = tiny_llm("qwen3")
    ids, mask, _ = prompt_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("gaze")
        out = model(input_ids=ids, attention_mask=mask).logits
    assert (ref - out)[mask.bool()].abs().max() == 0


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_prefill_then_step_by_step_decode_equals_one_full_forward(family):
    """With routing on (k=1 of 4 regions) and context tokens, cached decoding reproduces the logits of a
    single uncached forward over prompt + generated tokens."""
    model = tiny_llm(family, attn="gaze", dtype=torch.float64)
    ids, mask, layout = prompt_batch(num_context=2)
    embed = model.get_input_embeddings()
    new = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full_ids = torch.cat([ids, new], 1)
        full_mask = torch.cat([mask, torch.ones_like(new)], 1)
        with use_gaze(GazeContext(layout, top_k=1)):
            full = model(inputs_embeds=embed(full_ids), attention_mask=full_mask).logits
        ctx = GazeContext(layout, top_k=1)
        cache = DynamicCache(config=model.config)
        with use_gaze(ctx):
            step_logits = [model(inputs_embeds=embed(ids), attention_mask=mask, past_key_values=cache).logits[:, -1]]
            for t in range(new.shape[1]):
                m = full_mask[:, : ids.shape[1] + t + 1]
                out = model(input_ids=new[:, t : t + 1], attention_mask=m, past_key_values=cache)
                step_logits.append(out.logits[:, -1])
    stepped = torch.stack(step_logits, 1)
    expected = full[:, ids.shape[1] - 1 :]
    assert (stepped - expected).abs().max() < 1e-10
    assert set(ctx.decode_states) == {0, 1}


def test_training_forward_with_the_kwarg_and_gradients_match_the_reference():
    model = tiny_llm("qwen2", attn="gaze", dtype=torch.float64)
    ids, mask, layout = prompt_batch(num_context=2)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # predicted from a padding row, whose output is meaningless by definition
    grads = {}
    for impl in ("reference", "segmented"):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, gaze=GazeContext(layout, top_k=1, impl=impl))
        out.loss.backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert (grads["reference"] - grads["segmented"]).abs().max() < 1e-10


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_context_reused_for_a_second_generation_starts_over(cache):
    model = tiny_llm("qwen3", attn="gaze")
    ids, mask, layout = prompt_batch(num_context=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, cache_implementation=cache)
    with use_gaze(GazeContext(layout, top_k=1)):
        fresh = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    ctx = GazeContext(layout, top_k=1)
    with use_gaze(ctx):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation=cache)
        again = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(fresh, again)


def test_sliding_window_layers_are_rejected():
    ids, mask, layout = prompt_batch()
    config = AutoConfig.for_model(**TINY["qwen2"], use_sliding_window=True, sliding_window=8, max_window_layers=0)
    windowed = AutoModelForCausalLM.from_config(config, attn_implementation="gaze")
    with pytest.raises(NotImplementedError, match="sliding-window"), use_gaze(GazeContext(layout)):
        windowed(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("shared", [False, True])
def test_static_selection_keeps_the_first_generated_tokens_regions_exactly(shared):
    """selection="static": every decode step reuses, per layer and head, the regions the first generated
    token chose; each step equals the reference attention under that fixed routing. "dynamic" re-selects."""
    from types import SimpleNamespace

    from gazelit.attention import reference_attention, reference_routing
    from gazelit.attention.hf import gaze_attention

    from .cases import random_case

    case = random_case(31, hq=4, hkv=2, d=8, dtype=torch.float64, num_context=2, padding="left")
    layout, length = case.layout, case.layout.length
    g = torch.Generator().manual_seed(5)
    steps = 4
    k = torch.randn(2, 2, length + steps, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, length + steps, 8, generator=g, dtype=torch.float64)
    q = torch.randn(2, 4, steps, 8, generator=g, dtype=torch.float64)
    module = SimpleNamespace(layer_idx=0, training=False)
    outs = {}
    for selection in ("static", "dynamic"):
        ctx = GazeContext(layout, top_k=1, shared_gqa=shared, selection=selection, record_routing=True)
        ctx.seen[0] = length
        rows = []
        for s in range(steps):
            end = length + s + 1
            out, _ = gaze_attention(module, q[:, :, s : s + 1], k[:, :, :end], v[:, :, :end], None, gaze=ctx)
            rows.append(out)
        outs[selection] = (torch.cat(rows, 1), [r.indices for r in ctx.routing])
    first, _ = reference_routing(q[:, :, :1], k[:, :, : length + 1], layout, 1, q_offset=length, shared=shared)
    for s in range(steps):
        end = length + s + 1
        want = reference_attention(q[:, :, s : s + 1], k[:, :, :end], v[:, :, :end], layout, 1, q_offset=end - 1,
                                   routing=first)  # fmt: skip
        assert (outs["static"][0][:, s : s + 1] - want.transpose(1, 2)).abs().max() < 1e-10
        assert torch.equal(outs["static"][1][s], first[:, :, 0])
    assert any(not torch.equal(a, b) for a, b in zip(outs["dynamic"][1], outs["static"][1]))
