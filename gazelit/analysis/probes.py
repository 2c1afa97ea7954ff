"""Dense attention maps over visual tokens, computed from the GazeContext `probe` hook.

After every gaze attention call the backend hands the probe the post-RoPE queries and the cached keys.
From them `dense_visual_attention` computes what *dense* attention would give a query row: the softmax of
q . k * scale over every real key up to the query (text, visual and context tokens; padding excluded),
then keeps the probabilities of the visual tokens, in layout order (units in sequence order, raster order
within a unit). The model's own output is untouched: this is for the routing viewer ("dense attention
beside it") and for gaze-head scores.

  GenerationMapProbe   the last query row of every call of a generation -> (steps, layers, heads, V)
  RowMapProbe          chosen query rows of one teacher-forced forward -> per layer (B, heads, rows, V)

Pass a probe to `GazeVLM.forward(..., probe=...)` or `generate_from_batch(..., probe=...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gazelit.attention import PAD, VISUAL


@torch.no_grad()
def dense_visual_attention(
    query: torch.Tensor, key: torch.Tensor, layout: Any, q_offset: int, scale: float | None,
    sample: int, rows: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """(Hq, len(rows), V) dense attention probabilities on the sample's V visual tokens for the given query
    rows (indices into the query block, whose first row sits at position `q_offset`)."""
    hq, d = query.shape[1], query.shape[-1]
    hkv = key.shape[1]
    rows = torch.as_tensor(rows, dtype=torch.long, device=query.device)
    q = query[sample][:, rows].float()  # (Hq, n, D)
    positions = q_offset + rows  # (n,)
    s = int(positions.max()) + 1 if rows.numel() else 0
    k = key[sample, :, :s].float()  # (Hkv, S, D)
    kinds = layout.kinds_at(torch.arange(s, device=query.device))[sample]  # (S,)
    scale = d**-0.5 if scale is None else scale
    logits = torch.einsum("hgnd,hsd->hgns", q.view(hkv, hq // hkv, -1, d), k).reshape(hq, -1, s) * scale
    allowed = (kinds != PAD)[None, :] & (torch.arange(s, device=query.device)[None, :] <= positions[:, None])
    probs = logits.masked_fill(~allowed[None], float("-inf")).softmax(-1)
    visual = (kinds == VISUAL).nonzero().flatten()
    return probs[:, :, visual]


class GenerationMapProbe:
    """Dense maps of the query that produces each generated token, for one sample of the batch.

    Calls come layer by layer, forward after forward (the prefill's last row produces the first token);
    `maps()` stacks them to (steps, layers, Hq, V) float32."""

    def __init__(self, num_layers: int, sample: int = 0):
        self.num_layers = num_layers
        self.sample = sample
        self._calls: list[torch.Tensor] = []

    def __call__(self, *, layer, query, key, value, layout, q_offset, scale, top_k) -> None:
        last = query.shape[2] - 1
        self._calls.append(
            dense_visual_attention(query, key, layout, q_offset, scale, self.sample, [last])[:, 0].cpu()
        )

    def maps(self) -> torch.Tensor:
        steps = len(self._calls) // self.num_layers
        if not steps:
            return torch.zeros(0, self.num_layers, 0, 0)
        return torch.stack(self._calls[: steps * self.num_layers]).view(steps, self.num_layers,
                                                                          *self._calls[0].shape)


class RowMapProbe:
    """Dense maps of chosen query rows of every sample in one forward: `maps[layer]` is a list over the
    batch of (Hq, rows_b, V_b) tensors (rows and visual counts differ between samples)."""

    def __init__(self, rows: Sequence[Sequence[int]]):
        self.rows = [list(r) for r in rows]
        self.maps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, *, layer, query, key, value, layout, q_offset, scale, top_k) -> None:
        self.maps[layer] = [
            dense_visual_attention(query, key, layout, q_offset, scale, b, r).cpu() for b, r in enumerate(self.rows)
        ]


def require_gaze(model: Any) -> None:
    """Probes read attention through the gaze backend's hook: refuse a dense baseline clearly."""
    if not model.gaze_enabled:
        raise ValueError("attention probes need a gaze-enabled model (model.gaze.enabled: true): the dense "
                         "baseline runs the LLM's own attention, which has no probe hook")
