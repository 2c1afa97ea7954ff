"""Two CPU ranks over gloo start a pretrained GazeVLM the way `gazelit fit` does under fsdp2, for
test_sharded_start.py (Lightning starts rank 1 by running this module again):

    python -m tests.training.sharded_start_driver DIR

DIR holds `config.json` (a ModelConfig whose LLM and vision tower are local save_pretrained directories)
and `batch.pt`. Each rank builds the model with its pretrained parts on the meta device, lets
`GazeVLMModule.configure_model` shard it and read its shards, runs one validation batch and writes
DIR/rank<R>.pt: the logits (full on every rank), its peak RSS, and how many parameter elements it holds.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from gazelit.lit_module import GazeVLMModule
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.schema import ModelConfig, StrategyConfig, TrainerConfig
from gazelit.training.parallel import build_strategy

from ..builders import TOKENIZER


class LogitsModule(GazeVLMModule):
    def __init__(self, *args, out: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch).logits
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.model.parameters())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.save({"logits": logits, "local_elements": local, "peak_rss": peak,
                    "meta": any(p.is_meta for p in self.model.parameters())},
                   self.out / f"rank{self.global_rank}.pt")  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1])
    config = ModelConfig.from_dict(json.loads((out / "config.json").read_text()))
    batch = torch.load(out / "batch.pt")
    torch.manual_seed(0)
    lit = LogitsModule(config, model=GazeVLM.build(config, tokenizer=TOKENIZER, empty_pretrained=True).eval(), out=out)
    assert lit.model.pending_weights, "the pretrained parts were not built empty"
    trainer_config = TrainerConfig(accelerator="cpu", devices=2, strategy=StrategyConfig(name="fsdp2"))
    strategy, lit.parallel_plan = build_strategy(trainer_config, lit.model.block_classes())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out)  # fmt: skip
    trainer.validate(lit, dataloaders=DataLoader([batch], batch_size=None), verbose=False)


if __name__ == "__main__":
    main()
