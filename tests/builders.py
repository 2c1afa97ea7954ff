"""The tests' one set of tiny builders: the tokenizer, model configs and GazeVLMs of every family, tiny
stock LLMs for the attention backend, sample layouts, pictures and recipes. Hand-built batches are in
tests/batches.py. Test modules import from here, never from each other."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image, ImageDraw

from gazelit.schema import GazeSpec, LLMSpec, LookSpec, ModelConfig, ProjectorSpec, VisionSpec
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.models.tiny import TINY_LLM, TINY_VISION
from gazelit.tokenizer import build_tiny_tokenizer

CORPUS = [
    "You are a helpful assistant.",
    "What colour is the circle? Is there a red square? Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly. Options: A. red B. blue",
    "Describe the panels from left to right. red circle, then blue square, then green triangle.",
    "yes no red green blue yellow purple circle square triangle",
] * 3
TOKENIZER = build_tiny_tokenizer(CORPUS, vocab_size=400)


def model_config(top_k=2, m=2, region=(2, 2), enabled=True, llm="qwen3", vision="siglip2",
                 projector="mlp2x_gelu", pool=1, image_size=None, vision_trainable=False,
                 feature_layer=None, look=None) -> ModelConfig:
    vcfg = copy.deepcopy(TINY_VISION[vision])
    if image_size:
        vcfg["image_size"] = image_size
    spec = VisionSpec(vision, config=vcfg, trainable=vision_trainable)
    if feature_layer is not None:
        spec.feature_layer = feature_layer
    return ModelConfig(
        vision=spec,
        projector=ProjectorSpec(projector),
        llm=LLMSpec(config=copy.deepcopy(TINY_LLM[llm])),
        gaze=GazeSpec(enabled=enabled, top_k=top_k, region=list(region), num_context=m),
        look=LookSpec(**look) if look else LookSpec(),
        visual_pool=pool,
    )


def tiny_vlm(seed: int = 0, tokenizer=TOKENIZER, **kwargs) -> GazeVLM:
    """A 4x4-grid (32 px, 8 px patches) VLM with a 2-layer, 4-head / 2-KV-head LLM, in eval mode
    (`model_config` takes the keyword arguments)."""
    torch.manual_seed(seed)
    return GazeVLM.build(model_config(**kwargs), tokenizer=tokenizer).eval()


def pretrained_config(folder: Path, llm="qwen3", vision="siglip2", dtype=None, tie=False, seed=0, llm_fields=None,
                      **kwargs) -> ModelConfig:
    """`model_config(**kwargs)` whose LLM and vision tower are local transformers directories written with
    `save_pretrained` under `folder` (random weights, saved in `dtype`; `tie`: tied word embeddings;
    `llm_fields` override the tiny LLM's config fields, e.g. to make it large)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from gazelit.models.vision import vision_family

    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_LLM[llm].items() if k != "model_type"} | dict(llm_fields or {})
    llm_model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(TINY_LLM[llm]["model_type"], **{**fields, "tie_word_embeddings": tie}))
    family = vision_family(vision)
    vision_model = AutoModel.from_config(family.config_from_mapping(TINY_VISION[vision]))
    for name, module in (("llm", llm_model), ("vision", vision_model)):
        (module.to(dtype) if dtype else module).save_pretrained(folder / name)
    config = model_config(llm=llm, vision=vision, **kwargs)
    config.llm = LLMSpec(pretrained=str(folder / "llm"))
    config.vision = VisionSpec(vision, pretrained=str(folder / "vision"))
    return config


# samples for tests/batches.make_batch: text around images, a text-only sample, a 3-frame video
MIXED = [
    [("text", 3), ("image",), ("text", 2), ("image",), ("text", 5)],  # text before, between, after
    [("text", 4)],  # text-only sample in the same batch
    [("text", 2), ("video", 3), ("text", 4)],  # a video: three frames, each a unit
]


def picture(colour=(220, 40, 40), size=(64, 48), shape="circle") -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = [w * 0.2, h * 0.2, w * 0.7, h * 0.8]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return image


def write_recipe(folder: Path, **kwargs) -> Path:
    """A recipe YAML (JSON is YAML) whose model section builds `model_config(**kwargs)`, with a tiny
    tokenizer trained from a corpus file."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    model = model_config(**kwargs).to_dict()
    model["tokenizer"] = {"tiny_corpus": str(corpus), "vocab_size": 400}
    path = folder / "recipe.yaml"
    path.write_text(json.dumps({"model": model, "data": {"max_frames": 4}}, indent=1))
    return path


# ---------------------------------------------------------------------------------------------- a toy Lightning run
TOY_FIT_WARNINGS = [  # Lightning's own, about the toy setup
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:The number of training batches"),
]


class ToyLinear(L.LightningModule):
    """The smallest LightningModule: for checkpoint, resume and callback tests that need a real Trainer."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def toy_fit(root: Path, max_steps: int, callbacks, ckpt_path=None) -> L.Trainer:
    """`max_steps` of ToyLinear on 16 fixed batches, with `callbacks`, writing under `root`."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=root)  # fmt: skip
    trainer.fit(ToyLinear(), DataLoader(torch.randn(64, 4), batch_size=4), ckpt_path=ckpt_path)
    return trainer
