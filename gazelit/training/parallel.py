"""Strategies from a recipe, and how a GazeVLM is sharded and checkpointed per block.

    single / auto   one process (Lightning picks the device)
    ddp             DDPStrategy (gloo on CPU, NCCL on GPU)
    fsdp2           ModelParallelStrategy(data_parallel_size=world size, tensor_parallel_size=1): the module's
                    `configure_model` calls `apply_parallelism`, which fully_shards every vision block and
                    LLM decoder layer (classes from `GazeVLM.block_classes()`) and then the root, with a
                    MixedPrecisionPolicy (param dtype from the recipe, float32 reductions). Checkpoints are
                    sharded torch.distributed.checkpoint folders.

Multi-node runs need nothing beyond `trainer.num_nodes`: Lightning reads torchrun's or SLURM's
environment (its cluster environments) and builds the process group from it.

Activation checkpointing wraps each block in torch's checkpoint_wrapper (non-reentrant). Gaze Attention
finds its routing context through a context variable set around the forward; the recomputation in
backward runs outside that block, so the wrapper re-enters the same context while recomputing
(`gaze_context_fn`). Without that the recomputed attention would be dense and the gradients wrong.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gazelit.attention import active_context, use_gaze

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "single", "ddp", "fsdp2")


@dataclass
class ParallelPlan:
    """What `configure_model` does to the GazeVLM (the non-Lightning half of trainer.strategy)."""

    activation_checkpointing: bool = False
    param_dtype: str | None = None  # fsdp2 mixed precision
    reshard_after_forward: bool = True


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


# ---------------------------------------------------------------------------------------------- wrapping
def gaze_context_fn():
    """checkpoint's context_fn: nothing extra in forward; during recomputation, the gaze context that was
    active when the block ran forward."""
    ctx = active_context()
    return nullcontext(), (use_gaze(ctx) if ctx is not None else nullcontext())


def blocks_of(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, unit) for every block of `classes`, where a block already inside a
    checkpoint_wrapper is represented by its wrapper (so wrapping is idempotent)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    found: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            inner = child._checkpoint_wrapped_module if isinstance(child, CheckpointWrapper) else child
            if isinstance(inner, classes):
                found.append((parent, name, child))
            else:
                visit(child)

    visit(model)
    return found


def check_block_units(model: nn.Module, units: list[nn.Module], classes: tuple[type[nn.Module], ...]) -> None:
    """Every LLM decoder layer and every vision block must be its own sharding unit: a block the classes
    miss would be gathered whole with its parent (for a 7B LLM, the whole model on every rank). Raises
    naming the component, the class looked for and the counts."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    def inner(u: nn.Module) -> nn.Module:
        return u._checkpoint_wrapped_module if isinstance(u, CheckpointWrapper) else u

    vision_blocks = type(model.vision)._block_list(model.vision.model)
    expected = {"LLM decoder layers": (model.llm.config.num_hidden_layers, classes[1]),
                "vision blocks": (len(vision_blocks), classes[0])}  # fmt: skip
    for what, (count, cls) in expected.items():
        found = sum(1 for u in units if isinstance(inner(u), cls))
        if found != count:
            raise RuntimeError(
                f"FSDP2: {found} of the model's {count} {what} are {cls.__name__} units; the others would not be "
                f"sharded on their own (block classes {[c.__name__ for c in classes]})"
            )


def checkpoint_blocks(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Put every block of `classes` inside a gaze-aware checkpoint_wrapper (blocks already wrapped are
    kept); returns the wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    wrappers = []
    for parent, name, unit in blocks_of(model, classes):
        if not isinstance(unit, CheckpointWrapper):
            unit = checkpoint_wrapper(unit, checkpoint_impl=CheckpointImpl.NO_REENTRANT, context_fn=gaze_context_fn)
            setattr(parent, name, unit)
        wrappers.append(unit)
    return wrappers


def apply_parallelism(model: nn.Module, plan: ParallelPlan | None, device_mesh: Any = None) -> None:
    """Activation checkpointing per block, then (with a device mesh, i.e. ModelParallelStrategy) FSDP2:
    fully_shard every block, then the root. Call once, before the optimiser is built."""
    plan = plan or ParallelPlan()
    classes = tuple(model.block_classes())
    units: list[nn.Module] = (
        checkpoint_blocks(model, classes)
        if plan.activation_checkpointing
        else [b for _, _, b in blocks_of(model, classes)]
    )
    if device_mesh is None:
        return
    check_block_units(model, units, classes)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    policy = MixedPrecisionPolicy(param_dtype=torch_dtype(plan.param_dtype), reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=plan.reshard_after_forward)
    unsharded = [type(u).__name__ for u in units if not isinstance(u, FSDPModule)]
    if unsharded:
        raise RuntimeError(f"FSDP2: {len(unsharded)} blocks did not become sharded units: {unsharded[:3]}")
    # generation calls the LLM's forward many times outside GazeVLM.forward: run the root's unshard hooks
    # around it, and let transformers keep all ranks decoding until every rank is done (synced_gpus)
    register_fsdp_forward_method(model, "generate_from_batch")
    model.llm._is_fsdp_managed_module = True
    log.info("FSDP2: %d blocks sharded over %d ranks (param dtype %s)", len(units), mesh.size(), plan.param_dtype)


# ---------------------------------------------------------------------------------------------- strategies
def device_count(devices: Any, accelerator: str) -> int:
    """Processes per node for `trainer.devices` (an int, a list of ids, or "auto")."""
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        value = int(devices)
        return value if value > 0 else _available(accelerator)
    return _available(accelerator)


def _available(accelerator: str) -> int:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_strategy(trainer_config: Any, block_classes: tuple[type[nn.Module], ...]) -> tuple[Any, ParallelPlan]:
    """The Lightning strategy for `trainer.strategy` and the plan `configure_model` follows."""
    s = trainer_config.strategy
    plan = ParallelPlan(s.activation_checkpointing, s.param_dtype, s.reshard_after_forward)
    options = dict(s.options)
    if s.name == "auto":
        return "auto", plan
    if s.name == "single":
        from lightning.pytorch.strategies import SingleDeviceStrategy

        device = torch.device("cuda", 0) if uses_gpu(trainer_config.accelerator) else torch.device("cpu")
        return SingleDeviceStrategy(device=device, **options), plan
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**options), plan
    if s.name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = device_count(trainer_config.devices, trainer_config.accelerator) * trainer_config.num_nodes
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, **options), plan
    raise ValueError(f"trainer.strategy.name must be one of {STRATEGIES}, got {s.name!r}")
