"""Loading a GazeVLM for the inference-side commands (generate, eval, analyze).

RECIPE_OR_MODEL is either
  * a directory written by `GazeVLM.save_pretrained` (it holds gazelit_config.json), or
  * a recipe YAML: the model is built from its `model:` section (with `-o key=value` overrides), and
    `--checkpoint CKPT` loads the weights of a single-file Lightning checkpoint of
    `gazelit.lit_module.GazeVLMModule` (its state_dict keys start with "model.").

Checkpoints are read with `torch.load(..., weights_only=True)`: no pickled code is executed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load only when a model is loaded (fast `gazelit --help`)
    import torch

    from gazelit.models.gaze_vlm import GazeVLM

CONFIG_FILE = "gazelit_config.json"  # gazelit.models.gaze_vlm.CONFIG_FILE
MODULE_PREFIX = "model."  # GazeVLMModule keeps the GazeVLM as `self.model`


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
    """Load the `model.*` weights of a GazeVLMModule Lightning checkpoint (or of its bare state dict)."""
    import torch

    from gazelit.models.gaze_vlm import tied_parameter_names

    try:
        data = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpicklable content, a sharded checkpoint directory, a corrupt file
        raise ValueError(
            f"{checkpoint}: cannot read it as a single-file checkpoint with weights_only=True "
            f"({type(exc).__name__}: {exc}); for a sharded checkpoint run `gazelit export` first"
        ) from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint}: no state_dict in the checkpoint")
    weights = {k[len(MODULE_PREFIX):]: v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    if not weights:
        raise ValueError(f"{checkpoint}: no '{MODULE_PREFIX}*' weights: not a GazeVLMModule checkpoint")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(tied_parameter_names(model))
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: weights do not match the recipe's model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
