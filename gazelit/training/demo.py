"""The demo data set a recipe's `demo:` section asks for, generated once into `demo.out`.

Generation writes into a temporary sibling folder and renames it into place when complete, so an
interrupted generation never leaves a half-written data set that a later run would mistake for a finished
one. Under an external launcher (torchrun, SLURM) every node's local rank 0 generates (nodes may not share
a file system) and the other local ranks wait for the folder to appear. Lightning's own launcher starts
the other ranks only once rank 0 reaches `trainer.fit`, after generation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPLETE_MARKER = "corpus.txt"  # generate_demo_data writes it last
SETTINGS_FILE = "demo_settings.json"  # the generation settings, to refuse data made with other ones
# bumped when the generator writes different records for the same settings (2: the `boxes` of look spans;
# 3: `other_boxes`; 4: `target_phrase`)
RECORDS_VERSION = 4


def demo_data_ready(out: str | Path) -> bool:
    return (Path(out) / COMPLETE_MARKER).is_file()


def _settings(config: Any) -> dict:
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return {k: v for k, v in fields.items() if k != "out"} | {"records_version": RECORDS_VERSION}


def check_settings(out: Path, config: Any) -> None:
    """Data in `out` must have been generated with the recipe's settings (not silently reused)."""
    stored = out / SETTINGS_FILE
    wanted = _settings(config)
    found = json.loads(stored.read_text()) if stored.is_file() else None
    if found != wanted:
        diff = sorted(k for k in wanted if found is None or found.get(k) != wanted[k])
        raise RuntimeError(
            f"{out} holds demo data generated with other settings ({', '.join(diff) or 'unknown'} differ); "
            "delete it, or point demo.out elsewhere"
        )


def ensure_demo_data(config: Any, wait_s: float = 1800.0) -> Path:
    """Generate the demo data described by `config` (gazelit.recipe.DemoDataConfig) unless present."""
    from gazelit.datamodules.demo_data import generate_demo_data

    out = Path(config.out)
    if demo_data_ready(out):
        check_settings(out, config)
        return out
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.monotonic() + wait_s
        while not demo_data_ready(out):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {wait_s:.0f} s for local rank 0 to generate the demo data in {out}")
            time.sleep(1.0)
        check_settings(out, config)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    log.info("generating the demo data set into %s", out)
    generate_demo_data(
        staging, train=config.train, val=config.val, test=config.test, video_fraction=config.video_fraction,
        image_size=config.image_size, grid=config.grid, max_objects=config.max_objects, seed=config.seed,
        shard_size=config.shard_size, train_questions=config.train_questions, tasks=config.tasks,
        min_objects=config.min_objects, colours=config.colours,
    )  # fmt: skip
    (staging / SETTINGS_FILE).write_text(json.dumps(_settings(config), indent=2))
    try:
        os.replace(staging, out)
    except OSError:  # another process finished first (or `out` exists but is incomplete)
        shutil.rmtree(staging, ignore_errors=True)
        if not demo_data_ready(out):
            raise RuntimeError(f"{out} exists but holds no complete demo data set; delete it and run again") from None
    log.info("demo data ready in %.1f s", time.perf_counter() - started)
    return out
