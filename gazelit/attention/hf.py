"""Gaze Attention as a transformers attention backend ("gaze"), so stock decoder layers run it unchanged.

`register()` adds the attention function to transformers' AttentionInterface and a mask hook to its
AttentionMaskInterface. Load or switch a model with `attn_implementation="gaze"`; Qwen3, Qwen2 (Qwen2.5)
and Llama attention modules then call `gaze_attention` with their post-RoPE queries and the cache's keys.

Dispatch per call (per layer):
  no GazeContext                     -> plain causal attention with padding (the base model)
  queries start at position 0        -> full path: segmented (CPU) / flex (CUDA) / reference
  later queries, all text            -> cached decode (descriptors and non-visual K/V built once per layer):
                                        fused Triton kernels on CUDA (triton_decode), torch elsewhere
  later queries holding visual units -> full path with a query offset (e.g. a new image in a later turn)
Static caches hand over their whole buffer; the query offset transformers computes from the cache (seen by
the mask hook) says how much of it is real. With a context the HF `attention_mask` is not read: the layout
marks padding.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gazelit.attention.context import GazeContext, RoutingRecord, active_context
from gazelit.attention.decode import build_state, decode_attention
from gazelit.attention.flex import flex_gaze_attention
from gazelit.attention.layout import TEXT
from gazelit.attention.reference import reference_attention, reference_routing
from gazelit.attention.routing import accumulate_routing_stats
from gazelit.attention.segmented import segmented_attention

NAME = "gaze"

# Every full-sequence path: the same signature (q, k, v, layout, top_k, *, scale, q_offset, shared,
# routing, stats) and output layout (B, Hq, Lq, D), statistics collected on each
PATHS = {"reference": reference_attention, "segmented": segmented_attention, "flex": flex_gaze_attention}


def gaze_mask_hook(*args, **kwargs) -> torch.Tensor | None:
    """Mask hook of the gaze backend, called once per model forward.

    Inside `use_gaze(ctx)` no mask is built: the layout carries padding, causality and routing, so the
    O(Lq * S) boolean mask transformers would make is skipped; the hook only notes where the new queries
    start in the cache (transformers' q_offset, exact for dynamic and static caches). Without a context the
    model is the base model, and the hook builds exactly the mask transformers builds for SDPA.
    """
    ctx = active_context()
    if ctx is None:
        return sdpa_mask(*args, **kwargs)
    ctx.query_window = (int(kwargs.get("q_offset", 0)), int(kwargs["q_length"]))
    return None


def gaze_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    gaze: GazeContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query (B, Hq, Lq, D); key/value (B, Hkv, S, D) -> (B, Lq, Hq, D)."""
    ctx = gaze if gaze is not None else active_context()
    layer = getattr(module, "layer_idx", 0)
    lq, s = query.shape[2], key.shape[2]
    if ctx is None:  # the base model
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if sliding_window is not None:
        raise NotImplementedError(f"layer {layer}: gaze attention does not support sliding-window layers")
    if dropout and module.training:
        raise NotImplementedError("gaze attention does not support attention dropout; set attention_dropout=0")

    if lq == s:
        q0 = 0
    elif ctx.query_window is not None and ctx.query_window[1] == lq:
        q0 = ctx.query_window[0]
    else:  # called without the mask hook (gaze= kwarg): count positions per layer
        q0 = ctx.seen.get(layer, 0)
    valid = q0 + lq
    if valid > s:
        raise RuntimeError(
            f"layer {layer}: the context has seen {q0} positions but the cache holds {s - lq}; "
            "use a fresh GazeContext for every new sequence"
        )
    ctx.seen[layer] = valid
    key, value = key[:, :, :valid], value[:, :, :valid]
    layout = ctx.layout
    positions = torch.arange(q0, valid, device=query.device)

    if q0 > 0 and bool((layout.kinds_at(positions) == TEXT).all()):
        state = ctx.decode_states.get(layer)
        if state is None:
            state = ctx.decode_states[layer] = build_state(key, value, layout, q0)
        fixed = None
        if ctx.selection == "static" and layer in ctx.static_routing:
            kept = ctx.static_routing[layer]
            fixed = kept.expand(-1, -1, query.shape[2], -1)
        out, sel, scores = decode_path(ctx, query)(
            query, key, value, layout, state, ctx.top_k, q0, scale=scaling, shared=ctx.shared_gqa, routing=fixed,
            looks=ctx.looks,
        )
        if ctx.selection == "static" and layer not in ctx.static_routing:
            ctx.static_routing[layer] = sel[:, :, :1].clone()  # the first generated token's selection
        if ctx.record_routing:
            ctx.routing.append(RoutingRecord(layer, valid - 1, sel[:, :, -1], scores[:, :, -1]))
        if ctx.collect_stats:
            accumulate_routing_stats(ctx.stats, layout, sel, q0)
        _probe(ctx, layer, query, key, value, q0, scaling)
        return out.transpose(1, 2), None

    ctx.decode_states.pop(layer, None)  # new units may have arrived; rebuild at the next decode step
    ctx.static_routing.pop(layer, None)
    impl = ctx.impl
    if impl == "auto":
        impl = "flex" if query.is_cuda else "segmented"
    options = {"chunk": ctx.chunk} if impl == "segmented" else {}
    out = PATHS[impl](
        query, key, value, layout, ctx.top_k, scale=scaling, q_offset=q0, shared=ctx.shared_gqa,
        stats=ctx.stats if ctx.collect_stats else None, looks=ctx.looks, **options,
    ).transpose(1, 2)  # (B, Lq, Hq, D) for transformers (a free view for the segmented path)
    if ctx.record_routing:
        with torch.no_grad():
            idx, sc = reference_routing(query[:, :, -1:], key, layout, ctx.top_k, valid - 1, ctx.shared_gqa)
        ctx.routing.append(RoutingRecord(layer, valid - 1, idx[:, :, 0], sc[:, :, 0]))
    _probe(ctx, layer, query, key, value, q0, scaling)
    return out, None


def decode_path(ctx: GazeContext, query: torch.Tensor):
    """The cached-decode function: the fused Triton kernels on CUDA (or when asked for), else torch's."""
    if ctx.decode == "torch" or (ctx.decode == "auto" and not query.is_cuda):
        return decode_attention
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"gaze decode 'triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), these are on "
                           f"{query.device}; use model.gaze.decode: auto or torch")  # fmt: skip
    try:
        from gazelit.attention.triton_decode import fused_decode_attention
    except ImportError as e:  # no triton
        if ctx.decode == "triton":
            raise RuntimeError(f"gaze decode 'triton' needs the triton package: {e}") from None
        warnings.warn("triton is not installed: gaze decoding runs the torch path (pip install triton)", stacklevel=2)
        return decode_attention
    return fused_decode_attention


def _probe(ctx: GazeContext, layer, query, key, value, q0, scale) -> None:
    if ctx.probe is not None:
        ctx.probe(layer=layer, query=query, key=key, value=value, layout=ctx.layout, q_offset=q0, scale=scale,
                  top_k=ctx.top_k)


def register(name: str = NAME) -> str:
    """Register the gaze backend with transformers under `name` (idempotent). Returns the name."""
    AttentionInterface.register(name, gaze_attention)
    AttentionMaskInterface.register(name, gaze_mask_hook)
    return name
