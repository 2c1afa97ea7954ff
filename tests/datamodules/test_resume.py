"""Resuming the training stream mid-epoch: loader state round trips and a real Lightning fit + resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def batch_ids(loader) -> list[list[str]]:
    return [[m["id"] for m in b["meta"]] for b in loader]


def take(loader, count: int) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append([m["id"] for m in batch["meta"]])
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("stop_after", [7, 16])
def test_resumed_loader_continues_exactly_where_it_stopped(make_datamodule, demo, stop_after):
    def fresh():
        return make_datamodule([demo.shards["train"]], batch_size=8, num_workers=2, seed=5).train_dataloader()

    reference = fresh()
    epoch0, epoch1 = batch_ids(reference), batch_ids(reference)

    interrupted = fresh()
    before = take(interrupted, stop_after)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (0, stop_after)

    resumed = fresh()
    resumed.load_state_dict(state)
    after = batch_ids(resumed)
    assert before + after == epoch0  # same batches, same order: nothing replayed, nothing missing
    flat = [i for batch in before + after for i in batch]
    assert len(flat) == len(set(flat)) == 240
    assert batch_ids(resumed) == epoch1  # and the next epoch is the one an uninterrupted run sees


def test_rank_zero_state_resumes_every_rank(make_datamodule, demo):
    def fresh(rank):
        dm = make_datamodule([demo.shards["train"]], rank=rank, world_size=2, batch_size=8, num_workers=2)
        return dm.train_dataloader()

    full = {rank: batch_ids(fresh(rank)) for rank in range(2)}
    interrupted = {rank: fresh(rank) for rank in range(2)}
    before = {rank: take(interrupted[rank], 5) for rank in range(2)}
    rank_zero_state = interrupted[0].state_dict()
    for rank in range(2):
        resumed = fresh(rank)
        resumed.load_state_dict(rank_zero_state)
        assert before[rank] + batch_ids(resumed) == full[rank]


def test_state_of_a_finished_epoch_starts_the_next(make_datamodule, demo):
    loader = make_datamodule([demo.shards["train"]], batch_size=8).train_dataloader()
    epoch0 = batch_ids(loader)
    state = loader.state_dict()
    assert state["batches_consumed"] == len(loader) == len(epoch0)
    reference = make_datamodule([demo.shards["train"]], batch_size=8).train_dataloader()
    batch_ids(reference)
    resumed = make_datamodule([demo.shards["train"]], batch_size=8).train_dataloader()
    resumed.load_state_dict(state)
    assert batch_ids(resumed) == batch_ids(reference)


def test_changed_settings_are_refused(make_datamodule, demo):
    state = make_datamodule([demo.shards["train"]], num_workers=2).train_dataloader().state_dict()
    other = make_datamodule([demo.shards["train"]], num_workers=1).train_dataloader()
    with pytest.raises(ValueError, match="num_workers: saved 2, now 1"):
        other.load_state_dict(state)


class RecordingModule(L.LightningModule):
    """Trains nothing useful: records the sample ids of every batch it is given."""

    def __init__(self, read_estimated_steps: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.read_estimated_steps = read_estimated_steps
        self.seen: list[list[str]] = []
        self.estimated_steps = None

    def training_step(self, batch, batch_idx):
        self.seen.append([m["id"] for m in batch["meta"]])
        return (self.weight * batch["attention_mask"].float().mean()).sum()

    def configure_optimizers(self):
        if self.read_estimated_steps:  # builds the train loader early: the PL #20550 situation
            self.estimated_steps = self.trainer.estimated_stepping_batches
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, max_epochs=2, **kwargs,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.parametrize("read_estimated_steps", [True, False])
def test_lightning_fit_resumes_mid_epoch_without_replay(make_datamodule, demo, tmp_path, read_estimated_steps):
    def datamodule():
        return make_datamodule([demo.shards["train"]], batch_size=8, num_workers=2, seed=11)

    reference_loader = datamodule().train_dataloader()
    reference = batch_ids(reference_loader) + batch_ids(reference_loader)  # two epochs of 30 batches

    first = RecordingModule(read_estimated_steps)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    trainer(tmp_path, max_steps=7, callbacks=[checkpoint]).fit(first, datamodule=datamodule())
    assert len(first.seen) == 7
    ckpt = tmp_path / "ckpt" / "epoch=0-step=7.ckpt"
    assert ckpt.exists()

    second = RecordingModule(read_estimated_steps)
    trainer(tmp_path, enable_checkpointing=False).fit(second, datamodule=datamodule(), ckpt_path=ckpt)
    if read_estimated_steps:
        assert second.estimated_steps == 60
    assert first.seen + second.seen == reference
    epoch0 = [i for batch in (first.seen + second.seen)[:30] for i in batch]
    assert len(epoch0) == len(set(epoch0)) == 240


def test_closing_a_loader_mid_epoch_stops_its_workers_at_once(make_datamodule, demo):
    """An epoch's iterator still held (as Lightning's fit loop holds it when a run stops mid-epoch):
    close() (the datamodule's teardown) stops its workers now instead of at interpreter exit."""
    import multiprocessing
    import time

    loader = make_datamodule([demo.shards["train"]], batch_size=4, num_workers=2).train_dataloader()
    before = set(multiprocessing.active_children())
    running = iter(loader)
    next(running), next(running)
    assert len(set(multiprocessing.active_children()) - before) == 2  # workers alive mid-epoch
    started = time.perf_counter()
    loader.close()
    assert not set(multiprocessing.active_children()) - before
    assert time.perf_counter() - started < 5
    assert take(loader, 1)  # the loader still works: a new epoch starts new workers
