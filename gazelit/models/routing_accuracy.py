"""Routing accuracy against the data's own object boxes, at the first answer token and at the question's
words that name the object.

For a sample whose record names the object its answer is about (`target_box`, [x0, y0, x1, y1] in 0..1
of the image, as the demo data writes it), take a text query and, in every layer and for every head, the
regions it selects (the top-k of q . descriptor among the candidate regions, exactly as the attention
does):

  routing accuracy  the fraction of the selected visual tokens that lie inside the object (the paper's
                    measure, with the box standing in for the segmentation mask);
  hit rate          whether the selection contains a token of the object;
  other-object hit  the same heads' hit rate on the board's other objects (records with `other_boxes`): a
                    head that selects every object, whatever the question names, hits them as often as the
                    named one, so routing that follows the question shows as the gap between the two.

Two queries are measured. The query that predicts the first answer token (keys without a prefix). And,
where the record gives `target_phrase` (the question's words that name the object, e.g. "red") and the
probe has the tokenizer, the query at the phrase's last token (keys under `at_name/`). A causal LM can
look up the object where the question names it and carry what it saw to the answer through text-to-text
attention; the answer token's query then need not select the object at all. In the first layer the
answer token's query is computed from the last prompt token alone, the same for every question, so there
it cannot follow the question; at the phrase it can.

Chance levels, for the same k and candidates: object tokens / candidate visual tokens (accuracy) and
1 - C(R - R_obj, k) / C(R, k) (hit rate; R candidate regions, R_obj of them touching the object).
A token is inside the box when its cell's centre is. Videos: the box is in the unit of the record's
`target_frame` (mapped through the sampled `frame_indices`). For a model with look spans (`look_close`,
the id of `</look>`) the first answer token is the one after the answer's look spans: the query at their
last `</look>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gazelit.attention.layout import TEXT, GazeLayout
from gazelit.attention.routing import region_descriptors, region_scores, select_regions


@dataclass
class RoutingSums:
    """Running sums for one kind of query: per layer, a (heads,) tensor summed over samples."""

    inside: dict[int, torch.Tensor] = field(default_factory=dict)  # routing accuracy
    hits: dict[int, torch.Tensor] = field(default_factory=dict)
    other_hits: dict[int, torch.Tensor] = field(default_factory=dict)  # mean over the board's other objects
    paired_hits: dict[int, torch.Tensor] = field(default_factory=dict)  # named-object hits on those samples
    samples: int = 0
    paired: int = 0
    chance_inside: float = 0.0
    chance_hit: float = 0.0

    def metrics(self) -> dict[str, float]:
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
            named, other = self._paired_rates()
            out["hit_rate_other_best_head"] = float(other.flatten()[int(named.flatten().argmax())])
            out["question_gap_best"] = float((named - other).max())
            out["question_gap_mean"] = float((named - other).mean())
            for layer in range(named.shape[0]):
                out[f"question_gap/layer{layer}"] = float((named[layer] - other[layer]).max())
        for layer in range(hits.shape[0]):
            out[f"routing_acc/layer{layer}"] = float(inside[layer].mean())
            out[f"hit_rate/layer{layer}"] = float(hits[layer].mean())
        return out

    def _paired_rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, heads) hit rates on the named object and on the other objects, over the paired samples."""
        layers = sorted(self.paired_hits)
        named = torch.stack([self.paired_hits[layer] for layer in layers]) / self.paired
        other = torch.stack([self.other_hits[layer] for layer in layers]) / self.paired
        return named, other

    def question_head(self) -> tuple[int, int, float] | None:
        """(layer, head, gap) of the head whose selection follows the question most: the largest hit rate
        on the named object minus its hit rate on the board's other objects. None without other objects."""
        if not self.paired:
            return None
        named, other = self._paired_rates()
        gap = (named - other).flatten()
        index = int(gap.argmax())
        layer, head = divmod(index, named.shape[1])
        return sorted(self.paired_hits)[layer], head, float(gap[index])


@dataclass
class _Target:
    sample: int
    answer_row: int
    name_row: int | None  # the last token of the question's target_phrase (None: not found or not given)
    tokens: torch.Tensor  # the object's visual token positions
    others: list[torch.Tensor]  # each other object's token positions


