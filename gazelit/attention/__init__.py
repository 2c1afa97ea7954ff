"""Gaze Attention: top-k region routing of text queries over cached visual keys, with context tokens.

Exact semantics (every clause is tested in tests/attention/):

A packed sequence holds text tokens and visual units (an image, or one frame of a video). Unit u has a
grid of H_u x W_u visual tokens in raster order (frames of one video share a grid and carry a time
index) followed by M learnable context tokens (M may be 0).

* Regions. Each unit's grid is tiled into r_h x r_w regions; edge tiles are smaller when the grid does
  not divide, no token is dropped. For video, r_t consecutive frames of one video (in time order) may
  form one spatio-temporal region. A region's descriptor is the mean of its keys, exactly the keys the
  attention uses (after RoPE), per KV head.
* Text queries attend to: every earlier text token and themselves (causal); the context tokens of every
  unit that precedes the query; and, per query head, the visual tokens of the top-k regions ranked by
  q . descriptor among the regions whose units all precede the query. k is an integer or "all" (None);
  with fewer than k candidate regions all of them are taken. Equal scores: the lower region index
  is taken first (on every path and device).
* Visual queries attend densely and causally, as the base model does.
* Context-token queries attend only to their own unit: its visual tokens and its own context tokens up
  to themselves.
* GQA: query head h reads KV head h // (Hq / Hkv). Selection is per query head by default; with
  `shared_gqa` one selection per KV head is made from the scores summed over its query heads.
* top-k is not differentiable. Gradients flow through the attention into the queries and the selected
  keys/values; keys of unselected regions receive no gradient from routed queries.
* Padding tokens are never attended; padding query rows produce meaningless outputs (ignore them).
* Candidates. A spatio-temporal region becomes a candidate only once all of its frames (context
  tokens included) precede the query. Until then its tokens are invisible to text queries, at every k
  (k = "all" and k = 0 alike): a text token, an image or another video's frames placed between the
  frames of one region group do not see that group's earlier frames.

Dense limit: with k = "all" and M = 0 this is exactly dense causal attention *when no text query lies
inside a frame group* (between two frames that share regions). Where one does, the candidate clause
governs and that text does not see the group's earlier frames, so the result differs from dense.

Every full-sequence path (reference, segmented, flex; `hf.PATHS`) has one signature and output layout:

    path(q, k, v, layout, top_k, *, scale=None, q_offset=0, shared=False, routing=None, stats=None, ...)
    q (B, Hq, Lq, D) at positions [q_offset, q_offset + Lq); k, v (B, Hkv, S, D) -> (B, Hq, Lq, D)

`top_k` is an int or None (all regions; resolved once, by gazelit.schema); `routing` (B, Hq, Lq, kk)
overrides the selection (tests, oracle routing); `stats` collects attended / available visual tokens.
The cached decode path returns the same (B, Hq, n, D) layout, plus the selection it made.

Look spans (GazeVLM, `look`): text queries between a `<look> box` and its `</look>` add a bias (a
negative float, or -inf) to visual keys outside the box, and with routing the box's regions are forced
into their selection; every path takes them as `looks=` (see gazelit.attention.look).

Modules: layout (token roles and regions), look (look spans), routing (descriptors, scores, top-k), reference (exact mask +
SDPA, the oracle), segmented (CPU fast path, fused flash kernels per segment), flex (GPU fast path,
FlexAttention), decode (cached decode over gathered K/V), context (what travels with a forward), hf
(the transformers attention backend "gaze"). No Lightning here.
"""

from gazelit.attention.context import GazeContext, RoutingRecord, active_context, use_gaze
from gazelit.attention.decode import DecodeState, build_state, decode_attention
from gazelit.attention.flex import flex_gaze_attention
from gazelit.attention.hf import NAME as BACKEND_NAME
from gazelit.attention.hf import gaze_attention, register
from gazelit.attention.layout import CONTEXT, PAD, TEXT, VISUAL, GazeLayout, RegionShape, Unit
from gazelit.attention.look import Look, LookSet, LookTokens
from gazelit.attention.reference import gaze_mask, reference_attention, reference_routing
from gazelit.attention.routing import region_descriptors, region_scores, select_regions
from gazelit.attention.segmented import plan_pieces, segmented_attention

register()

__all__ = [
    "BACKEND_NAME",
    "CONTEXT",
    "PAD",
    "TEXT",
    "VISUAL",
    "DecodeState",
    "GazeContext",
    "GazeLayout",
    "Look",
    "LookSet",
    "LookTokens",
    "RegionShape",
    "RoutingRecord",
    "Unit",
    "active_context",
    "build_state",
    "decode_attention",
    "flex_gaze_attention",
    "gaze_attention",
    "gaze_mask",
    "plan_pieces",
    "reference_attention",
    "reference_routing",
    "region_descriptors",
    "region_scores",
    "register",
    "segmented_attention",
    "select_regions",
    "use_gaze",
]
