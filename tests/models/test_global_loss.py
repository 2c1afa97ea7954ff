"""Every rank runs the same modules whatever its batch holds, and the loss of an optimiser step is the
mean over the supervised tokens of the whole global batch (micro-batches and ranks)."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch.utils.data import DataLoader

from gazelit.lit_module import GazeVLMModule
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.schema import OptimConfig, TrainConfig

from ..builders import model_config, tiny_vlm
from ..batches import make_batch


def config(trainable_vision: bool = True):
    return model_config(vision_trainable=trainable_vision)


def model() -> GazeVLM:
    return tiny_vlm(vision_trainable=True).train()


def test_a_text_only_batch_runs_the_vision_tower_at_zero_weight():
    vlm = model().train()
    batch = make_batch(vlm, [[("text", 9)], [("text", 5)]])
    loss = vlm(batch).loss
    loss.backward()
    for name in ("vision", "projector"):
        grads = [p.grad for p in getattr(vlm, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and not g.abs().any() for g in grads), name  # in the graph, zero
    assert vlm.context_tokens.grad is not None and not vlm.context_tokens.grad.abs().any()
    llm_grad = {n: p.grad.clone() for n, p in vlm.llm.named_parameters() if p.grad is not None}
    vlm.zero_grad()
    vlm.eval()  # no dummy path outside training (single process): the plain text model
    plain = vlm(batch).loss
    assert torch.equal(loss.detach(), plain.detach())
    plain.backward()
    for n, p in vlm.llm.named_parameters():
        if n in llm_grad:
            assert torch.equal(p.grad, llm_grad[n]), n


class GradRecorder(L.Callback):
    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def micro_batches(vlm):
    """Two micro-batches with very different numbers of supervised tokens (4 against 41)."""
    small = make_batch(vlm, [[("image",), ("text", 4)]], seed=1)
    large = make_batch(vlm, [[("image",), ("text", 25)], [("text", 17)]], seed=2)
    return small, large


def test_accumulated_micro_batches_give_the_gradient_of_the_token_mean_of_the_whole_batch(tmp_path):
    lit = GazeVLMModule(config(), TrainConfig(optim=OptimConfig(warmup_steps=0, schedule="constant")), model=model())
    small, large = micro_batches(lit.model)
    recorder = GradRecorder()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accumulate_grad_batches=2, gradient_clip_val=None,
                        callbacks=[recorder], default_root_dir=tmp_path)  # fmt: skip
    start = copy.deepcopy(lit.model.state_dict())
    trainer.fit(lit, train_dataloaders=DataLoader([small, large], batch_size=None))

    reference = model()
    reference.load_state_dict(start)
    reference.train()
    losses, counts = [], []
    for batch in (small, large):
        out = reference(batch, num_items_in_batch=1)
        losses.append(out.loss)
        counts.append(int((batch["labels"][:, 1:] != -100).sum()))
    tokens = sum(counts)
    (sum(losses) / tokens).backward()
    assert counts == [4, 41]
    for name, p in reference.named_parameters():
        key = "model." + name
        if key in recorder.grads:
            assert torch.allclose(recorder.grads[key], p.grad, atol=1e-6, rtol=1e-4), name
    # the per-micro-batch mean average would differ: the test can tell the two apart
    mean_of_means = sum(loss / n for loss, n in zip(losses, counts)) / 2
    assert abs(float(mean_of_means) - float(sum(losses) / tokens)) > 1e-3
