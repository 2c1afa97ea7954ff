"""Start-up at scale: build pretrained components without their weights, shard them, then read each rank's
shards straight from the Hugging Face safetensors files.

    with parameters_on_meta():                # parameters on the meta device, buffers computed for real
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    fully_shard(...)                          # FSDP2 on the meta parameters: no memory yet
    materialize(model, device)                # empty local shards; buffers (rotary inv_freq...) kept
    load_safetensors_shards(llm, path)        # every rank reads only its own rows of every tensor

Why parameters and not buffers: non-persistent buffers (rotary `inv_freq`, `position_ids`) are not in
the checkpoint, so they must be computed when the module is built; parameters are read from the files.
A parameter is moved to meta the moment it is registered, so `reset_parameters` and transformers'
`_init_weights` run on meta tensors (no time, no memory): nothing of the random init is ever computed.

Reading goes through torch.distributed.checkpoint's `HuggingFaceStorageReader`: for a sharded (DTensor)
parameter it reads only the rank's slice of the safetensors tensor, converting the file's dtype to the
parameter's. Without a process group it loads a plain module the same way (one process).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

__all__ = ["covers", "has_meta_parameters", "load_safetensors_shards", "materialize", "parameters_on_meta", "safetensors_shapes"]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside: every parameter registered on any module is replaced by a meta tensor of the same shape and
    dtype (accelerate's `init_empty_weights(include_buffers=False)`, without the dependency)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def has_meta_parameters(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter (sharded or not) uninitialised storage on `device`; real parameters and
    buffers are left as they are; a parameter shared by several modules (tied embeddings) stays shared. A
    meta buffer is an error: its value could not be recovered."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for n, p in sub._parameters.items():
            if p is not None and p.is_meta:
                holders.setdefault(id(p), []).append((sub, n))
    for name, sub in module.named_modules():
        if any(p.is_meta for p in sub.parameters(recurse=False)):
            keep = {n: b for n, b in sub._buffers.items() if b is not None and not b.is_meta}
            real = {n: p for n, p in sub._parameters.items() if p is not None and not p.is_meta}
            sub.to_empty(device=device, recurse=False)
            sub._buffers.update({n: b.to(device) for n, b in keep.items()})
            for n, p in real.items():  # to_empty replaced them too
                sub._parameters[n] = p
        meta_buffers = [n for n, b in sub._buffers.items() if b is not None and b.is_meta]
        if meta_buffers:
            raise RuntimeError(f"{name or 'model'}: buffers {meta_buffers} are on the meta device; build with "
                               "parameters_on_meta(), which keeps buffers real")  # fmt: skip
    for (first, first_name), *others in holders.values():  # to_empty gave each holder its own tensor
        for sub, n in others:
            sub._parameters[n] = first._parameters[first_name]


def safetensors_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a Hugging Face directory's safetensors files (their headers only)."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (shard-by-shard loading reads safetensors only)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def covers(module: nn.Module, directory: str | Path, prefix: str = "") -> bool:
    """Whether the directory's safetensors files hold every parameter of `module` under its own name. Not
    so for weights in another format, or where transformers renames tensors when it loads (e.g. DINOv2's
    `attention.attention.key` -> `k_proj`)."""
    try:
        available = safetensors_shapes(directory)
    except FileNotFoundError:
        return False
    return all(prefix + name in available for name, _ in module.named_parameters())


def load_safetensors_shards(module: nn.Module, directory: str | Path, prefix: str = "", group_bytes: int = 2**29) -> int:
    """Read every parameter of `module` from the safetensors files in `directory`, the file key being
    `prefix` + the parameter's name (shared parameters once, under their first name). Each rank reads only
    its shard of a DTensor parameter. Returns the number of tensors read; a parameter the files lack, or a
    shape that differs, is a ValueError naming them (nothing is left uninitialised silently)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    directory = Path(directory)
    shapes = safetensors_shapes(directory)
    params = {prefix + name: p for name, p in module.named_parameters()}
    missing = sorted(k for k in params if k not in shapes)
    if missing:
        raise ValueError(f"{directory}: the checkpoint does not hold these weights: {missing[:8]}"
                         f"{f' (and {len(missing) - 8} more)' if len(missing) > 8 else ''}")  # fmt: skip
    wrong = [f"{k}: file {shapes[k]}, model {tuple(p.shape)}" for k, p in params.items() if shapes[k] != tuple(p.shape)]
    if wrong:
        raise ValueError(f"{directory}: tensors of another shape: {wrong[:4]}")
    # In groups of about `group_bytes`: the reader maps each file while it reads, and the pages it touched
    # count in the process's resident memory until the file is closed, i.e. until the end of each load.
    for group in _groups(params, group_bytes):
        with warnings.catch_warnings():  # one process: dcp says it assumes so even when told
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({k: params[k].detach() for k in group}, storage_reader=HuggingFaceStorageReader(str(directory)),
                     no_dist=not _distributed())  # fmt: skip
    return len(params)


def _groups(params: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Names in order, cut into groups of at most `limit` bytes (global sizes: the same cut on every rank)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, p in params.items():
        nbytes = p.numel() * p.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
