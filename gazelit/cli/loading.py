"""Loading a GazeVLM for the inference-side commands (generate, eval, analyze).

RECIPE_OR_MODEL is either
  * a directory written by `GazeVLM.save_pretrained` (it holds gazelit_config.json), or
  * a recipe YAML: the model is built from its `model:` section (with `-o key=value` overrides), and
    `--checkpoint CKPT` loads the weights of a Lightning checkpoint of `gazelit.lit_module.GazeVLMModule`
    (a single file or a sharded FSDP2 folder), verified and read by gazelit.training.checkpoints, the one
    module that reads checkpoints: no pickled code is executed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load only when a model is loaded (fast `gazelit --help`)
    import torch

    from gazelit.models.gaze_vlm import GazeVLM

from gazelit.schema import MODEL_CONFIG_FILE as CONFIG_FILE


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional RECIPE_OR_MODEL and the options every loading command shares."""
    parser.add_argument("model", metavar="RECIPE_OR_MODEL",
                        help="a model directory (GazeVLM.save_pretrained) or a recipe YAML")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="with a recipe: a Lightning checkpoint of GazeVLMModule to load the weights from")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="with a recipe: override a recipe key (repeatable), e.g. -o model.gaze.top_k=4")
    parser.add_argument("--top-k", dest="top_k", default=None, metavar="K|all",
                        help="regions per query head at inference (default: the model's own k)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def model_from_args(args: argparse.Namespace) -> GazeVLM:
    return load_model(args.model, checkpoint=args.checkpoint, overrides=args.override, device=args.device,
                      top_k=args.top_k)


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_model(
    spec: str | Path,
    checkpoint: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    device: str | torch.device = "cpu",
    top_k: int | str | None = None,
) -> GazeVLM:
    """A GazeVLM in eval mode on `device` from a model directory or a recipe (see the module docstring)."""
    from gazelit.schema import resolve_top_k
    from gazelit.models.gaze_vlm import GazeVLM

    path = Path(spec)
    if path.is_dir():
        if not is_model_dir(path):
            raise ValueError(f"{path} is a directory without {CONFIG_FILE}: not a saved GazeVLM")
        if checkpoint or overrides:
            raise ValueError("--checkpoint and --override apply to a recipe, not to a saved model directory")
        model = GazeVLM.from_pretrained(path)
    elif path.is_file():
        from gazelit.recipe import load_recipe  # imports Lightning: only when a recipe is given

        recipe = load_recipe(path, list(overrides))
        model = GazeVLM.build(recipe.model)
        if checkpoint:
            load_checkpoint_weights(model, checkpoint)
    else:
        raise FileNotFoundError(f"no model directory or recipe file at {path}")
    if top_k is not None:
        model.top_k = resolve_top_k(top_k)  # the command line's string, resolved here once
    return model.to(device).eval()


def load_checkpoint_weights(model: GazeVLM, checkpoint: str | Path) -> None:
    """Load the GazeVLM weights of a GazeVLMModule Lightning checkpoint (file or sharded folder)."""
    from gazelit.models.gaze_vlm import load_exact_weights
    from gazelit.training.checkpoints import model_state

    weights = model_state(checkpoint)
    if not weights:
        raise ValueError(f"{checkpoint}: no 'model.*' weights: not a GazeVLMModule checkpoint")
    load_exact_weights(model, weights, checkpoint)
