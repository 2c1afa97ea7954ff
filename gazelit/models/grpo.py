"""GRPO (group relative policy optimisation) with a grounding reward, torch only: the pieces the
LightningModule's `train.stage: grpo` puts together.

A training batch (teacher-forced, with labels) gives prompts (everything before the first supervised
token) and the truth (the first supervised answer: its look box, if any, and its text outside look spans).
Each prompt is sampled `group` times; every completion is rewarded

    reward = w_format * well-formed looks + w_iou * IoU(first look box, true box) + w_answer * exact answer

(the look terms count when the model has look spans and the truth has a box), advantages are the rewards
standardised within their group, and the loss is the clipped surrogate of PPO per completion token,
averaged per completion and then over completions, plus `kl` times the k3 estimate of the KL divergence
to a frozen reference policy (DeepSeekMath, arXiv:2402.03300).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazelit.attention.layout import PAD, TEXT
from gazelit.attention.look import LookTokens, bins_to_box, box_iou
from gazelit.batch import answer_prompts

IGNORE = -100


@dataclass
class Truth:
    """What one prompt should produce: the answer text (outside look spans) and the first look's box."""

    answer_ids: list[int]
    box: tuple[float, float, float, float] | None


def prompts_and_truths(batch: dict, pad_id: int, eos_id: int, looks: LookTokens | None) -> tuple[dict, list[Truth]]:
    """Left-padded prompts cut before each sample's first supervised token (gazelit.batch.answer_prompts),
    and each sample's truth: the supervised tokens from there to the first end-of-turn (inclusive)."""
    prompts = answer_prompts(batch, pad_id)
    truths = []
    for row in batch["labels"].tolist():
        answer = []
        for token in row[next(i for i, t in enumerate(row) if t != IGNORE) :]:
            if token == IGNORE:
                break
            answer.append(token)
            if token == eos_id:
                break
        truths.append(_truth(answer, looks))
    return prompts, truths


def _truth(answer: list[int], looks: LookTokens | None) -> Truth:
    if looks is None:
        return Truth(answer, None)
    box, kept, inside, locs = None, [], False, []
    for token in answer:
        if token == looks.open:
            inside, locs = True, []
        elif token == looks.close:
            inside = False
        elif inside:
            if token in looks.locs and len(locs) < 4:
                locs.append(looks.locs[token])
                if len(locs) == 4 and box is None:
                    box = bins_to_box(tuple(locs), looks.bins)
        else:
            kept.append(token)
    return Truth(kept, box)


def repeat_batch(batch: dict, times: int) -> dict:
    """Every sample `times` times in a row (sample i -> rows i*times .. i*times + times - 1), units with it."""
    b = batch["input_ids"].shape[0]
    order = torch.arange(b, device=batch["input_ids"].device).repeat_interleave(times)
    out = {k: v[order] for k, v in batch.items() if k in ("input_ids", "token_kind", "attention_mask", "labels")}
    units = batch["unit_sample"]
    per_sample = [(units == i).nonzero().flatten() for i in range(b)]
    picks = torch.cat([per_sample[i] for i in order.tolist()]) if units.numel() else units
    new_sample = torch.cat([torch.full((per_sample[i].numel(),), r, dtype=units.dtype, device=units.device)
                            for r, i in enumerate(order.tolist())]) if units.numel() else units  # fmt: skip
    out.update(
        pixel_values=batch["pixel_values"][picks], unit_sample=new_sample, unit_start=batch["unit_start"][picks],
        unit_grid=batch["unit_grid"][picks], unit_video=batch["unit_video"][picks],
        unit_time=batch["unit_time"][picks], num_context=batch["num_context"],
    )  # fmt: skip
    return out


def completion_batch(prompts: dict, completions: list[list[int]], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Prompts (left-padded, P positions) with their completions appended (right-padded to T): the batch
    to score, and the (B, T) mask of completion tokens. labels hold the completion tokens."""
    b, p = prompts["input_ids"].shape
    t = max(1, max(len(c) for c in completions))
    device = prompts["input_ids"].device
    ids = torch.full((b, t), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, t, dtype=torch.bool, device=device)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
        mask[i, : len(c)] = True
    kinds = torch.where(mask, TEXT, PAD)
    out = dict(prompts)
    out["input_ids"] = torch.cat([prompts["input_ids"], ids], 1)
    out["token_kind"] = torch.cat([prompts["token_kind"], kinds], 1)
    out["attention_mask"] = (out["token_kind"] != PAD).long()
    out["labels"] = torch.cat([torch.full((b, p), IGNORE, device=device), ids.masked_fill(~mask, IGNORE)], 1)
    return out, mask


def completion_logprobs(logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """log pi(token) of every completion token (B, T), float32; 0 where `mask` is False."""
    t = mask.shape[1]
    p = batch["input_ids"].shape[1] - t
    predicting = logits[:, p - 1 : p - 1 + t].float()  # logits at position j predict token j + 1
    tokens = batch["input_ids"][:, p:]
    logp = predicting.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0)


@dataclass
class Rewards:
    total: torch.Tensor  # (N,)
    well_formed: torch.Tensor
    iou: torch.Tensor
    answer: torch.Tensor


def rewards(outputs, truths: list[Truth], group: int, weights: tuple[float, float, float], tokenizer,
            looks_on: bool) -> Rewards:  # fmt: skip
    """Reward of each sampled completion (outputs in prompt-major order, `group` per prompt)."""
    w_format, w_iou, w_answer = weights
    formed, ious, right = [], [], []
    for j, out in enumerate(outputs):
        truth = truths[j // group]
        ok = bool(out.looks) and out.looks_opened == len(out.looks) and all(x.end is not None for x in out.looks)
        formed.append(float(ok))
        ious.append(box_iou(out.looks[0].box, truth.box) if out.looks and truth.box is not None else 0.0)
        want = tokenizer.decode(truth.answer_ids, skip_special_tokens=True).strip()
        right.append(float(out.text.strip() == want))
    formed_t, iou_t, right_t = (torch.tensor(x) for x in (formed, ious, right))
    total = w_answer * right_t
    if looks_on:
        has_box = torch.tensor([truths[j // group].box is not None for j in range(len(outputs))])
        total = total + w_format * formed_t + w_iou * iou_t * has_box
    return Rewards(total, formed_t, iou_t, right_t)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); a group whose rewards are all equal gets 0."""
    r = rewards.view(-1, group).float()
    std = r.std(-1, keepdim=True, unbiased=False) if group > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(-1, keepdim=True)) / (std + eps)).view(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    kl: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate per completion token, mean per completion, mean over completions (+ kl * k3 KL)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    per_token = -surrogate
    stats = {"clip_fraction": ((ratio - 1).abs() > clip)[mask].float().mean()}
    if kl and ref_logp is not None:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        per_token = per_token + kl * k3
        stats["kl"] = k3.detach()[mask].mean()
    lengths = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / lengths).mean()
    return loss, stats
