"""Fixtures of the data tests: a small generated demo data set, a tiny tokenizer trained on its corpus."""

from __future__ import annotations

import pytest

from .data_test_helpers import GRID, IMAGE_SIZE, NUM_CONTEXT
from gazelit.schema import DataConfig, SourceConfig
from gazelit.datamodules.datamodule import GazeDataModule
from gazelit.datamodules.demo_data import DemoData, generate_demo_data
from gazelit.datamodules.transforms import ResizeNormalize
from gazelit.tokenizer import build_tiny_tokenizer



@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoData:
    """240 train samples in 8 shards of 30 (a quarter videos: mp4, gif and frame folders), 40 val."""
    root = tmp_path_factory.mktemp("demo")
    return generate_demo_data(
        root, train=240, val=40, test=0, video_fraction=0.25, video_format="mixed", shard_size=30, seed=7
    )


@pytest.fixture(scope="session")
def tokenizer(demo):
    return build_tiny_tokenizer(demo.corpus, vocab_size=400)


@pytest.fixture(scope="session")
def transform():
    return ResizeNormalize(IMAGE_SIZE)


@pytest.fixture()
def make_datamodule(tokenizer, transform):
    """GazeDataModule over shard directories (or SourceConfigs) with small test defaults."""

    def make(sources, rank=None, world_size=None, **overrides) -> GazeDataModule:
        sources = [s if isinstance(s, SourceConfig) else SourceConfig(str(s)) for s in sources]
        settings = dict(batch_size=4, num_workers=0, max_length=512, max_frames=4, shuffle_buffer=16,
                        shuffle_window_shards=2, skip_check_min_samples=20)
        settings.update(overrides)
        config = DataConfig(sources=sources, **settings)
        return GazeDataModule(config, tokenizer, transform, GRID, NUM_CONTEXT, rank=rank, world_size=world_size)

    return make
