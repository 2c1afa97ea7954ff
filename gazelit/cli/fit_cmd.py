"""`gazelit fit RECIPE [key=value ...]`: train as a recipe says; prints where the run's outputs are."""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """\
examples:
  gazelit fit recipes/demo.yaml
  gazelit fit recipes/demo.yaml trainer.max_steps=50 run.name=quick
  gazelit fit recipes/demo.yaml resume=auto             # continue from the newest complete checkpoint

multi-node (one process per GPU; Lightning reads torchrun's or SLURM's environment; the paper recipes
take the node count from $NUM_NODES and keep the global batch by adapting gradient accumulation):
  NUM_NODES=4 torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      $(which gazelit) fit recipes/cambrian4b_finetune.yaml
  NUM_NODES=$SLURM_NNODES srun --ntasks-per-node 8 --gpus-per-node 8 gazelit fit recipes/cambrian4b_finetune.yaml
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit", help="train a model from a recipe", epilog=EPILOG,
        description="Train from a YAML recipe: demo data if the recipe asks for it, checkpoints every N steps, "
                    "TensorBoard logs, routing pictures, and the exported model at the end.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. trainer.max_steps=10")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gazelit.recipe import RecipeError, load_recipe

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides, paths=True)
    except RecipeError as e:
        print(f"gazelit fit: {e}", file=sys.stderr)
        return 2
    import shlex

    from gazelit.integrity import CheckpointError
    from gazelit.training import RunSetupError, fit

    kept = [o for o in args.overrides if not o.startswith(("resume=", "init_from="))]
    again = "gazelit fit " + shlex.join([args.recipe, *kept, "resume=auto"])
    import torch.distributed as dist

    grouped_before = dist.is_available() and dist.is_initialized()
    try:
        result = fit(recipe, continue_command=again)
    except (RunSetupError, CheckpointError) as e:
        print(f"gazelit fit: {e}", file=sys.stderr)
        return 2
    if result.is_global_zero:
        print("\n" + result.summary(), flush=True)
    if not grouped_before:  # only a process group this fit created (a caller's own group is the caller's)
        _end_distributed_process()
    return 0


def _end_distributed_process() -> None:
    """After a multi-process fit: leave the process group and exit at once. gloo's threads can abort
    the interpreter during normal shutdown ("terminate called without an active exception", exit code
    134) after all work is done; everything (checkpoints, logs, export) is written by now."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
