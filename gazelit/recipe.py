"""Recipes: YAML files validated against typed dataclasses before anything is built.

    recipe = load_recipe("recipes/cambrian4b_finetune.yaml", ["train.optim.lr_llm=1e-5", "model.gaze.top_k=4"])

* A recipe may `extends:` one or more base recipes (paths relative to the file); later files and then the
  command-line `key=value` overrides win. `${...}` interpolation (omegaconf) works across all of them.
* Every key and value is checked against the `Recipe` schema: a typo or a wrong type raises RecipeError
  naming the key, the file it came from and the closest valid key, before any model is built.
* `resolved_yaml(recipe)` is the fully resolved recipe, written into every run directory.
* `${gazelit.accumulate:GLOBAL_BATCH,PER_DEVICE,DEVICES,NODES}` is the gradient accumulation that keeps
  a global batch size whatever the number of nodes (an error if it does not divide).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from gazelit.schema import (  # noqa: F401  (the schema's names are this module's public names too)
    CheckpointConfig,
    DataConfig,
    DemoDataConfig,
    KScheduleConfig,
    LoggingConfig,
    ModelConfig,
    Recipe,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    TrainerConfig,
)


def grad_accumulation(global_batch, per_device, devices, nodes) -> int:
    """Accumulation steps so that per_device x devices x nodes x steps == global_batch."""
    global_batch, per_step = int(global_batch), int(per_device) * int(devices) * int(nodes)
    if per_step <= 0 or global_batch % per_step:
        raise ValueError(f"global batch {global_batch} is not a multiple of {per_device} per device x {devices} "
                         f"devices x {nodes} nodes")  # fmt: skip
    return global_batch // per_step


if not OmegaConf.has_resolver("gazelit.accumulate"):
    OmegaConf.register_resolver("gazelit.accumulate", grad_accumulation)


class RecipeError(ValueError):
    """A recipe that does not match the schema, with the key, the file and the closest valid key."""


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), paths: bool = False) -> Recipe:
    """Read, merge (extends, overrides), validate and resolve a recipe; with `paths`, also check that the
    data, init_from and resume paths exist (`check_paths`)."""
    layers = [(str(p), cfg) for p, cfg in _read_with_bases(Path(path))]
    merges, edits = _split_overrides(overrides)
    if merges:
        layers.append(("command line", _dotlist(merges)))
    schema = OmegaConf.structured(Recipe)
    for source, cfg in layers:  # validate each layer alone first: errors then name their file
        try:
            OmegaConf.merge(schema, cfg)
        except OmegaConfBaseException as e:
            if not _is_interpolation_error(e):
                raise _recipe_error(e, source) from None
    try:
        merged = OmegaConf.merge(schema, *[cfg for _, cfg in layers])
        for kind, key, value in edits:
            _apply_edit(merged, schema, kind, key, value)
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _recipe_error(e, str(path)) from None
    except ValueError as e:  # a schema dataclass's own check (__post_init__) names its key
        raise RecipeError(f"{path}: {e}") from None
    validate(recipe)
    if paths:
        check_paths(recipe)
    return recipe


def validate(recipe: Recipe) -> Recipe:
    """Checks across sections that types alone cannot express."""
    try:
        recipe.model.validate()
        recipe.train.validate()
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if recipe.demo is not None:
        from gazelit.datamodules.demo_data import check_board

        d = recipe.demo
        try:
            check_board(d.grid, d.min_objects, d.max_objects, d.colours, tuple(d.tasks))
        except ValueError as e:
            raise RecipeError(str(e)) from None
    if recipe.trainer.max_steps <= 0:
        raise RecipeError("trainer.max_steps must be > 0 (the lr and k schedules are defined in steps)")
    if recipe.schedule.shape not in ("linear", "cosine", "step"):
        raise RecipeError(f"schedule.shape must be linear, cosine or step, got {recipe.schedule.shape!r}")
    if recipe.schedule.span_steps < 0 or recipe.schedule.start_step < 0:
        raise RecipeError("schedule.start_step and schedule.span_steps must be >= 0")
    names = ("auto", "single", "ddp", "fsdp2")  # FSDP1 was removed: untested, and FSDP2 shards the same way
    if recipe.trainer.strategy.name not in names:
        raise RecipeError(f"trainer.strategy.name must be one of {names}, got {recipe.trainer.strategy.name!r}")
    if recipe.checkpoint.keep_last < 1:
        raise RecipeError("checkpoint.keep_last must be >= 1")
    if recipe.train.stage == "grpo" and recipe.trainer.accumulate_grad_batches != 1:
        raise RecipeError("train.stage grpo steps its optimiser itself: trainer.accumulate_grad_batches must be 1 "
                          "(raise data.batch_size or train.grpo.group instead)")  # fmt: skip
    if recipe.train.stage == "grpo" and recipe.train.grpo.kl > 0:
        if not recipe.init_from:
            raise RecipeError("train.grpo.kl > 0 needs init_from: the frozen reference policy is the model it names")
        if recipe.trainer.strategy.name == "fsdp2":
            raise RecipeError("train.grpo.kl > 0 keeps a full reference copy per rank, not supported under fsdp2; "
                              "set train.grpo.kl: 0 or use ddp")  # fmt: skip
    _check_values(recipe)
    return recipe


def _check_values(recipe: Recipe) -> None:
    """Numbers that parse but cannot train: each a RecipeError naming its key."""
    o, d, t = recipe.train.optim, recipe.data, recipe.trainer
    rules = [
        ("train.optim.lr_projector", o.lr_projector, o.lr_projector > 0, "> 0"),
        ("train.optim.lr_llm", o.lr_llm, o.lr_llm > 0, "> 0"),
        ("train.optim.lr_vision", o.lr_vision, o.lr_vision > 0, "> 0"),
        ("train.optim.lr_context", o.lr_context, o.lr_context is None or o.lr_context > 0, "> 0"),
        ("train.optim.warmup_steps", o.warmup_steps, o.warmup_steps is None or o.warmup_steps >= 0, ">= 0"),
        ("data.batch_size", d.batch_size, d.batch_size >= 1, ">= 1"),
        ("data.val_batch_size", d.val_batch_size, d.val_batch_size is None or d.val_batch_size >= 1, ">= 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.max_length", d.max_length, d.max_length >= 1, ">= 1"),
        ("data.length_buckets", d.length_buckets, all(b >= 1 for b in d.length_buckets)
         and list(d.length_buckets) == sorted(set(d.length_buckets)), "ascending positive lengths"),
        ("data.max_skip_fraction", d.max_skip_fraction, 0 <= d.max_skip_fraction <= 1, "in [0, 1]"),
        ("data.skip_check_min_samples", d.skip_check_min_samples, d.skip_check_min_samples >= 1, ">= 1"),
        ("trainer.devices", t.devices, not isinstance(t.devices, int) or t.devices >= 1, ">= 1 (or 'auto')"),
        ("trainer.num_nodes", t.num_nodes, t.num_nodes >= 1, ">= 1"),
        ("trainer.accumulate_grad_batches", t.accumulate_grad_batches, t.accumulate_grad_batches >= 1, ">= 1"),
        ("trainer.log_every_n_steps", t.log_every_n_steps, t.log_every_n_steps >= 1, ">= 1"),
        ("trainer.val_check_interval", t.val_check_interval, t.val_check_interval is None or t.val_check_interval >= 1,
         ">= 1 (or null: every epoch)"),
        ("checkpoint.every_n_steps", recipe.checkpoint.every_n_steps, recipe.checkpoint.every_n_steps > 0, "> 0"),
        ("logging.routing_image_every_n_steps", recipe.logging.routing_image_every_n_steps,
         recipe.logging.routing_image_every_n_steps >= 0, ">= 0 (0: never)"),
    ]  # fmt: skip
    for key, value, ok, want in rules:
        if not ok:
            raise RecipeError(f"{key} must be {want}, got {value!r}")
    _warn_top_k_above_one_unit(recipe)


def _warn_top_k_above_one_unit(recipe: Recipe) -> None:
    """k above the regions of one unit is legal (a video or several images offer more candidates), but
    for single-image data it means dense attention: say so."""
    import logging

    from gazelit.schema import resolve_top_k
    from gazelit.shapes import derive_shapes

    k = resolve_top_k(recipe.model.gaze.top_k)
    if k is None or not recipe.model.gaze.enabled:
        return
    try:
        regions = derive_shapes(recipe).regions_per_unit
    except Exception:  # shapes of a pretrained backbone not known without its config: nothing to compare
        return
    if regions is not None and k > regions:
        logging.getLogger(__name__).warning(
            "model.gaze.top_k=%d is above the %d regions of one unit: a single image is attended densely "
            "(units with several frames or images offer more candidates)", k, regions,
        )


def check_paths(recipe: Recipe) -> None:
    """Data, init_from and resume paths exist (demo data under demo.out is generated at fit start).
    `fit` calls this before building anything; `gazelit validate` too, unless told `--offline` (a cluster
    recipe checked on a laptop)."""
    generated = Path(recipe.demo.out).resolve() if recipe.demo is not None else None
    for group in ("sources", "val_sources", "test_sources"):
        for i, source in enumerate(getattr(recipe.data, group)):
            path = Path(source.path)
            if generated is not None and (path.resolve() == generated or generated in path.resolve().parents):
                continue
            if not path.exists():
                raise RecipeError(f"data.{group}[{i}].path: {path} does not exist")
    for key in ("init_from", "resume"):
        value = getattr(recipe, key)
        if value and value != "auto" and not Path(value).exists():
            raise RecipeError(f"{key}: {value} does not exist")


def resolved_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def flat_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as flat `section.key` -> leaf pairs (lists and other values kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_dict(value, name))
        else:
            out[name] = value
    return out


def flat_hparams(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat `section.key` -> scalar pairs (TensorBoard hparams)."""

    def scalar(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return str(list(value))
        if value is None:
            return "None"
        return value if isinstance(value, (int, float, str, bool)) else str(value)

    return {k: scalar(v) for k, v in flat_dict(to_dict(recipe)).items()}


# ---------------------------------------------------------------------------------------- internals
def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: `extends` forms a cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml syntax
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    bases = cfg.pop("extends", None)
    layers: list[tuple[Path, DictConfig]] = []
    for base in [bases] if isinstance(bases, str) else list(bases or []):
        layers += _read_with_bases(path.parent / str(base), (*seen, path))
    layers.append((path, cfg))
    return layers


def _split_overrides(overrides) -> tuple[list[str], list[tuple[str, str, str | None]]]:
    """`key=value` merges (a mapping value merges into the mapping); `~key` deletes (the key returns to the
    schema's default: `~demo` removes the optional section); `key:=value` replaces a value outright (a
    mapping value replaces the whole mapping)."""
    merges, edits = [], []
    for item in overrides:
        if item.startswith("~"):
            edits.append(("delete", item[1:].split("=", 1)[0], None))
        elif item.partition("=")[0].endswith(":"):
            key, _, value = item.partition("=")
            edits.append(("replace", key[:-1], value))
        else:
            merges.append(item)
    return merges, edits


def _apply_edit(merged: DictConfig, schema: DictConfig, kind: str, key: str, value: str | None) -> None:
    if OmegaConf.select(merged, key, default=_MISSING) is _MISSING and kind == "delete":
        raise RecipeError(f"command line: key {key!r}: nothing to delete"
                          + (f"; closest valid key: {hint}" if (hint := _closest_key(key)) else ""))  # fmt: skip
    try:
        if kind == "delete":
            default = OmegaConf.select(schema, key, default=None)
            OmegaConf.update(merged, key, OmegaConf.to_container(default) if isinstance(default, DictConfig) else default,
                             merge=False)  # fmt: skip
        else:
            parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
            OmegaConf.update(merged, key, parsed, merge=False)
    except OmegaConfBaseException as e:
        raise _recipe_error(e, "command line") from None


_MISSING = object()


def _dotlist(overrides) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"overrides must be key=value, got {bad}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise RecipeError(f"command-line overrides: {e}") from None


def _is_interpolation_error(e: OmegaConfBaseException) -> bool:
    return "Interpolation" in type(e).__name__


def _recipe_error(e: OmegaConfBaseException, source: str) -> RecipeError:
    key = getattr(e, "full_key", None) or "?"
    message = str(e).splitlines()[0]
    hint = _closest_key(key) if isinstance(e, ConfigKeyError) and "Did you mean" not in message else None
    suffix = f"; closest valid key: {hint}" if hint else ""
    return RecipeError(f"{source}: key {key!r}: {message}{suffix}")


def _closest_key(full_key: str) -> str | None:
    """The valid key nearest to a mistyped one, searching the schema at the mistyped key's parent."""
    parts = full_key.split(".")
    node: Any = Recipe
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        node = type(default) if dataclasses.is_dataclass(default) else None
        if node is None:
            return None
    if not dataclasses.is_dataclass(node):
        return None
    names = [f.name for f in dataclasses.fields(node)]
    match = difflib.get_close_matches(parts[-1], names, n=1)
    return ".".join([*parts[:-1], match[0]]) if match else None
