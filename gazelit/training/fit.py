"""`fit(recipe)`: everything `gazelit fit` does, from a validated recipe to a finished run directory.

    run_dir = <run.root>/<run.name>
      recipe.yaml       the fully resolved recipe
      checkpoints/      step=000100.ckpt ... (files, or sharded folders under fsdp2), the last K
      tensorboard/      event files: losses, lr per group, k, attended fraction, throughput, skips,
                        the recipe as hparams, routing pictures
      routing/          the routing pictures as PNG (latest.png is the newest)
      model/            the final model as a GazeVLM.save_pretrained directory (checkpoint.export_final)

A run without `resume` refuses a run directory that already holds checkpoints (they would mix with
its own), and a resume refuses a checkpoint trained with other `model` values than the recipe's (only
the keys in RESUMABLE_MODEL_CHANGES may differ); problems of this kind raise RunSetupError before
anything is built or written.

Order of work: demo data (if the recipe has a `demo:` section and it is missing), seed, model (plus
`init_from` weights unless resuming), datamodule from the model's tokenizer / image transform / grid,
strategy, callbacks, logger, Trainer, `trainer.fit(ckpt_path=<resume>)`, then the export on rank 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from gazelit.callbacks.checkpointing import AtomicModelCheckpoint, checkpoints_newest_first, latest_checkpoint
from gazelit.callbacks.interrupt import InterruptReport
from gazelit.callbacks.k_schedule import ProgressiveTopK
from gazelit.callbacks.progress import progress_bar
from gazelit.callbacks.rng_state import RNGStateCheckpoint
from gazelit.callbacks.routing_image import RoutingImageLogger
from gazelit.callbacks.stream_resume import StreamResumeAcrossWorldSizes
from gazelit.integrity import CheckpointError, atomic_write_text
from gazelit.recipe import Recipe, RecipeError, check_paths, flat_dict, flat_hparams, resolved_yaml
from gazelit.training.checkpoints import checked
from gazelit.training.parallel import build_strategy
from gazelit.training.run_lock import RunLock, RunLockedError

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"


class RunSetupError(ValueError):
    """The run cannot start as asked (run directory, resume path, strategy for a checkpoint)."""


@dataclass
class RunPaths:
    root: Path
    recipe: Path
    checkpoints: Path
    tensorboard: Path
    routing: Path
    model: Path

    @staticmethod
    def of(recipe: Recipe) -> RunPaths:
        root = recipe.run_dir
        return RunPaths(
            root, root / RECIPE_FILE, root / "checkpoints", root / "tensorboard", root / "routing", root / "model"
        )


@dataclass
class FitResult:
    paths: RunPaths
    global_step: int
    resumed_from: Path | None
    last_checkpoint: Path | None = None
    routing_picture: Path | None = None
    exported_model: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_global_zero: bool = True

    def summary(self) -> str:
        p = self.paths
        lines = [
            f"run directory:    {p.root}",
            f"resolved recipe:  {p.recipe}",
            f"checkpoints:      {p.checkpoints}"
            + (f" (last: {self.last_checkpoint.name})" if self.last_checkpoint else ""),
            f"tensorboard logs: {p.tensorboard}   (tensorboard --logdir {p.tensorboard})",
        ]
        if self.routing_picture:
            lines.append(f"routing picture:  {self.routing_picture}")
        if self.exported_model:
            lines.append(f"exported model:   {self.exported_model}")
        if self.resumed_from:
            lines.append(f"resumed from:     {self.resumed_from}")
        shown = {k: v for k, v in self.metrics.items() if k in ("train/loss", "val/loss", "val/token_acc", "val/answer_acc")}
        if shown:
            lines.append("final metrics:    " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pieces
def resolve_resume(recipe: Recipe, paths: RunPaths) -> Path | None:
    """`resume: auto` -> the newest checkpoint of this run that verifies (None: start fresh), saying which
    newer ones it skipped and why; a path -> itself, verified. Damage is a RunSetupError naming the file."""
    if recipe.resume is None:
        return None
    if recipe.resume == "auto":
        found = checkpoints_newest_first(paths.checkpoints)
        if not found:
            log.info("resume: auto found no complete checkpoint in %s; starting from scratch", paths.checkpoints)
            return None
        skipped = []
        for path in found:
            try:
                checked(path)
            except CheckpointError as e:
                log.warning("resume: auto skips %s: %s", path.name, e)
                skipped.append(str(e))
                continue
            if skipped:
                log.warning("resume: auto continues from %s, the newest intact checkpoint", path.name)
            return path
        raise RunSetupError(f"resume: auto: no intact checkpoint in {paths.checkpoints}: " + "; ".join(skipped))
    path = Path(recipe.resume)
    if not path.exists():
        raise RunSetupError(f"resume: {path} does not exist")
    try:
        return checked(path)
    except CheckpointError as e:
        raise RunSetupError(f"resume: {e}") from None


def check_fresh_run_dir(resume: Path | None, paths: RunPaths) -> None:
    """A run that does not resume must not mix its checkpoints with those of an earlier run."""
    if resume is None and latest_checkpoint(paths.checkpoints) is not None:
        raise RunSetupError(
            f"{paths.checkpoints} already holds checkpoints of an earlier run; continue it with resume=auto, "
            f"or start a new one with another run.name (or delete the folder)"
        )


def check_resumable(path: Path | None, recipe: Recipe) -> None:
    """A sharded checkpoint folder can only be restored by ModelParallelStrategy (on any number of ranks)."""
    from gazelit.training.checkpoints import is_sharded_checkpoint

    if path is not None and is_sharded_checkpoint(path) and recipe.trainer.strategy.name != "fsdp2":
        raise RunSetupError(
            f"{path} is a sharded (fsdp2) checkpoint; resume it with trainer.strategy.name=fsdp2 (any number of "
            f"devices), or export it (`gazelit export`) and start from the weights with init_from"
        )


# model keys a resumed run may change: how attention is computed or where the starting weights were read
# from, never which weights exist or what they mean (the checkpoint holds the weights)
RESUMABLE_MODEL_CHANGES = frozenset({
    "gaze.top_k", "gaze.impl", "gaze.chunk", "gaze.decode", "gaze.selection",
    "vision.pretrained", "llm.pretrained", "tokenizer.pretrained", "tokenizer.tiny_corpus",
})  # fmt: skip


def check_same_model(path: Path | None, recipe: Recipe) -> None:
    """A resume continues the checkpoint's model: its `model` values (saved in the checkpoint) must equal
    the recipe's, except RESUMABLE_MODEL_CHANGES (logged). Otherwise one line naming the keys, instead of
    a strict state-dict error after the model is built (or, for keys that keep the weights' shapes, a run
    that silently continues another model)."""
    from gazelit.training.checkpoints import checkpoint_metadata

    if path is None:
        return
    saved = (checkpoint_metadata(path).get("hyper_parameters") or {}).get("model_config")
    if not isinstance(saved, dict):
        raise RunSetupError(f"resume: {path} holds no model_config in its hyper_parameters; not a gazelit checkpoint?")
    before, now = flat_dict(saved), flat_dict(recipe.model.to_dict())
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key, _MISSING) != now.get(key, _MISSING))
    allowed = [key for key in changed if key in RESUMABLE_MODEL_CHANGES]
    for key in allowed:
        log.warning("resume: model.%s changes from %r to %r", key, before.get(key), now.get(key))
    refused = [key for key in changed if key not in RESUMABLE_MODEL_CHANGES]
    if refused:
        shown = ", ".join(f"model.{key}: {_show(before.get(key, _MISSING))} in the checkpoint, "
                          f"{_show(now.get(key, _MISSING))} in the recipe" for key in refused[:3])  # fmt: skip
        more = f" (and {len(refused) - 3} more: {', '.join('model.' + k for k in refused[3:])})" if len(refused) > 3 else ""
        raise RunSetupError(
            f"resume: {path} was trained with another model: {shown}{more}; resume with the checkpoint's values, "
            f"or start a new run (another run.name) with init_from={path} to begin from its weights"
        )


_MISSING = object()


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else repr(value)


def build_module(recipe: Recipe, resume: Path | None):
    """The GazeVLMModule; `init_from` weights are loaded into the full model here (before sharding)."""
    from gazelit.lit_module import GazeVLMModule
    from gazelit.models.gaze_vlm import GazeVLM
    from gazelit.training.checkpoints import load_matching_weights

    # fsdp2: pretrained components start on the meta device; configure_model reads each rank's shards
    model = GazeVLM.build(recipe.model, empty_pretrained=recipe.trainer.strategy.name == "fsdp2")
    module = GazeVLMModule(recipe.model, recipe.train, model=model)
    if recipe.train.stage == "grpo":  # manual optimisation: the module clips; its KL reference is init_from
        module.gradient_clip_val = recipe.trainer.gradient_clip_val
        module.reference_from = recipe.init_from
    if recipe.init_from and resume is None:
        try:
            if model.pending_weights:  # loaded after the pretrained weights, or they would overwrite it
                checked(recipe.init_from)
                module.init_from = recipe.init_from
            else:
                load_matching_weights(model, recipe.init_from)
        except (CheckpointError, FileNotFoundError) as e:
            raise RunSetupError(f"init_from: {e}") from None
    elif recipe.init_from:
        log.info(
            "resuming from %s: init_from %s is not applied (the checkpoint holds the weights)", resume, recipe.init_from
        )
    return module


def build_datamodule(recipe: Recipe, model: Any):
    from gazelit.training.data import TrainingDataModule

    look = recipe.model.look
    return TrainingDataModule(
        recipe.data, model.tokenizer, model.image_transform(), model.visual_grid, model.num_context,
        look_bins=look.bins if look.enabled else None,
    )


def build_callbacks(recipe: Recipe, paths: RunPaths, model: Any, continue_command: str | None = None) -> list[L.Callback]:
    continue_command = continue_command or f"gazelit fit {paths.recipe} resume=auto"
    callbacks: list[L.Callback] = [
        AtomicModelCheckpoint(paths.checkpoints, recipe.checkpoint.every_n_steps, recipe.checkpoint.keep_last),
        InterruptReport(paths.checkpoints, continue_command),
        StreamResumeAcrossWorldSizes(),
        RNGStateCheckpoint(),
        *progress_bar(),
    ]
    if recipe.logging.tensorboard:  # LearningRateMonitor needs a logger
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if model.gaze_enabled:
        callbacks.append(ProgressiveTopK.from_config(recipe.schedule))
        if recipe.logging.routing_image_every_n_steps > 0:
            callbacks.append(RoutingImageLogger(recipe.logging.routing_image_every_n_steps, paths.routing,
                                                recipe.logging.routing_max_new_tokens))  # fmt: skip
    return callbacks


def build_trainer(recipe: Recipe, paths: RunPaths, strategy: Any, callbacks: list[L.Callback]) -> L.Trainer:
    t = recipe.trainer
    logger: Any = False
    if recipe.logging.tensorboard:
        from gazelit.training.tensorboard import RecipeTensorBoardLogger

        logger = RecipeTensorBoardLogger(str(paths.root), flat_hparams(recipe), name="tensorboard", version="")
    val_every = t.val_check_interval * t.accumulate_grad_batches if t.val_check_interval else None
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=None if recipe.train.stage == "grpo" else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # the datamodule splits the stream between ranks itself
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(paths.root),
    )


def write_recipe(recipe: Recipe, paths: RunPaths) -> None:
    """The resolved recipe into the run directory (written atomically; rank 0 only)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.recipe, resolved_yaml(recipe))


