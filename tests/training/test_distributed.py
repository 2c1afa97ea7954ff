"""FSDP2 on CPU with 2 gloo processes: an interrupted and resumed run equals an uninterrupted one, and a
2-process checkpoint resumes on 1 process.

Each run is `python -m tests.training.fsdp_driver` in a subprocess (Lightning starts the second rank).
Outputs are checked, not only exit codes (gloo can abort at interpreter exit; the driver exits with
os._exit after writing everything). Run A trains 6 steps; run B is killed (os._exit on both ranks) right
after the checkpoint of step 3; run C resumes B with `resume=auto`. Run D resumes B's step-3 checkpoint
on a single process. Run E is A with activation checkpointing and bf16 parameters, run F is A under DDP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gazelit.training.demo import ensure_demo_data

from .helpers import DEMO_RECIPE, KILLED_EXIT_CODE, REPO, demo_data_config, fast_overrides, full_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, KILL_AT = 6, 3
FSDP2 = {
    "trainer.strategy.name": "fsdp2", "trainer.devices": 2, "trainer.max_steps": STEPS,
    "checkpoint.every_n_steps": KILL_AT, "trainer.val_check_interval": KILL_AT,
    "logging.routing_image_every_n_steps": KILL_AT, "data.num_workers": 1, "schedule.span_steps": 3,
}  # fmt: skip


def run_driver(out: Path, overrides: list[str], *extra: str, expect: int = 0, timeout: int = 400) -> None:
    cmd = [sys.executable, "-m", "tests.training.fsdp_driver", str(out), str(DEMO_RECIPE), *overrides, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: a hang must not outlive the test
        log, _ = proc.communicate()
        pytest.fail(f"run timed out after {timeout} s:\n{log[-4000:]}")
    assert proc.returncode == expect, f"exit code {proc.returncode}, expected {expect}:\n{log[-4000:]}"


def records(out: Path, rank: int) -> list[dict]:
    return json.loads((out / f"rank{rank}.json").read_text())


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ: {set(a) ^ set(b)}"
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where}: max difference {(a.float() - b.float()).abs().max()}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    data = root / "data"
    ensure_demo_data(demo_data_config(data))

    def overrides(name: str, **extra) -> list[str]:
        return fast_overrides(data, root / "runs", name, **{**FSDP2, **extra})

    run_driver(root / "A", overrides("A"))
    run_driver(root / "B", overrides("B"), "--kill-at", str(KILL_AT), expect=KILLED_EXIT_CODE)
    killed_checkpoints = sorted(p.name for p in (root / "runs" / "B" / "checkpoints").iterdir())
    run_driver(root / "C", overrides("B", resume="auto"))
    b_step3 = root / "runs" / "B" / "checkpoints" / f"step={KILL_AT:06d}.ckpt"
    run_driver(root / "D", overrides("D", **{"trainer.devices": 1, "resume": str(b_step3)}), "--dump-restored")
    run_driver(root / "E", overrides("E", **{"trainer.strategy.activation_checkpointing": True,
                                             "trainer.strategy.param_dtype": "bfloat16"}))  # fmt: skip
    run_driver(root / "F", overrides("F", **{"trainer.strategy.name": "ddp"}))
    # G: the LLM and the vision tower from local save_pretrained directories, so fsdp2 builds them empty and
    # each rank reads its shards; H: the same directories under DDP (loaded whole): the same training
    pretrained = write_pretrained_backbones(root / "pretrained", data)
    run_driver(root / "G", overrides("G", **pretrained))
    run_driver(root / "H", overrides("H", **{**pretrained, "trainer.strategy.name": "ddp"}))
    return {"root": root, "killed_checkpoints": killed_checkpoints, "b_step3": b_step3}


def write_pretrained_backbones(folder: Path, data: Path) -> dict[str, str]:
    """The demo recipe's LLM (with its tiny tokenizer) and vision tower as transformers directories."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from gazelit.models.vision import vision_family
    from gazelit.recipe import load_recipe
    from gazelit.tokenizer import build_tiny_tokenizer

    model = load_recipe(DEMO_RECIPE, [f"demo.out={data}"]).model
    torch.manual_seed(3)
    fields = dict(model.llm.config)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(
        folder / "llm")
    corpus = (data / "corpus.txt").read_text().splitlines()
    build_tiny_tokenizer(corpus, vocab_size=model.tokenizer.vocab_size).save_pretrained(folder / "llm")
    family = vision_family(model.vision.family)
    AutoModel.from_config(family.config_from_mapping(model.vision.config)).save_pretrained(folder / "vision")
    return {"model.llm.pretrained": str(folder / "llm"), "model.vision.pretrained": str(folder / "vision")}


