"""RNG states travel in checkpoints: after a mid-epoch resume, training steps draw exactly what the
uninterrupted run drew (torch, Python and NumPy), and without the callback they would not."""

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from gazelit.callbacks.rng_state import RNGStateCheckpoint


class DrawingModel(BoringModel):
    """Records, per step, one draw from each generator (as a model with dropout or augmentation would)."""

    def __init__(self):
        super().__init__()
        self.draws: dict[int, tuple[float, float, float]] = {}

    def training_step(self, batch, batch_idx):
        self.draws[self.global_step] = (torch.rand(()).item(), random.random(), float(np.random.rand()))
        return super().training_step(batch, batch_idx)


def _fit(tmp_path, max_steps, callbacks, ckpt_path=None):
    L.seed_everything(0)
    model = DrawingModel()
    trainer = L.Trainer(max_steps=max_steps, limit_train_batches=8, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    return model.draws


def _checkpoint_at_step_3(tmp_path):
    return ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")


def test_a_resumed_run_draws_what_the_uninterrupted_run_drew(tmp_path):
    full = _fit(tmp_path / "full", 6, [RNGStateCheckpoint()])
    _fit(tmp_path / "cut", 3, [RNGStateCheckpoint(), _checkpoint_at_step_3(tmp_path / "ckpt")])
    resumed = _fit(tmp_path / "resumed", 6, [RNGStateCheckpoint()], ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert sorted(resumed) == [3, 4, 5]
    assert all(resumed[s] == full[s] for s in resumed)


def test_without_the_callback_the_draws_differ(tmp_path):
    """The test above can fail: a plain resume starts from the freshly seeded generators."""
    full = _fit(tmp_path / "full", 6, [])
    _fit(tmp_path / "cut", 3, [_checkpoint_at_step_3(tmp_path / "ckpt")])
    resumed = _fit(tmp_path / "resumed", 6, [], ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert any(resumed[s] != full[s] for s in resumed)


def test_the_state_loads_with_weights_only(tmp_path):
    torch.save({"rng": RNGStateCheckpoint().state_dict()}, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=True)
