"""Routing accuracy against the data's own object boxes, at the first answer token.

For a sample whose record names the object its answer is about (`target_box`, [x0, y0, x1, y1] in 0..1
of the image, as the demo data writes it), take the text query that predicts the first answer token and,
in every layer and for every head, the regions it selects (the top-k of q . descriptor among the
candidate regions, exactly as the attention does):

  routing accuracy  the fraction of the selected visual tokens that lie inside the object (the paper's
                    measure, with the box standing in for the segmentation mask);
  hit rate          whether the selection contains a token of the object;
  other-object hit  the same heads' hit rate on the board's other objects (records with `other_boxes`): a
                    head that selects every object, whatever the question names, hits them as often as the
                    named one, so routing that follows the question shows as the gap between the two.

Chance levels, for the same k and candidates: object tokens / candidate visual tokens (accuracy) and
1 - C(R - R_obj, k) / C(R, k) (hit rate; R candidate regions, R_obj of them touching the object).
A token is inside the box when its cell's centre is. For a model with look spans (`look_close`, the id of
`</look>`) the first answer token is the one after the answer's look spans: the query at their last
`</look>`.
"""

from __future__ import annotations

import math

import torch

from gazelit.attention.layout import TEXT, GazeLayout
from gazelit.attention.routing import region_descriptors, region_scores, select_regions


