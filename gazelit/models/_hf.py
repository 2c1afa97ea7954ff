"""Small helpers shared by the transformers-backed builders: option checking and dtype parsing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def check_options(options: Mapping[str, Any] | None, allowed: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`allowed` (name -> default) updated with `options`; an unknown name is a ValueError, not ignored,
    so a typo in a recipe fails loudly instead of silently falling back to the default."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options are {sorted(allowed)}")
    return {**allowed, **options}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """Accept a torch.dtype, its name ("bfloat16", "torch.float16"), "auto", or None (transformers' default)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype):
            return resolved
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype, a name such as 'bfloat16', 'auto' or None")


def exactly_one_source(pretrained: str | None, config: Mapping[str, Any] | None, what: str) -> None:
    """Builders take weights from exactly one place: a checkpoint (`pretrained`) or a config (random init)."""
    if (pretrained is None) == (config is None):
        problem = "both" if pretrained is not None else "neither of"
        raise ValueError(
            f"{what}: got {problem} `pretrained` and `config`; give exactly one "
            "(`pretrained`: hub id or local directory; `config`: mapping of config fields for a random init)"
        )


def checkpoint_dtype(config: Any, requested: torch.dtype | str | None) -> torch.dtype:
    """The dtype `from_pretrained` gives a checkpoint's parameters: the requested one, else ("auto" or
    None) the dtype its config records, else float32."""
    if isinstance(requested, torch.dtype):
        return requested
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded.removeprefix("torch."), None)
    return recorded if isinstance(recorded, torch.dtype) else torch.float32