# ---------------------------------------------------------------------------------------------- fit
def fit(
    recipe: Recipe, extra_callbacks: list[L.Callback] | tuple = (), continue_command: str | None = None
) -> FitResult:
    """Train as the recipe says; returns where everything went (complete on rank 0).

    The run directory is locked for the whole run (one fit per directory). `continue_command` is what
    Ctrl-C prints as the way to continue (default: the resolved recipe with resume=auto).
    """
    try:
        check_paths(recipe)
    except RecipeError as e:
        raise RunSetupError(str(e)) from None
    paths = RunPaths.of(recipe)
    lock = RunLock(paths.root)
    if _is_first_process():
        try:
            lock.acquire()
        except RunLockedError as e:
            raise RunSetupError(str(e)) from None
    try:
        resume = resolve_resume(recipe, paths)
        check_fresh_run_dir(resume, paths)
        check_resumable(resume, recipe)
        check_same_model(resume, recipe)
        if recipe.demo is not None:
            from gazelit.training.demo import ensure_demo_data

            ensure_demo_data(recipe.demo)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # every node's first process (file systems may differ)
            write_recipe(recipe, paths)
        threads = torch.get_num_threads()
        if recipe.trainer.torch_threads:
            torch.set_num_threads(recipe.trainer.torch_threads)
        try:
            return _train(recipe, paths, resume, extra_callbacks, continue_command)
        finally:
            torch.set_num_threads(threads)
    finally:
        lock.release()


