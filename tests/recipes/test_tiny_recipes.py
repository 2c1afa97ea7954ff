"""Every shipped recipe, built at tiny size, takes one training step (in the manner of litgpt's config
tests): the same vision family, projector, gaze settings, stage, precision and strategy (FSDP2 with its
mixed precision and activation checkpointing, on one CPU process), with tiny widths and random weights."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gazelit.lit_module import GazeVLMModule
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.models.tiny import TINY_LLM, TINY_VISION
from gazelit.recipe import load_recipe
from gazelit.training.parallel import build_strategy

from ..builders import TOKENIZER
from ..batches import make_batch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _leave_no_process_group():
    """FSDP2 on one process initialises a gloo process group that Lightning does not destroy; later tests
    (and `gazelit fit`'s multi-process exit path) must not find it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def llm_type(spec) -> str:
    if spec.config is not None:
        return spec.config["model_type"]
    name = spec.pretrained.lower()
    return "qwen3" if "qwen3" in name else "qwen2" if "qwen2" in name else "llama"


def tiny(recipe):
    """The recipe with tiny random backbones of the same families; everything else kept."""
    r = copy.deepcopy(recipe)
    m = r.model
    m.vision.pretrained, m.vision.config = None, copy.deepcopy(TINY_VISION[m.vision.family])
    m.vision.options = {}
    m.llm.config, m.llm.pretrained = copy.deepcopy(TINY_LLM[llm_type(m.llm)]), None
    m.tokenizer.pretrained = m.tokenizer.tiny_corpus = None
    t = r.trainer
    t.accelerator, t.devices, t.num_nodes, t.accumulate_grad_batches = "cpu", 1, 1, 1
    return r


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_takes_one_training_step_at_tiny_size(name, tmp_path):
    recipe = tiny(load_recipe(RECIPES / name))
    torch.manual_seed(0)
    model = GazeVLM.build(recipe.model, tokenizer=TOKENIZER)
    lit = GazeVLMModule(recipe.model, recipe.train, model=model)
    grpo = recipe.train.stage == "grpo"  # steps its optimiser itself, clipping included
    lit.gradient_clip_val = recipe.trainer.gradient_clip_val if grpo else None
    strategy, lit.parallel_plan = build_strategy(recipe.trainer, model.block_classes())
    samples = [[("text", 3), ("image",), ("text", 6)], [("video", 2), ("text", 5)], [("text", 8)]]
    batch = make_batch(model, samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, strategy=strategy, precision=recipe.trainer.precision,
        gradient_clip_val=None if grpo else recipe.trainer.gradient_clip_val, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, train_dataloaders=DataLoader([batch], batch_size=None))
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss), name
    def full(p):  # FSDP2 parameters are DTensors (one shard here)
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    moved = [n for n, p in lit.model.named_parameters()
             if n in before and not torch.equal(full(p.detach()).float(), before[n].float())]  # fmt: skip
    assert moved, f"{name}: no trainable parameter moved"
    assert model.config.projector.kind == recipe.model.projector.kind
    assert list(model.config.gaze.region) == list(recipe.model.gaze.region)