class RoutingAccuracy:
    """A probe for GazeVLM.forward (`probe=`) plus the running sums per (layer, head)."""

    def __init__(self, top_k: int, shared: bool = False, look_close: int | None = None):
        self.top_k, self.shared, self.look_close = top_k, shared, look_close
        self.inside: dict[int, torch.Tensor] = {}  # layer -> (heads,) routing accuracy summed over samples
        self.hits: dict[int, torch.Tensor] = {}
        self.other_hits: dict[int, torch.Tensor] = {}  # layer -> (heads,) other-object hit rate, summed
        self.paired_hits: dict[int, torch.Tensor] = {}  # the named object's hits on those same samples
        self.paired = 0
        self.samples = 0
        self.chance_inside = 0.0
        self.chance_hit = 0.0
        # (sample, query row, object token positions, each other object's token positions)
        self._targets: list[tuple[int, int, torch.Tensor, list[torch.Tensor]]] = []
        self.batch: dict | None = None  # set before each forward; targets are found at its first layer
        self._layout = None

    def prepare(self, batch: dict, layout: GazeLayout) -> bool:
        """Pick, per sample with a box, the query row and the object's tokens; False if none has one."""
        self._targets = []
        labels = batch["labels"]
        for b, meta in enumerate(batch.get("meta") or []):
            box = (meta or {}).get("target_box")
            supervised = (labels[b] != -100).nonzero().flatten()
            units = layout.samples[b].units
            if box is None or not supervised.numel() or not units:
                continue
            row = int(supervised[0]) - 1  # this query's output predicts the first answer token
            if self.look_close is not None:  # after the answer's look spans: the query at their last </look>
                gaps = (torch.diff(supervised) != 1).nonzero().flatten()
                first_turn = supervised[: int(gaps[0]) + 1] if gaps.numel() else supervised
                closes = first_turn[batch["input_ids"][b, first_turn] == self.look_close]
                if closes.numel():
                    row = int(closes[-1])
            ready = layout.region_ready[b] <= row
            if int(layout.kind[b, row]) != TEXT or not bool(ready.any()):
                continue  # no routed text query there (the answer follows a unit directly), or no candidate
            unit = units[0]
            rows, cols = unit.grid
            r = torch.arange(rows).repeat_interleave(cols)
            c = torch.arange(cols).repeat(rows)
            cx, cy = (c + 0.5) / cols, (r + 0.5) / rows

            def tokens_in(box):
                inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
                return (unit.start + inside.nonzero().flatten()).to(layout.device)

            tokens = tokens_in(box)
            others = [t for t in map(tokens_in, meta.get("other_boxes") or []) if t.numel()]
            if tokens.numel():
                self._targets.append((b, row, tokens, others))
        return bool(self._targets)

    def __call__(self, *, layer, query, key, layout, q_offset=0, **_) -> None:
        if q_offset or self.batch is None:  # only full forwards (validation), never cached decode steps
            return
        if layout is not self._layout:
            self._layout = layout
            self.prepare(self.batch, layout)
        if not self._targets:
            return
        descriptors = region_descriptors(key, layout)
        sizes = (layout.region_tokens >= 0).sum(-1)  # (B, R)
        for b, row, obj, others in self._targets:
            q = query[b, :, row : row + 1]  # (Hq, 1, D)
            available = layout.region_ready[b] <= row  # (R,)
            scores = region_scores(q, descriptors[b])
            idx, _ = select_regions(scores, available, self.top_k, key.shape[1], shared=self.shared)
            idx = idx[:, 0]  # (Hq, kk)
            tokens = layout.region_tokens[b][idx.clamp(min=0)]  # (Hq, kk, T)
            valid = (tokens >= 0) & (idx >= 0)[..., None]
            in_obj = torch.isin(tokens, obj) & valid
            selected = valid.sum((1, 2)).clamp(min=1)
            inside = in_obj.sum((1, 2)).float() / selected
            hit = in_obj.any(-1).any(-1).float()
            self.inside[layer] = self.inside.get(layer, 0) + inside.float().cpu()
            self.hits[layer] = self.hits.get(layer, 0) + hit.cpu()
            if others:
                other = torch.stack([(torch.isin(tokens, o) & valid).any(-1).any(-1).float() for o in others])
                self.other_hits[layer] = self.other_hits.get(layer, 0) + other.mean(0).cpu()
                self.paired_hits[layer] = self.paired_hits.get(layer, 0) + hit.cpu()
            if layer == 0:
                self.samples += 1
                self.paired += bool(others)
                candidates = available & (sizes[b] > 0)
                region_of = layout.region[b][obj]
                touching = int(torch.unique(region_of[region_of >= 0]).numel())
                total = int(candidates.sum())
                visual = int(sizes[b][candidates].sum())
                k = min(self.top_k, total)
                self.chance_inside += obj.numel() / max(visual, 1)
                self.chance_hit += 1.0 - (math.comb(total - touching, k) / math.comb(total, k) if total else 1.0)

    def metrics(self) -> dict[str, float]:
        """Means over samples: routing accuracy and hit rate (all layers and heads, and per layer), the
        best (layer, head)'s hit rate, and the chance levels."""
        if not self.samples or not self.inside:
            return {}
        layers = sorted(self.inside)
        inside = torch.stack([self.inside[layer] for layer in layers]) / self.samples  # (layers, heads)
        hits = torch.stack([self.hits[layer] for layer in layers]) / self.samples
        out = {
            "routing_acc": float(inside.mean()), "routing_acc_chance": self.chance_inside / self.samples,
            "hit_rate_mean": float(hits.mean()), "hit_rate_best_head": float(hits.max()),
            "hit_rate_chance": self.chance_hit / self.samples, "samples": float(self.samples),
        }  # fmt: skip
        if self.paired:  # the best head's hit rate on the other objects, and the largest named-minus-other gap
            named = torch.stack([self.paired_hits[layer] for layer in layers]) / self.paired
            other = torch.stack([self.other_hits[layer] for layer in layers]) / self.paired
            out["hit_rate_other_best_head"] = float(other.flatten()[int(named.flatten().argmax())])
            out["question_gap_best"] = float((named - other).max())
            out["question_gap_mean"] = float((named - other).mean())
        for layer in range(hits.shape[0]):
            out[f"routing_acc/layer{layer}"] = float(inside[layer].mean())
            out[f"hit_rate/layer{layer}"] = float(hits[layer].mean())
        return out
