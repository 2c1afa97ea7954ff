"""`fit` on the demo recipe (shrunk to 4 steps): the run directory, TensorBoard contents read back with
EventAccumulator, the export, and an interrupted + resumed run equal to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gazelit.recipe import load_recipe
from gazelit.training import fit

from ..datamodules.data_test_helpers import write_bad_sample_shards
from .helpers import DEMO_RECIPE, KillAfterCheckpoint, KilledRun, RunRecorder, fast_overrides, full_checkpoint

pytestmark = [  # Lightning's own
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),  # resuming into it
]


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """A: 4 uninterrupted steps. B: the same, killed right after the checkpoint of step 2. C: B resumed.
    The training data mixes in a shard set with one bad sample per skip reason."""
    root = tmp_path_factory.mktemp("fit")
    write_bad_sample_shards(root / "bad")
    sources = f"[{{path: '{demo_data}/shards/train', name: demo}}, {{path: '{root / 'bad'}', name: bad, weight: 1.0}}]"

    def recipe(name, **extra):
        extra = {"data.sources": sources, "data.max_skip_fraction": 1.0, **extra}
        return load_recipe(DEMO_RECIPE, fast_overrides(demo_data, root / "runs", name, **extra))

    recorded = {}
    recorded["A"] = RunRecorder()
    result = fit(recipe("A"), extra_callbacks=[recorded["A"]])
    recorded["B"] = RunRecorder()
    with pytest.raises(KilledRun):
        fit(recipe("B"), extra_callbacks=[recorded["B"], KillAfterCheckpoint(2)])
    killed = sorted(p.name for p in (root / "runs" / "B" / "checkpoints").iterdir())
    recorded["C"] = RunRecorder()
    resumed = fit(recipe("B", resume="auto"), extra_callbacks=[recorded["C"]])
    return {"root": root, "A": result, "C": resumed, "recorded": recorded, "killed": killed}


def test_run_directory_holds_recipe_checkpoints_logs_picture_and_model(runs):
    result = runs["A"]
    p = result.paths
    saved = yaml.safe_load(p.recipe.read_text())
    assert saved["run"]["name"] == "A" and saved["trainer"]["max_steps"] == 4 and saved["model"]["gaze"]["top_k"] == 4
    assert sorted(x.name for x in p.checkpoints.iterdir()) == [
        "step=000002.ckpt", "step=000002.ckpt.sha256.json", "step=000004.ckpt", "step=000004.ckpt.sha256.json"
    ]
    assert result.last_checkpoint == p.checkpoints / "step=000004.ckpt"
    assert list(p.tensorboard.glob("events.out.tfevents.*"))
    assert result.routing_picture == p.routing / "step=000004.png" and (p.routing / "latest.png").is_file()
    assert (p.model / "model.safetensors").is_file()
    # validation at k = 4 on demo data, whose records carry the object's box: routing metrics with chance
    assert {"val/answer_acc", "val/routing_acc", "val/hit_rate_best_head", "val/hit_rate_chance",
            "val/at_name/hit_rate_best_head"} <= set(result.metrics)  # and at the question's naming words
    assert 0 < result.metrics["val/hit_rate_chance"] < 1
    # the demo data lists the other objects: validation names the head that follows the question most
    layer, head, gap = runs["recorded"]["A"].question_head
    assert 0 <= layer < 4 and 0 <= head < 4 and -1 <= gap <= 1
    summary = result.summary()
    for path in (p.root, p.checkpoints, p.tensorboard, result.routing_picture, p.model):
        assert str(path) in summary


def test_tensorboard_has_losses_lr_per_group_k_fraction_throughput_skips_hparams_and_routing(runs):
    acc = EventAccumulator(str(runs["A"].paths.tensorboard), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "val/token_acc", "gaze/top_k", "gaze/attended_fraction",
                "gaze/k_schedule_progress", "perf/tokens_per_s", "perf/samples_per_s"):  # fmt: skip
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    for group in ("projector", "llm", "vision", "context_no_decay"):
        assert f"lr-AdamW/{group}" in scalars
    assert any(tag.startswith("data/skipped/") for tag in scalars), sorted(scalars)
    k = {e.step: e.value for e in acc.Scalars("gaze/top_k")}
    assert k[0] == 16 and k[3] == 4  # dense (every one of the 16 regions) at the start, the target at the end
    assert len(acc.Scalars("train/loss")) == 4
    fraction = {e.step: e.value for e in acc.Scalars("gaze/attended_fraction")}
    assert 0 < fraction[3] < fraction[2] < 1  # k 10, then k 4
    assert all(fraction[step] == pytest.approx(1.0) for step in (0, 1) if step in fraction)  # dense

    images = acc.Images("routing/val_sample")
    assert [e.step for e in images] == [2, 4] and images[0].width > 0 and images[0].height > 0

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.gaze.top_k"].number_value == 4
    assert hparams["trainer.max_steps"].number_value == 4
    assert hparams["run.name"].string_value == "A"
    assert hparams["params/llm_trainable"].number_value > 0  # logged by the module along with the recipe


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(runs):
    a, b, c = (runs["recorded"][name].steps for name in "ABC")
    assert runs["killed"] == ["step=000002.ckpt", "step=000002.ckpt.sha256.json"]
    assert [s["step"] for s in b] == [0, 1] and [s["step"] for s in c] == [2, 3]
    assert [s["ids"] for s in b + c] == [s["ids"] for s in a]  # the data position
    assert [s["k"] for s in b + c] == [s["k"] for s in a] == [None, None, 10, 4]
    assert [s["loss"] for s in b + c] == [s["loss"] for s in a]
    final = "step=000004.ckpt"
    uninterrupted = full_checkpoint(runs["A"].paths.checkpoints / final)
    resumed = full_checkpoint(runs["C"].paths.checkpoints / final)
    for name, tensor in uninterrupted["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    for left, right in zip(uninterrupted["optimizer_states"][0]["state"].values(),
                           resumed["optimizer_states"][0]["state"].values()):  # fmt: skip
        for key in left:
            assert torch.equal(left[key], right[key])
    assert uninterrupted["callbacks"]["ProgressiveTopK"] == resumed["callbacks"]["ProgressiveTopK"]
    assert runs["C"].resumed_from == runs["C"].paths.checkpoints / "step=000002.ckpt"


def test_export_equals_the_final_checkpoint_with_the_trained_k(runs):
    from gazelit.models.gaze_vlm import GazeVLM

    result = runs["A"]
    model = GazeVLM.from_pretrained(result.exported_model)
    assert model.top_k == 4
    state = full_checkpoint(result.last_checkpoint)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model." + name]), name


def test_gazelit_fit_command_trains_and_prints_where_everything_is(demo_data, tmp_path, capsys):
    from gazelit.cli import main as cli

    overrides = fast_overrides(
        demo_data, tmp_path, "cli", **{"trainer.max_steps": 2, "logging.routing_image_every_n_steps": 0}
    )
    assert cli(["fit", str(DEMO_RECIPE), *overrides]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "cli"
    for line in (f"run directory:    {run}", f"checkpoints:      {run / 'checkpoints'} (last: step=000002.ckpt)",
                 f"tensorboard logs: {run / 'tensorboard'}", f"exported model:   {run / 'model'}"):  # fmt: skip
        assert line in out, out
    assert "routing picture" not in out  # switched off


def test_a_new_run_refuses_a_run_directory_with_checkpoints_and_a_missing_resume_path(runs, capsys):
    from gazelit.cli import main as cli

    a = runs["A"].paths
    stamp = a.recipe.stat().st_mtime_ns
    missing_data = a.root.parent.parent / "no-demo-data"
    args = ["fit", str(DEMO_RECIPE), f"run.root={a.root.parent}", "run.name=A", f"demo.out={missing_data}"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "resume=auto" in err
    assert a.recipe.stat().st_mtime_ns == stamp and not missing_data.exists()  # refused before doing anything
    assert cli([*args, "resume=/nowhere/step=000001.ckpt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_resume_refuses_a_checkpoint_of_another_model_naming_the_key(runs, demo_data, capsys, caplog):
    """Resuming with a model value the checkpoint was not trained with (here the demo's change from the
    tower's features to local ones) stops before anything is built or written, naming the key; keys that
    only change how attention is computed may differ (logged)."""
    from gazelit.cli import main as cli
    from gazelit.training.fit import check_same_model

    a = runs["A"].paths
    stamp, before = a.recipe.stat().st_mtime_ns, sorted(a.checkpoints.iterdir())
    overrides = fast_overrides(demo_data, a.root.parent, "A", resume="auto", **{"model.vision.feature_layer": -1})
    assert cli(["fit", str(DEMO_RECIPE), *overrides]) == 2
    err = capsys.readouterr().err
    assert "model.vision.feature_layer: 0 in the checkpoint, -1 in the recipe" in err and "init_from=" in err
    assert a.recipe.stat().st_mtime_ns == stamp and sorted(a.checkpoints.iterdir()) == before

    checkpoint = max(p for p in before if p.suffix == ".ckpt")
    same = load_recipe(DEMO_RECIPE, fast_overrides(demo_data, a.root.parent, "A"))
    check_same_model(checkpoint, same)  # the run's own recipe resumes
    other_impl = load_recipe(DEMO_RECIPE, fast_overrides(demo_data, a.root.parent, "A", **{"model.gaze.impl": "reference"}))
    with caplog.at_level("WARNING"):
        check_same_model(checkpoint, other_impl)
    assert "model.gaze.impl changes from 'auto' to 'reference'" in caplog.text
    wider = load_recipe(DEMO_RECIPE, fast_overrides(demo_data, a.root.parent, "A", **{"model.gaze.num_context": 3}))
    with pytest.raises(ValueError, match="model.gaze.num_context: 2 in the checkpoint, 3 in the recipe"):
        check_same_model(checkpoint, wider)
