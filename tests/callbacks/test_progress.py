"""The fit progress bar names the step budget instead of Lightning's "Epoch 6/-2"."""

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from gazelit.callbacks.progress import StepBoundedProgressBar, progress_bar

pytest.importorskip("rich", reason="the rich progress bar needs the rich package")


def _fit(tmp_path, **limits):
    bar = StepBoundedProgressBar()
    trainer = L.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0, **limits)  # fmt: skip
    trainer.fit(BoringModel())
    return bar


def test_a_step_bounded_run_shows_its_step_budget(tmp_path):
    bar = _fit(tmp_path, max_steps=3)
    assert bar._get_train_description(0).strip() == "Epoch 0 (of 3 steps)"


def test_an_epoch_bounded_run_keeps_lightnings_label(tmp_path):
    bar = _fit(tmp_path, max_epochs=2, limit_train_batches=1)
    assert bar._get_train_description(1).strip() == "Epoch 1/1"


def test_fit_uses_it():
    assert [type(c) for c in progress_bar()] == [StepBoundedProgressBar]
