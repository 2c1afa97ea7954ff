"""Checkpoints that cannot be trusted: crafted sharded metadata, flipped bytes, truncation, empty and
foreign files; keep_last after a resume; one fit per run directory; what Ctrl-C prints."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from gazelit.callbacks.checkpointing import AtomicModelCheckpoint
from gazelit.callbacks.interrupt import InterruptReport
from gazelit.cli import main as cli_main
from gazelit.integrity import CheckpointError, integrity_file, read_dcp_metadata, verify_checkpoint
from gazelit.recipe import load_recipe
from gazelit.training import RunSetupError, fit
from gazelit.training.checkpoints import export_checkpoint, load_matching_weights, model_state
from gazelit.training.fit import resolve_resume
from gazelit.training.run_lock import RunLock, RunLockedError

from ..builders import TOY_FIT_WARNINGS, toy_fit
from .helpers import DEMO_RECIPE, fast_overrides

pytestmark = TOY_FIT_WARNINGS


def two_checkpoints(tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    toy_fit(tmp_path, 4, [AtomicModelCheckpoint(folder, every_n_steps=2, keep_last=3)])
    return folder


def auto(folder: Path):
    return resolve_resume(SimpleNamespace(resume="auto"), SimpleNamespace(checkpoints=folder))


# ---------------------------------------------------------------------------------------------- 5: code execution
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def crafted_sharded_checkpoint(tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "checkpoints" / "step=000010.ckpt"
    folder.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    return folder, marker


def test_a_crafted_sharded_metadata_runs_nothing_on_export_init_from_and_resume(tmp_path, capsys):
    folder, marker = crafted_sharded_checkpoint(tmp_path)
    for attempt in (
        lambda: export_checkpoint(folder, tmp_path / "out"),
        lambda: load_matching_weights(torch.nn.Linear(2, 2), folder),
        lambda: model_state(folder),
        lambda: resolve_resume(SimpleNamespace(resume=str(folder)), None),
        lambda: auto(folder.parent),
    ):
        with pytest.raises((CheckpointError, RunSetupError)) as error:
            attempt()
        assert ".metadata" in str(error.value) and "\n" not in str(error.value)
        assert not marker.exists()
    assert cli_main(["export", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".metadata" in err and "makedirs" in err
    assert not marker.exists()


def test_a_real_sharded_checkpoint_reads_through_the_restricted_unpickler(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step=000002.ckpt"
    state = {"state_dict": {"model.w": torch.randn(3, 4), "model.b": torch.arange(5, dtype=torch.bfloat16)}}
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    metadata = read_dcp_metadata(folder)
    assert set(metadata.state_dict_metadata) == {"state_dict.model.w", "state_dict.model.b"}
    loaded = model_state(folder)
    assert torch.equal(loaded["w"], state["state_dict"]["model.w"])
    assert torch.equal(loaded["b"], state["state_dict"]["model.b"])


# ---------------------------------------------------------------------------------------------- 6: corruption
def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_verified_size_and_sha256(tmp_path):
    folder = two_checkpoints(tmp_path)
    newest = folder / "step=000004.ckpt"
    record = json.loads(integrity_file(newest).read_text())
    assert record["files"][""]["size"] == newest.stat().st_size
    assert verify_checkpoint(newest) is None
    flip_byte(newest)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        verify_checkpoint(newest)


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_and_says_why(tmp_path, caplog):
    folder = two_checkpoints(tmp_path)
    flip_byte(folder / "step=000004.ckpt")
    with caplog.at_level(logging.WARNING):
        assert auto(folder) == folder / "step=000002.ckpt"
    assert "skips step=000004.ckpt" in caplog.text and "sha256 differs" in caplog.text
    # a truncated newest checkpoint: the size says so before any hashing
    folder2 = two_checkpoints(tmp_path / "b")
    newest = folder2 / "step=000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert auto(folder2) == folder2 / "step=000002.ckpt"
    assert "1000 bytes" in caplog.text
    # everything damaged: refuse, naming the files
    flip_byte(folder2 / "step=000002.ckpt")
    with pytest.raises(RunSetupError, match="no intact checkpoint"):
        auto(folder2)


def test_a_damaged_legacy_checkpoint_without_a_record_is_caught_by_its_zip_crcs(tmp_path):
    folder = two_checkpoints(tmp_path)
    newest = folder / "step=000004.ckpt"
    integrity_file(newest).unlink()
    assert "checked its structure only" in verify_checkpoint(newest)
    newest.write_bytes(newest.read_bytes()[:-300])
    with pytest.raises(CheckpointError, match="not a complete torch checkpoint"):
        verify_checkpoint(newest)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", b"PK\x03\x04broken zip"])
def test_empty_and_foreign_files_get_one_line_naming_the_file(tmp_path, content, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(RunSetupError) as error:
        resolve_resume(SimpleNamespace(resume=str(bad)), None)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError) as error:
        load_matching_weights(torch.nn.Linear(2, 2), bad)
    assert str(bad) in str(error.value)
    assert cli_main(["export", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_a_valid_zip_that_is_not_a_lightning_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "weights.ckpt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        model_state(bad)


# ---------------------------------------------------------------------------------------------- 7: keep_last
def test_keep_last_holds_after_a_resume(tmp_path):
    folder = tmp_path / "ckpt"
    toy_fit(tmp_path, 4, [AtomicModelCheckpoint(folder, every_n_steps=2, keep_last=2)])
    toy_fit(tmp_path, 10, [AtomicModelCheckpoint(folder, every_n_steps=2, keep_last=2)],
            ckpt_path=folder / "step=000004.ckpt")  # fmt: skip
    kept = sorted(p.name for p in folder.glob("*.ckpt"))
    assert kept == ["step=000008.ckpt", "step=000010.ckpt"]
    assert sorted(p.name for p in folder.glob("*.sha256.json")) == [k + ".sha256.json" for k in kept]


# ---------------------------------------------------------------------------------------------- 8: run lock
HOLD = """
import sys, time
from gazelit.training.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_fit_on_a_locked_run_directory_refuses_naming_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {holder.pid} on host"):
            RunLock(run_dir).acquire()
        recipe = load_recipe(DEMO_RECIPE, fast_overrides(tmp_path / "data", tmp_path / "runs", "demo"))
        with pytest.raises(RunSetupError, match=f"in use by another gazelit fit \\(PID {holder.pid}"):
            fit(recipe)
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "recipe.yaml").exists()  # refused before anything was written


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = RunLock(run_dir).acquire()
    assert f"stale lock (PID {holder.pid}" in caplog.text
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    with RunLock(run_dir):  # released: free again
        pass


# ---------------------------------------------------------------------------------------------- 9: Ctrl-C
class CtrlC(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            raise KeyboardInterrupt


def test_ctrl_c_prints_the_last_checkpoint_and_the_command_that_continues(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    report = InterruptReport(folder, "gazelit fit recipes/demo.yaml resume=auto")
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            toy_fit(tmp_path, 10, [AtomicModelCheckpoint(folder, every_n_steps=2, keep_last=2), report, CtrlC()])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert f"last checkpoint: {folder / 'step=000002.ckpt'} (step 2)" in err
    assert "continue with: gazelit fit recipes/demo.yaml resume=auto" in err
