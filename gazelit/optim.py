"""Optimiser set-up for GazeVLM: AdamW parameter groups per component and warmup + cosine/linear decay.

Groups are named (projector, context, llm, vision; each split into decayed / not decayed) so Lightning's
LearningRateMonitor logs one learning rate per group. No weight decay on biases, norm weights, 1-D
parameters and the context tokens. Frozen parameters are left out.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from gazelit.schema import OptimConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Named AdamW groups for a GazeVLM (components: projector, context_tokens, llm, vision)."""
    lrs = {
        "projector": config.lr_projector,
        "llm": config.lr_llm,
        "vision": config.lr_vision,
        "context": config.lr_context if config.lr_context is not None else config.lr_projector,
    }
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = name.split(".", 1)[0]
        component = "context" if component == "context_tokens" else component
        if component not in lrs:
            raise ValueError(f"parameter {name!r} belongs to no optimiser group (expected one of {sorted(lrs)})")
        decay = component != "context" and not _no_decay(name, param)
        key = f"{component}" if decay else f"{component}_no_decay"
        group = groups.setdefault(
            key, {"name": key, "params": [], "lr": lrs[component], "weight_decay": config.weight_decay if decay else 0.0}
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, config)
    if not groups:
        raise ValueError("no trainable parameters: check the stage and the freeze settings")
    kwargs = {"betas": tuple(config.betas), "eps": config.eps}
    if config.fused is not None:
        kwargs["fused"] = config.fused
    return torch.optim.AdamW(groups, **kwargs)


def lr_multiplier(step: int, total: int, config: OptimConfig) -> float:
    """Factor on each group's peak lr at optimiser step `step` of `total`: linear warmup, then decay."""
    warmup = config.warmup_steps if config.warmup_steps is not None else int(round(config.warmup_ratio * total))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    if total_steps <= 0:
        raise ValueError("the lr schedule needs the total number of optimiser steps (trainer.max_steps > 0)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))
