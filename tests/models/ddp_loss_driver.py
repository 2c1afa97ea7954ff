"""Two-rank CPU runs for test_distributed_loss.py (Lightning starts rank 1 by running this module again):

    python -m tests.models.ddp_loss_driver OUT_DIR grads    # DDP, ranks with very different token counts:
                                                            # OUT_DIR/grads<R>.pt after the first step
    python -m tests.models.ddp_loss_driver OUT_DIR mixed    # FSDP2, 50 steps where one rank's batch is
                                                            # text-only while the other's holds an image:
                                                            # OUT_DIR/losses<R>.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from gazelit.lit_module import GazeVLMModule
from gazelit.schema import OptimConfig, StrategyConfig, TrainConfig, TrainerConfig
from gazelit.training.parallel import build_strategy

from .test_global_loss import config, model
from ..batches import make_batch

RANK_SAMPLES = {  # (samples, seed) per rank: 4 supervised tokens against 41
    0: ([[("image",), ("text", 4)]], 1),
    1: ([[("image",), ("text", 25)], [("text", 17)]], 2),
}
MIXED_STEPS = 50


class Data(L.LightningDataModule):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def train_dataloader(self):
        vlm = model()
        rank = self.trainer.global_rank
        if self.mode == "grads":
            samples, seed = RANK_SAMPLES[rank]
            return DataLoader([make_batch(vlm, samples, seed=seed)], batch_size=None)
        text = make_batch(vlm, [[("text", 7)]], seed=10 + rank)
        image = make_batch(vlm, [[("image",), ("text", 5)]], seed=20 + rank)
        # rank 0: text-only on even steps; rank 1: text-only on odd steps
        batches = [text if (step + rank) % 2 == 0 else image for step in range(MIXED_STEPS)]
        return DataLoader(batches, batch_size=None)


class Record(L.Callback):
    def __init__(self, out: Path, mode: str):
        self.out, self.mode, self.losses = out, mode, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.mode == "grads" and batch_idx == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.out / f"grads{trainer.global_rank}.pt")
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, pl_module):
        torch.save(self.losses, self.out / f"losses{trainer.global_rank}.pt")


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    strategy_name = "ddp" if mode == "grads" else "fsdp2"
    trainer_config = TrainerConfig(accelerator="cpu", devices=2, strategy=StrategyConfig(name=strategy_name))
    # mixed: a frozen vision tower (the recipes' default), the case that aborted gloo before the dummy path
    cfg = config(trainable_vision=mode == "grads")
    torch.manual_seed(0)
    from gazelit.models.gaze_vlm import GazeVLM

    from ..builders import TOKENIZER

    lit = GazeVLMModule(cfg, TrainConfig(optim=OptimConfig(warmup_steps=0, schedule="constant")),
                        model=GazeVLM.build(cfg, tokenizer=TOKENIZER))
    strategy, lit.parallel_plan = build_strategy(trainer_config, lit.model.block_classes())
    trainer = L.Trainer(
        max_steps=1 if mode == "grads" else MIXED_STEPS, accelerator="cpu", devices=2, strategy=strategy,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=None, use_distributed_sampler=False, callbacks=[Record(out, mode)],
        default_root_dir=out,
    )  # fmt: skip
    trainer.fit(lit, datamodule=Data(mode))


if __name__ == "__main__":
    main()
