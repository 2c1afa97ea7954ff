"""Strategies from the recipe, and activation checkpointing that keeps Gaze Attention's routing context."""

from __future__ import annotations

import copy

import pytest
import torch

from gazelit.models.gaze_vlm import GazeVLM
from gazelit.recipe import StrategyConfig, TrainerConfig
from gazelit.training.parallel import ParallelPlan, apply_parallelism, blocks_of, build_strategy, checkpoint_blocks

from ..builders import MIXED, tiny_vlm
from ..batches import make_batch


def tiny_model(top_k=2) -> GazeVLM:
    return tiny_vlm(top_k=top_k, vision_trainable=True, feature_layer=-1).train()


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients_with_sparse_routing():
    plain = tiny_model()
    batch = make_batch(plain, MIXED)
    wrapped = copy.deepcopy(plain)
    apply_parallelism(wrapped, ParallelPlan(activation_checkpointing=True))
    units = [unit for _, _, unit in blocks_of(wrapped, plain.block_classes())]
    assert len(units) == 4 and all(type(u).__name__ == "CheckpointWrapper" for u in units)  # 2 vision + 2 LLM
    expected, got = gradients(plain, batch), gradients(wrapped, batch)
    names = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in got.items()}
    assert names.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(names[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep the plain names


def test_without_the_gaze_context_the_recomputation_is_dense_and_breaks_backward():
    """Why gaze_context_fn exists: torch's wrapper as is recomputes the attention outside `use_gaze`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointError

    plain = tiny_model()
    batch = make_batch(plain, MIXED)
    naive = copy.deepcopy(plain)
    _, decoder_layer = plain.block_classes()
    for parent, name, block in blocks_of(naive, (decoder_layer,)):
        setattr(parent, name, checkpoint_wrapper(block))
    with pytest.raises(CheckpointError):
        gradients(naive, batch)


def trainer_config(name: str, **strategy) -> TrainerConfig:
    return TrainerConfig(accelerator="cpu", devices=2, num_nodes=3, strategy=StrategyConfig(name=name, **strategy))


def test_strategies_from_the_recipe():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    classes = tiny_model().block_classes()
    assert build_strategy(trainer_config("auto"), classes)[0] == "auto"
    single, _ = build_strategy(trainer_config("single"), classes)
    assert isinstance(single, SingleDeviceStrategy) and single.root_device == torch.device("cpu")
    assert isinstance(build_strategy(trainer_config("ddp"), classes)[0], DDPStrategy)
    fsdp2, plan = build_strategy(
        trainer_config("fsdp2", activation_checkpointing=True, param_dtype="bfloat16"), classes
    )
    assert isinstance(fsdp2, ModelParallelStrategy)
    assert (fsdp2._data_parallel_size, fsdp2._tensor_parallel_size) == (6, 1)  # 2 devices x 3 nodes
    assert plan == ParallelPlan(activation_checkpointing=True, param_dtype="bfloat16", reshard_after_forward=True)


def test_fsdp1_is_gone_and_the_error_lists_fsdp2():
    with pytest.raises(ValueError, match="must be one of .*'fsdp2'"):
        build_strategy(trainer_config("fsdp"), tiny_model().block_classes())


def test_configure_model_applies_the_plan_once():
    from gazelit.lit_module import GazeVLMModule

    model = tiny_model()
    module = GazeVLMModule(model.config, model=model)
    module.parallel_plan = ParallelPlan(activation_checkpointing=True)
    module.configure_model()
    module.configure_model()  # Lightning calls it for every fit / validate: no double wrapping
    checkpoint_blocks(module.model, model.block_classes())  # and wrapping again changes nothing
    names = [n for n, _ in module.model.named_modules() if n.endswith("_checkpoint_wrapped_module")]
    assert len(names) == 4
    assert not any("_checkpoint_wrapped_module._checkpoint_wrapped_module" in n for n in names)


def test_a_block_class_that_misses_the_decoder_layers_is_refused():
    from gazelit.training.parallel import check_block_units

    model = tiny_model()
    classes = tuple(model.block_classes())
    units = [b for _, _, b in blocks_of(model, classes)]
    check_block_units(model, units, classes)  # the model's own classes: every block is a unit
    wrong = (classes[0], torch.nn.Linear)
    with pytest.raises(RuntimeError, match="LLM decoder layers are Linear units"):
        check_block_units(model, [b for _, _, b in blocks_of(model, wrong)], wrong)
