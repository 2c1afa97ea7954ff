"""Two CPU ranks over gloo: the global-batch token mean across ranks, and FSDP2 with text-only batches on
one rank while the other holds images (the modules every rank runs must match, or gloo aborts)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .ddp_loss_driver import RANK_SAMPLES
from .test_global_loss import model
from ..batches import make_batch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def run(out: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.models.ddp_loss_driver", str(out), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=500)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_two_ranks_with_different_token_counts_give_the_single_process_gradient(tmp_path):
    run(tmp_path, "grads")
    grads = [torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1)]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name  # DDP: the same on both ranks

    reference = model().train()
    start = copy.deepcopy(reference.state_dict())
    reference.load_state_dict(start)
    losses, tokens = [], 0
    for rank in (0, 1):
        samples, seed = RANK_SAMPLES[rank]
        batch = make_batch(reference, samples, seed=seed)
        losses.append(reference(batch, num_items_in_batch=1).loss)
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    (sum(losses) / tokens).backward()
    compared = 0
    for name, p in reference.named_parameters():
        if "model." + name in grads[0] and p.grad is not None:
            assert torch.allclose(grads[0]["model." + name], p.grad, atol=1e-6, rtol=1e-4), name
            compared += 1
    assert compared > 10


def test_fsdp2_trains_when_one_rank_has_a_text_only_batch_and_the_other_an_image(tmp_path):
    run(tmp_path, "mixed")
    for rank in (0, 1):
        losses = torch.load(tmp_path / f"losses{rank}.pt")
        assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses)))
