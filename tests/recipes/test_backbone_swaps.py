"""Swapping a backbone is one key on the demo recipe: every vision family, every LLM type, and a local
pretrained LLM directory, each built and trained one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gazelit.models.gaze_vlm import GazeVLM
from gazelit.recipe import load_recipe

from ..batches import make_batch
from ..builders import MIXED, TOKENIZER

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
SWAPS = [f"model.vision.family={f}" for f in ("siglip2", "siglip", "clip", "dinov2")] + [
    f"model.llm.config.model_type={t}" for t in ("llama", "qwen2", "qwen3")
]


def one_step(model: GazeVLM) -> float:
    model.train()
    batch = make_batch(model, MIXED)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = model(batch).loss
    loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    return float(loss)


@pytest.mark.parametrize("override", SWAPS)
def test_one_key_swaps_a_backbone_of_the_demo(override):
    recipe = load_recipe(DEMO, [override])
    torch.manual_seed(0)
    model = GazeVLM.build(recipe.model, tokenizer=TOKENIZER)
    key, value = override.split("=")
    assert (model.vision.family if "vision" in key else model.llm.config.model_type) == value
    assert torch.isfinite(torch.tensor(one_step(model)))


def test_a_local_pretrained_llm_directory_replaces_the_recipe_config(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from gazelit.models.tiny import TINY_LLM

    fields = dict(TINY_LLM["llama"])
    config = AutoConfig.for_model(**fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llm")
    recipe = load_recipe(DEMO, [f"model.llm.pretrained={tmp_path / 'llm'}"])  # no model.llm.config=null
    assert recipe.model.llm.config is None
    model = GazeVLM.build(recipe.model, tokenizer=TOKENIZER)
    assert model.llm.config.model_type == "llama"
    assert torch.isfinite(torch.tensor(one_step(model)))
