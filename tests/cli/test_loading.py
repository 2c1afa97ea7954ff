"""Model loading for the CLI: saved model directories, recipes, Lightning checkpoints, errors."""

import lightning as L
import pytest
import torch

from gazelit.cli.loading import load_checkpoint_weights, load_model
from gazelit.lit_module import GazeVLMModule

from ..builders import tiny_vlm, write_recipe


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_directory_round_trip_and_top_k_override(tmp_path):
    model = tiny_vlm(top_k=1)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert _same_weights(model, loaded) and loaded.top_k == 1 and not loaded.training
    assert load_model(tmp_path / "m", top_k="all").top_k is None
    assert load_model(tmp_path / "m", top_k="3").top_k == 3


def test_recipe_with_a_real_lightning_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path, top_k=2)
    trained = load_model(recipe)  # built from the recipe's model section (random init)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)  # weights no fresh build has
    module = GazeVLMModule(trained.config, model=trained)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    fresh = load_model(recipe)
    assert not _same_weights(fresh, trained)
    restored = load_model(recipe, checkpoint=tmp_path / "last.ckpt")
    assert _same_weights(restored, trained)
    over = load_model(recipe, overrides=["model.gaze.top_k=all"])
    assert over.top_k is None


def test_loading_errors_name_the_problem(tmp_path):
    recipe = write_recipe(tmp_path)
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a GazeVLMModule checkpoint"):
        load_model(recipe, checkpoint=tmp_path / "other.ckpt")
    model = load_model(recipe)
    state = {"model." + k: v for k, v in model.state_dict().items() if "context_tokens" not in k}
    torch.save(state, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="missing.*context_tokens"):
        load_checkpoint_weights(model, tmp_path / "partial.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="gazelit_config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="recipe"):
        load_model(tmp_path / "m", checkpoint=tmp_path / "partial.ckpt")


def test_a_sharded_checkpoint_loads_through_the_one_checkpoint_module(tmp_path):
    import torch.distributed.checkpoint as dcp

    from gazelit.models.gaze_vlm import GazeVLM

    recipe = write_recipe(tmp_path)
    trained = load_model(recipe)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    folder = tmp_path / "step=000004.ckpt"
    state = {"state_dict": {"model." + k: v.clone() for k, v in trained.state_dict().items()}}
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    loaded = load_model(recipe, checkpoint=folder)
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    trained.save_pretrained(tmp_path / "m")
    assert GazeVLM.from_pretrained(tmp_path / "m").training is False  # eval mode, as transformers does
