"""`gazelit export CHECKPOINT OUT_DIR`: a training checkpoint -> a GazeVLM.save_pretrained directory."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="turn a training checkpoint into a model directory",
        description="Read a Lightning checkpoint of a gazelit run (a single file, or a sharded "
                    "torch.distributed.checkpoint folder written under fsdp2) and write the model as a "
                    "GazeVLM.save_pretrained directory (config, safetensors weights, tokenizer). The k the "
                    "schedule had reached becomes the model's k. Loads with torch.load(weights_only=True).",
    )  # fmt: skip
    parser.add_argument(
        "checkpoint", help="checkpoint file or sharded checkpoint folder (runs/NAME/checkpoints/step=...)"
    )
    parser.add_argument("out", help="output directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gazelit.training.checkpoints import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"gazelit export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0
