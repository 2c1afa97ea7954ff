"""Training: the `fit` entry point and what it is made of (strategies and sharding, checkpoints and
export, demo data, the TensorBoard logger). The Lightning callbacks it uses live in the top-level
`gazelit.callbacks` package."""

from gazelit.training.fit import FitResult, RunPaths, RunSetupError, fit

__all__ = ["FitResult", "RunPaths", "RunSetupError", "fit"]
