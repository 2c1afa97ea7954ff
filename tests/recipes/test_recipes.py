"""Every shipped recipe loads and validates (nothing built, nothing downloaded); the CLI around them.

The demo recipe also trains (4 steps) in tests/training/test_fit.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gazelit.cli import build_parser
from gazelit.cli import main as cli
from gazelit.recipe import RecipeError, load_recipe
from gazelit.shapes import derive_shapes

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))
PAPER = [name for name in SHIPPED if name.startswith("cambrian")]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must not download")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_expected_recipes_are_shipped():
    for stage in ("align", "align_dense", "finetune", "finetune_dense"):
        for size in ("4b", "7b"):
            assert f"cambrian{size}_{stage}.yaml" in SHIPPED
    assert {"cambrian4b_video.yaml", "cambrian4b_video_dense.yaml", "demo.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates_and_prints_its_shapes_offline(name, no_network, capsys):
    recipe = load_recipe(RECIPES / name)
    assert recipe.run.name == name.removesuffix(".yaml")
    assert cli(["validate", "--offline", str(RECIPES / name)]) == 0  # cluster data paths are not here
    out = capsys.readouterr().out
    assert "valid. Derived shapes" in out and "tokens per image" in out and "unknown" not in out


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_follow_the_paper_and_cambrian(name, monkeypatch):
    monkeypatch.setenv("NUM_NODES", "4")
    r = load_recipe(RECIPES / name)
    video = "video" in name
    dense = name.removesuffix(".yaml").endswith("_dense")
    assert r.model.vision.pretrained == "google/siglip2-so400m-patch16-384" and not r.model.vision.trainable
    assert r.model.llm.pretrained == ("Qwen/Qwen3-4B" if "4b" in name else "Qwen/Qwen2.5-7B")
    assert r.model.gaze.enabled is not dense
    assert r.model.gaze.num_context == 4 and r.model.gaze.shared_gqa is False
    assert r.model.gaze.region == ([3, 3, 1] if video else [6, 6, 1])
    assert r.model.projector.kind == ("conv_mlp2x_gelu" if video else "mlp2x_gelu")
    t = r.trainer
    assert (t.devices, t.num_nodes, t.strategy.name, t.strategy.param_dtype) == (8, 4, "fsdp2", "bfloat16")
    assert t.strategy.activation_checkpointing
    global_batch = r.data.batch_size * t.accumulate_grad_batches * t.devices * t.num_nodes
    shapes = derive_shapes(r)
    if "align" in name:
        assert r.train.stage == "align" and r.train.optim.lr_projector == 1e-3 and r.init_from is None
        assert (global_batch, r.data.max_length) == (512, 2048)
    else:
        assert r.train.stage == "finetune" and r.init_from.startswith("runs/")
        assert r.init_from.endswith(("_align_dense/model" if dense else "_align/model") if not video
                                    else ("_finetune_dense/model" if dense else "_finetune/model"))  # fmt: skip
        assert r.data.max_length == 8192
        assert (global_batch, r.train.optim.lr_llm) == ((256, 1e-5) if video else (512, 2e-5))
    assert r.train.optim.warmup_ratio == 0.03 and r.train.optim.schedule == "cosine"
    if video:
        assert (r.data.max_frames, r.data.fps, shapes.projected_grid) == (32, 1.0, (12, 12))
        assert shapes.regions_per_unit == 16 and shapes.k_target == (None if dense else 16)
    elif not dense:
        assert shapes.visual_tokens_per_unit == 576 and shapes.regions_per_unit == 16
        assert shapes.k_target == (None if "align" in name else 4)


def test_cluster_size_comes_from_the_environment_and_keeps_the_global_batch(monkeypatch):
    for nodes, accumulation in (("1", 16), ("2", 8), ("16", 1)):
        monkeypatch.setenv("NUM_NODES", nodes)
        r = load_recipe(RECIPES / "cambrian4b_finetune.yaml")
        assert (r.trainer.num_nodes, r.trainer.accumulate_grad_batches) == (int(nodes), accumulation)
    monkeypatch.setenv("NUM_NODES", "3")
    with pytest.raises(RecipeError, match="not a multiple"):
        load_recipe(RECIPES / "cambrian4b_finetune.yaml")


def test_demo_recipe_is_tiny_and_reads_the_generated_data():
    r = load_recipe(RECIPES / "demo.yaml")
    assert r.model.vision.config is not None and r.model.llm.config is not None  # nothing to download
    assert r.model.tokenizer.tiny_corpus == f"{r.demo.out}/corpus.txt"
    assert (
        r.data.sources[0].path == f"{r.demo.out}/shards/train"
        and r.data.val_sources[0].path == f"{r.demo.out}/shards/val"
    )
    assert (r.trainer.accelerator, r.trainer.devices, r.trainer.strategy.name) == ("cpu", 1, "single")
    shapes = derive_shapes(r)
    assert (shapes.projected_grid, shapes.regions_per_unit, shapes.k_target) == ((8, 8), 16, 2)


def test_every_command_has_help(capsys):
    names = ["fit", "validate", "export"]
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            cli([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: gazelit " + name in capsys.readouterr().out
    assert {"fit", "validate", "export"} <= set(build_parser()._subparsers._group_actions[0].choices)


def test_a_typo_fails_before_anything_is_built_naming_key_file_and_closest_key(capsys):
    assert cli(["fit", str(RECIPES / "demo.yaml"), "trainer.max_stesp=5"]) == 2
    err = capsys.readouterr().err
    assert "command line" in err and "trainer.max_stesp" in err and "max_steps" in err
    assert cli(["validate", str(RECIPES / "demo.yaml"), "model.gaze.topk=3"]) == 2
    assert "top_k" in capsys.readouterr().err
