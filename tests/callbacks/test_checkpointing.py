"""Atomic checkpoints: every N steps, the last K kept, a crash while saving leaves the previous ones intact,
and `latest_checkpoint` (resume: auto) skips incomplete entries."""

from __future__ import annotations

import pytest
import torch

from gazelit.integrity import INTEGRITY_SUFFIX
from ..builders import TOY_FIT_WARNINGS, toy_fit
from gazelit.callbacks.checkpointing import TMP_PREFIX, AtomicModelCheckpoint, checkpoint_step, latest_checkpoint

pytestmark = TOY_FIT_WARNINGS


def fit(tmp_path, max_steps, checkpoint, ckpt_path=None):
    return toy_fit(tmp_path, max_steps, [checkpoint], ckpt_path)


def names(folder):
    """Checkpoints and leftovers; each final checkpoint must have its integrity record beside it."""
    entries = sorted(p.name for p in folder.iterdir() if not p.name.endswith(INTEGRITY_SUFFIX))
    records = sorted(p.name[: -len(INTEGRITY_SUFFIX)] for p in folder.glob("*" + INTEGRITY_SUFFIX))
    assert records == [n for n in entries if not n.startswith(TMP_PREFIX)]
    return entries


def test_every_n_steps_keeps_the_last_k_and_saves_the_final_step(tmp_path):
    folder = tmp_path / "ckpt"
    fit(tmp_path, 7, AtomicModelCheckpoint(folder, every_n_steps=2, keep_last=2))
    assert names(folder) == ["step=000006.ckpt", "step=000007.ckpt"]
    assert torch.load(folder / "step=000007.ckpt", weights_only=True)["global_step"] == 7
    assert latest_checkpoint(folder).name == "step=000007.ckpt"


class CrashingSave(AtomicModelCheckpoint):
    """Dies half-way through writing the checkpoint of `crash_step` (a partial file under the temp name)."""

    crash_step = 4

    def _save_checkpoint(self, trainer, filepath):
        if trainer.global_step == self.crash_step:
            original = trainer.save_checkpoint

            def partial_write(path, *args, **kwargs):
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError("disk went away")

            trainer.save_checkpoint = partial_write
            try:
                super()._save_checkpoint(trainer, filepath)
            finally:
                trainer.save_checkpoint = original
        else:
            super()._save_checkpoint(trainer, filepath)


def test_a_crash_while_saving_keeps_the_previous_checkpoint_and_resume_skips_the_partial_one(tmp_path):
    folder = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk went away"):
        fit(tmp_path, 10, CrashingSave(folder, every_n_steps=2, keep_last=1))
    assert names(folder) == [TMP_PREFIX + "step=000004.ckpt", "step=000002.ckpt"]
    previous = torch.load(folder / "step=000002.ckpt", weights_only=True)
    assert previous["global_step"] == 2  # intact and loadable
    assert latest_checkpoint(folder) == folder / "step=000002.ckpt"

    # resuming from it cleans the leftover and goes on; keep_last holds after a resume too (the checkpoint
    # resumed from is pruned like the others: Lightning alone would keep K + 1)
    fit(tmp_path, 6, AtomicModelCheckpoint(folder, every_n_steps=2, keep_last=1), ckpt_path=folder / "step=000002.ckpt")
    assert names(folder) == ["step=000006.ckpt"]


def test_latest_checkpoint_ignores_temporary_and_incomplete_sharded_entries(tmp_path):
    (tmp_path / "step=000010.ckpt").write_bytes(b"x")
    complete = tmp_path / "step=000020.ckpt"
    complete.mkdir()
    (complete / ".metadata").write_bytes(b"x")
    (complete / "meta.pt").write_bytes(b"x")
    incomplete = tmp_path / "step=000030.ckpt"  # a sharded folder without its metadata
    incomplete.mkdir()
    (incomplete / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / f"{TMP_PREFIX}step=000040.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == complete
    assert latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint_step("step=000123.ckpt") == 123 and checkpoint_step("last.ckpt") is None
