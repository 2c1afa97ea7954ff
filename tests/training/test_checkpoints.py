"""init_from (weights only, shape-checked) and export, from model directories and Lightning checkpoints."""

from __future__ import annotations


import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gazelit.cli import main as cli
from gazelit.lit_module import GazeVLMModule, TrainConfig
from gazelit.schema import ModelConfig, TokenizerSpec
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.training.checkpoints import WeightMismatchError, export_checkpoint, load_matching_weights, model_state

from ..builders import MIXED, model_config
from ..batches import make_batch


def config(num_context=2, projector="mlp2x_gelu", corpus=None) -> ModelConfig:
    config = model_config(m=num_context, projector=projector)
    config.tokenizer = TokenizerSpec(tiny_corpus=str(corpus))
    return config


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(["What colour is the shape in row 2, column 3?", "red", "blue square"] * 20))
    return path


def build(cfg, seed) -> GazeVLM:
    torch.manual_seed(seed)
    return GazeVLM.build(cfg)


def test_init_from_a_model_directory_loads_every_matching_weight(tmp_path, corpus):
    source = build(config(corpus=corpus), seed=1)
    source.save_pretrained(tmp_path / "stage1")
    target = build(config(corpus=corpus), seed=2)
    assert not torch.equal(target.projector.mlp[0].weight, source.projector.mlp[0].weight)
    report = load_matching_weights(target, tmp_path / "stage1")
    assert not report.missing and not report.unexpected
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_init_from_lists_every_shape_mismatch(tmp_path, corpus):
    build(config(corpus=corpus, num_context=2), seed=1).save_pretrained(tmp_path / "two_context")
    target = build(config(corpus=corpus, num_context=4), seed=2)
    before = {n: t.clone() for n, t in target.state_dict().items()}
    with pytest.raises(WeightMismatchError, match=r"context_tokens: source \(2, 64\), model \(4, 64\)"):
        load_matching_weights(target, tmp_path / "two_context")
    assert all(torch.equal(before[n], t) for n, t in target.state_dict().items())  # nothing half-loaded


def test_init_from_keeps_new_modules_and_reports_them(tmp_path, corpus):
    build(config(corpus=corpus), seed=1).save_pretrained(tmp_path / "image")
    video = build(config(corpus=corpus, projector="conv_mlp2x_gelu"), seed=2)  # the video recipe's projector
    conv = video.projector.conv.weight.clone()
    report = load_matching_weights(video, tmp_path / "image")
    assert sorted(report.missing) == ["projector.conv.bias", "projector.conv.weight"]
    assert torch.equal(video.projector.conv.weight, conv)
    assert "projector.mlp.0.weight" in report.loaded


def lightning_checkpoint(tmp_path, corpus) -> tuple:
    """A 2-step single-device fit of the module, checkpointed to one file."""
    cfg = config(corpus=corpus)
    model = build(cfg, seed=3)
    module = GazeVLMModule(cfg, TrainConfig(stage="finetune"), model=model)
    loader = DataLoader([make_batch(model, MIXED)], batch_size=None)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, loader)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, model


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen vision tower
def test_export_and_init_from_a_lightning_checkpoint(tmp_path, corpus):
    path, trained = lightning_checkpoint(tmp_path, corpus)
    state = model_state(path)
    assert set(state) == set(trained.state_dict())

    assert cli(["export", str(path), str(tmp_path / "exported")]) == 0
    exported = GazeVLM.from_pretrained(tmp_path / "exported")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert exported.top_k == 2  # no schedule in this run: the configured k

    stage2 = build(config(corpus=corpus), seed=4)
    load_matching_weights(stage2, path)
    assert torch.equal(stage2.llm.lm_head.weight, trained.llm.lm_head.weight)


def test_export_refuses_what_is_not_a_gazelit_checkpoint(tmp_path):
    bogus = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, bogus)
    with pytest.raises(ValueError, match="not a GazeVLMModule checkpoint"):
        export_checkpoint(bogus, tmp_path / "out")
    assert cli(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
