"""`BenchmarkScores`: a torchmetrics Metric that accumulates per-sample scores with their category and
group, and reports the mean, per-category means and group ("all of a pair / circular set right") accuracy.

Its states are tensors reduced by concatenation, so it syncs across ranks like any torchmetrics metric.
Categories and groups are strings; they are stored as stable 63-bit hashes (the same on every rank) and
named again from the strings this process has seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def stable_id(text: str) -> int:
    """A 63-bit integer id of a string, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


class BenchmarkScores(Metric):
    """update(scores, categories, groups); compute() -> dict with `mean`, `count`, `per_category`
    ({name: (mean, count)}), `group_accuracy` / `groups` (fraction of groups whose samples all scored 1)
    and `per_category_group_accuracy`. A sample in no pair or set passes a group of its own (its id)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("category_ids", default=[], dist_reduce_fx="cat")
        self.add_state("group_ids", default=[], dist_reduce_fx="cat")
        self._names: dict[int, str] = {}

    def update(self, scores: Sequence[float], categories: Sequence[str], groups: Sequence[str]) -> None:
        if not len(scores) == len(categories) == len(groups):
            raise ValueError("scores, categories and groups must have the same length")
        cats = []
        for c in categories:
            cats.append(stable_id(c))
            self._names[cats[-1]] = c
        self.scores.append(torch.tensor(list(scores), dtype=torch.float64, device=self.device))
        self.category_ids.append(torch.tensor(cats, dtype=torch.long, device=self.device))
        ids = [stable_id(g) for g in groups]
        self.group_ids.append(torch.tensor(ids, dtype=torch.long, device=self.device))

    def compute(self) -> dict:
        if not self.scores:
            return {"mean": float("nan"), "count": 0, "per_category": {}, "group_accuracy": float("nan"),
                    "groups": 0, "per_category_group_accuracy": {}}
        scores, cats, groups = (dim_zero_cat(s).cpu() for s in (self.scores, self.category_ids, self.group_ids))
        per_category = {}
        per_category_groups = {}
        for cid in torch.unique(cats).tolist():
            mask = cats == cid
            name = self._names.get(cid, f"{cid:x}")
            per_category[name] = (float(scores[mask].mean()), int(mask.sum()))
            per_category_groups[name] = _group_accuracy(scores[mask], groups[mask])
        return {
            "mean": float(scores.mean()),
            "count": int(scores.numel()),
            "per_category": per_category,
            "group_accuracy": _group_accuracy(scores, groups)[0],
            "groups": _group_accuracy(scores, groups)[1],
            "per_category_group_accuracy": per_category_groups,
        }


def _group_accuracy(scores: torch.Tensor, groups: torch.Tensor) -> tuple[float, int]:
    unique, inverse = torch.unique(groups, return_inverse=True)
    wrong = torch.zeros(len(unique), dtype=torch.long).index_add_(0, inverse, (scores < 1).long())
    return float((wrong == 0).double().mean()), len(unique)
