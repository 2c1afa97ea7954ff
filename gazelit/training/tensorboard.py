"""The run's TensorBoard logger: Lightning's TensorBoardLogger, with the resolved recipe as hparams.

TensorBoard keeps one set of hyper-parameters per run: the plugin data travels in the summary metadata
of a fixed tag, and readers (EventAccumulator, the HParams dashboard) keep the metadata of the tag's first
event. Lightning writes a set at each `log_hyperparams` call (the parameter counts at fit start, the
module's hparams, ...), so the first of them would hide the recipe. This logger starts from the flattened
recipe and writes the union of everything logged so far at every call: the set readers keep always holds
the whole recipe.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> "a.b.c" keys; lists and other non-scalars as strings, None as "None"."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None:
            out[name] = "None"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class RecipeTensorBoardLogger(TensorBoardLogger):
    def __init__(self, save_dir: str, recipe_hparams: dict[str, Any], **kwargs: Any):
        super().__init__(save_dir, **kwargs)
        self._all_hparams: dict[str, Any] = flatten(recipe_hparams)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, metrics: Any = None, step: int | None = None) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        self._all_hparams.update(flatten(params))
        super().log_hyperparams(dict(self._all_hparams), metrics=metrics, step=step)