def _is_first_process() -> bool:
    """Global rank 0 (before the process group exists: torchrun/SLURM set RANK, Lightning's own launcher
    starts the other ranks with LOCAL_RANK > 0)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and int(
        os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    ) == 0


def _train(recipe: Recipe, paths: RunPaths, resume: Path | None, extra_callbacks, continue_command=None) -> FitResult:
    """Model, data, strategy, callbacks, Trainer; fit; export on rank 0."""
    L.seed_everything(recipe.seed, workers=True)  # identical initial weights on every rank (FSDP2 shards them)
    module = build_module(recipe, resume)
    model = module.model
    strategy, module.parallel_plan = build_strategy(recipe.trainer, model.block_classes())
    datamodule = build_datamodule(recipe, model)
    callbacks = build_callbacks(recipe, paths, model, continue_command) + list(extra_callbacks)
    trainer = build_trainer(recipe, paths, strategy, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)

    result = FitResult(paths, trainer.global_step, resume, is_global_zero=trainer.is_global_zero)
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    routing = next((c for c in callbacks if isinstance(c, RoutingImageLogger)), None)
    result.routing_picture = routing.last_path if routing is not None else None
    checkpoints = next(c for c in callbacks if isinstance(c, AtomicModelCheckpoint))
    result.last_checkpoint = Path(checkpoints.best_model_path) if checkpoints.best_model_path else None  # highest step
    if trainer.is_global_zero and recipe.checkpoint.export_final and result.last_checkpoint is not None:
        from gazelit.training.checkpoints import export_checkpoint

        result.exported_model = export_checkpoint(result.last_checkpoint, paths.model)
    trainer.strategy.barrier("gazelit.fit.export")
    return result