def test_killed_run_left_only_its_sharded_step_checkpoint(runs):
    assert runs["killed_checkpoints"] == [f"step={KILL_AT:06d}.ckpt", f"step={KILL_AT:06d}.ckpt.sha256.json"]
    shards = sorted(p.name for p in runs["b_step3"].iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    # each rank hashed its own shard; rank 0 wrote the merged record, which verifies
    from gazelit.integrity import integrity_file, verify_checkpoint

    record = json.loads(integrity_file(runs["b_step3"]).read_text())
    assert sorted(record["files"]) == shards
    assert verify_checkpoint(runs["b_step3"]) is None


def test_resumed_fsdp2_run_equals_the_uninterrupted_run_exactly(runs):
    root = runs["root"]
    for rank in (0, 1):
        a, b, c = records(root / "A", rank), records(root / "B", rank), records(root / "C", rank)
        assert [s["step"] for s in b] == list(range(KILL_AT)) and [s["step"] for s in c] == list(range(KILL_AT, STEPS))
        assert [s["ids"] for s in b + c] == [s["ids"] for s in a], "data position differs"
        assert [s["k"] for s in b + c] == [s["k"] for s in a] == [None, None, 13, 7, 4, 4]
        assert [s["loss"] for s in b + c] == [s["loss"] for s in a], "loss trajectory differs"
    assert records(root / "A", 0)[0]["ids"] != records(root / "A", 1)[0]["ids"]  # the ranks see different data
    final = f"step={STEPS:06d}.ckpt"
    uninterrupted = full_checkpoint(root / "runs" / "A" / "checkpoints" / final)
    resumed = full_checkpoint(root / "runs" / "B" / "checkpoints" / final)
    assert_same_tensors(uninterrupted["state_dict"], resumed["state_dict"], "parameters")
    assert_same_tensors(uninterrupted["optimizer_0"], resumed["optimizer_0"], "optimizer")
    assert uninterrupted["callbacks"]["ProgressiveTopK"] == resumed["callbacks"]["ProgressiveTopK"]
    assert resumed["callbacks"]["ProgressiveTopK"]["current"] == 4
    stream = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (uninterrupted, resumed)]
    assert stream[0] == stream[1] and stream[0][0]["batches_consumed"] == STEPS


def test_two_process_checkpoint_resumes_on_one_process(runs):
    root = runs["root"]
    saved = full_checkpoint(runs["b_step3"])
    restored = torch.load(root / "D" / "restored.pt", weights_only=True)
    assert restored["global_step"] == KILL_AT
    assert_same_tensors(saved["state_dict"], restored["model"], "parameters")  # DCP resharded 2 -> 1
    assert_same_tensors(saved["optimizer_0"]["state"], restored["optimizer"]["state"], "optimizer state")
    d = records(root / "D", 0)
    assert [s["step"] for s in d] == list(range(KILL_AT, STEPS))
    assert [s["k"] for s in d] == [7, 4, 4]  # the schedule continues where it was
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in d)
    # the data position is translated (same fraction of the epoch), not exact: see StreamResumeAcrossWorldSizes
    seen_before = {i for rank in (0, 1) for s in records(root / "B", rank) for i in s["ids"]}
    assert len(seen_before) == KILL_AT * 2 * 4


def test_fsdp2_run_exports_its_sharded_checkpoint_and_draws_routing(runs):
    run = runs["root"] / "runs" / "A"
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "gazelit_config.json").is_file()
    assert (run / "routing" / f"step={KILL_AT:06d}.png").is_file()  # generation through the sharded model
    from gazelit.models.gaze_vlm import GazeVLM

    model = GazeVLM.from_pretrained(run / "model")
    assert model.top_k == 4  # the k training had reached
    state = full_checkpoint(run / "checkpoints" / f"step={STEPS:06d}.ckpt")["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model." + name]), name


def test_fsdp2_with_activation_checkpointing_and_bf16_trains_like_ddp_in_fp32(runs):
    root = runs["root"]
    for rank in (0, 1):
        a, e, f = (records(root / name, rank) for name in "AEF")
        assert [s["ids"] for s in e] == [s["ids"] for s in f] == [s["ids"] for s in a]
        # DDP and FSDP2 in fp32 compute the same training (up to reduction order)
        assert [s["loss"] for s in f] == pytest.approx([s["loss"] for s in a], rel=1e-4)
        # bf16 compute with fp32 master weights and reductions stays close
        assert [s["loss"] for s in e] == pytest.approx([s["loss"] for s in a], rel=2e-2)
        assert [s["loss"] for s in e] != [s["loss"] for s in a]  # bf16 really was used
    assert (root / "runs" / "E" / "checkpoints" / f"step={STEPS:06d}.ckpt" / ".metadata").is_file()
    assert (root / "runs" / "F" / "checkpoints" / f"step={STEPS:06d}.ckpt").is_file()  # DDP: one file


def test_fsdp2_from_pretrained_directories_reads_shards_and_trains_like_ddp(runs):
    """Start-up at scale through `gazelit fit`: pretrained parts built on the meta device, each rank reading
    its shards, give the same steps as DDP loading the same directories whole."""
    root = runs["root"]
    for rank in (0, 1):
        g, h = records(root / "G", rank), records(root / "H", rank)
        assert [s["ids"] for s in g] == [s["ids"] for s in h]
        assert [s["loss"] for s in g] == pytest.approx([s["loss"] for s in h], rel=1e-4)
    assert (root / "runs" / "G" / "checkpoints" / f"step={STEPS:06d}.ckpt" / ".metadata").is_file()