class RoutingAccuracy:
    """A probe for GazeVLM.forward (`probe=`) plus the running sums per (layer, head). `tokenizer` (the
    model's) enables the measurement at the question's target_phrase."""

    def __init__(self, top_k: int, shared: bool = False, look_close: int | None = None, tokenizer=None):
        self.top_k, self.shared, self.look_close, self.tokenizer = top_k, shared, look_close, tokenizer
        self.at_answer = RoutingSums()
        self.at_name = RoutingSums()
        self.name_missing = 0  # samples with a target_phrase the probe could not find in the prompt
        self._targets: list[_Target] = []
        self._phrase_ids: dict[str, list[torch.Tensor]] = {}
        self.batch: dict | None = None  # set before each forward; targets are found at its first layer
        self._layout = None

    def prepare(self, batch: dict, layout: GazeLayout) -> bool:
        """Pick, per sample with a box, the query rows and the object's tokens; False if none has one."""
        self._targets = []
        labels = batch["labels"]
        for b, meta in enumerate(batch.get("meta") or []):
            meta = meta or {}
            box = meta.get("target_box")
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
            unit = _target_unit(meta, units)
            if unit is None:
                continue
            rows, cols = unit.grid
            r = torch.arange(rows).repeat_interleave(cols)
            c = torch.arange(cols).repeat(rows)
            cx, cy = (c + 0.5) / cols, (r + 0.5) / rows

            def tokens_in(box):
                inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
                return (unit.start + inside.nonzero().flatten()).to(layout.device)

            tokens = tokens_in(box)
            others = [t for t in map(tokens_in, meta.get("other_boxes") or []) if t.numel()]
            name_row = None
            if meta.get("target_phrase") and self.tokenizer is not None:
                name_row = self._phrase_row(batch["input_ids"][b, :row], meta["target_phrase"])
                if name_row is not None and int(layout.kind[b, name_row]) != TEXT:
                    name_row = None
                self.name_missing += name_row is None
            if tokens.numel():
                self._targets.append(_Target(b, row, name_row, tokens, others))
        return bool(self._targets)

    def _phrase_row(self, ids: torch.Tensor, phrase: str) -> int | None:
        if phrase not in self._phrase_ids:
            self._phrase_ids[phrase] = phrase_spellings(self.tokenizer, phrase)
        return last_phrase_end(ids, self._phrase_ids[phrase])

    def __call__(self, *, layer, query, key, layout, q_offset=0, **_) -> None:
        if q_offset or self.batch is None:  # only full forwards (validation), never cached decode steps
            return
        if layout is not self._layout:
            self._layout = layout
            self.prepare(self.batch, layout)
        if not self._targets:
            return
        descriptors = region_descriptors(key, layout)
        for target in self._targets:
            self._tally(self.at_answer, target, target.answer_row, layer, query, key, descriptors, layout)
            if target.name_row is not None:
                self._tally(self.at_name, target, target.name_row, layer, query, key, descriptors, layout)

    def _tally(self, sums: RoutingSums, target: _Target, row: int, layer, query, key, descriptors, layout) -> None:
        b, obj, others = target.sample, target.tokens, target.others
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
        sums.inside[layer] = sums.inside.get(layer, 0) + inside.float().cpu()
        sums.hits[layer] = sums.hits.get(layer, 0) + hit.cpu()
        if others:
            other = torch.stack([(torch.isin(tokens, o) & valid).any(-1).any(-1).float() for o in others])
            sums.other_hits[layer] = sums.other_hits.get(layer, 0) + other.mean(0).cpu()
            sums.paired_hits[layer] = sums.paired_hits.get(layer, 0) + hit.cpu()
        if layer == 0:
            sums.samples += 1
            sums.paired += bool(others)
            sizes = (layout.region_tokens[b] >= 0).sum(-1)  # (R,)
            candidates = available & (sizes > 0)
            region_of = layout.region[b][obj]
            touching = int(torch.unique(region_of[region_of >= 0]).numel())
            total = int(candidates.sum())
            visual = int(sizes[candidates].sum())
            k = min(self.top_k, total)
            sums.chance_inside += obj.numel() / max(visual, 1)
            sums.chance_hit += 1.0 - (math.comb(total - touching, k) / math.comb(total, k) if total else 1.0)

    def question_head(self) -> tuple[int, int, float] | None:
        """At the first answer token, (layer, head, gap) of the head that follows the question most."""
        return self.at_answer.question_head()

    def metrics(self) -> dict[str, float]:
        """Means over samples: routing accuracy and hit rate (all layers and heads, and per layer), the
        best (layer, head)'s hit rate, the chance levels, and, with other_boxes, the named-minus-other gaps;
        at the first answer token, and under `at_name/` at the question's target_phrase."""
        out = self.at_answer.metrics()
        if out:
            out.update({f"at_name/{k}": v for k, v in self.at_name.metrics().items()})
            if self.name_missing:
                out["at_name/phrase_not_found"] = float(self.name_missing)
        return out


def phrase_spellings(tokenizer, phrase: str) -> list[torch.Tensor]:
    """The phrase's token ids after a space and at the start of a line (BPE tokenizers write a word
    differently after a space)."""
    encoded = (tokenizer(s, add_special_tokens=False)["input_ids"] for s in (" " + phrase, phrase))
    return [torch.tensor(ids, dtype=torch.long) for ids in encoded if ids]


def last_phrase_end(ids: torch.Tensor, spellings: list[torch.Tensor]) -> int | None:
    """Position in `ids` of the last token of the phrase's last occurrence (None: it does not occur)."""
    best = None
    for pattern in spellings:
        n = pattern.numel()
        if ids.numel() < n:
            continue
        found = (ids.unfold(0, n, 1) == pattern.to(ids.device)).all(-1).nonzero().flatten()
        if found.numel():
            end = int(found[-1]) + n - 1
            best = end if best is None else max(best, end)
    return best


def _target_unit(meta: dict, units: list):
    """The unit holding the target: the first (images), or the video frame `target_frame` names."""
    frame = meta.get("target_frame")
    if frame is None:
        return units[0]
    indices = list(meta.get("frame_indices") or range(len(units)))
    if frame not in indices or indices.index(frame) >= len(units):
        return None  # the frame was not sampled: nothing to measure against
    return units[indices.index(frame)]
