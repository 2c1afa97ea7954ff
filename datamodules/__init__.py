"""Streaming data for gazelit: Cambrian-style JSONL -> WebDataset shards -> GazeVLM batches.

Modules:
  config       DataConfig / SourceConfig: typed settings of the pipeline
  datamodule   GazeDataModule: the LightningDataModule (train/val/test loaders, resumable state)
  loader       ResumableLoader: known epoch length, rank-independent state_dict/load_state_dict
  stream       GazeStream: per-rank IterableDataset of collated batches (fixed-length or single-pass)
  shards       shard order per (rank, worker) slot, shuffling windows, cheap fast-forward, mixing
  samples      SampleProcessor: one shard sample -> tokens + pixels, or a counted skip
  chat         ChatEncoder: chat template, <image> expansion into visual/context units, labels
  collate      Collator: padded batch per gazelit.batch
  frame_sampling / media   which video frames to take; decoding images, videos (decord), gifs
  records / paths          reading LLaVA/Cambrian records; media paths confined to the media root
  convert      the shard converter behind `gazelit convert`
  manifest     manifest.json of a shard directory
  skips        skip reasons, per-batch counts, the max-skip-fraction guard
  transforms   ResizeNormalize, a picklable image transform for tests and the demo
  demo_data    generated localized-VQA demo data (images and videos), converted to shards

Names below are imported lazily so that `gazelit convert` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "gazelit.schema",
    "SourceConfig": "gazelit.schema",
    "GazeDataModule": "gazelit.datamodules.datamodule",
    "ResumableLoader": "gazelit.datamodules.loader",
    "GazeStream": "gazelit.datamodules.stream",
    "StreamOptions": "gazelit.datamodules.stream",
    "ShardSource": "gazelit.datamodules.shards",
    "SampleProcessor": "gazelit.datamodules.samples",
    "ChatEncoder": "gazelit.datamodules.chat",
    "Collator": "gazelit.datamodules.collate",
    "Manifest": "gazelit.datamodules.manifest",
    "convert": "gazelit.datamodules.convert",
    "add_convert_arguments": "gazelit.datamodules.convert",
    "run_convert": "gazelit.datamodules.convert",
    "generate_demo_data": "gazelit.datamodules.demo_data",
    "ResizeNormalize": "gazelit.datamodules.transforms",
    "SkipFractionExceeded": "gazelit.datamodules.skips",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gazelit.datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
