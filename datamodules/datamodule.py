"""GazeDataModule: the LightningDataModule streaming converted shards into GazeVLM batches.

Built from a DataConfig (plain values) plus what the model supplies at runtime: the LLM tokenizer, the
vision encoder's image transform (picklable, PIL image -> (3, H, W) tensor), the visual grid per unit after
the projector and the number of context tokens per unit.

The stream position is saved twice, on purpose: by Lightning's fit loop through the train loader's
state_dict, and in this datamodule's own state_dict. The datamodule's copy is restored before the model's
optimizers are configured, so resuming still works when `configure_optimizers` reads
`trainer.estimated_stepping_batches` (PL #20550: the fit loop then never restores the loader state).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from gazelit.datamodules.chat import ChatEncoder
from gazelit.datamodules.collate import Collator
from gazelit.schema import DataConfig, SourceConfig
from gazelit.datamodules.loader import ResumableLoader, already_collated, init_worker
from gazelit.datamodules.manifest import DamagedShardsError, Manifest, check_shards
from gazelit.datamodules.samples import ImageTransform, SampleProcessor
from gazelit.datamodules.shards import ShardSource
from gazelit.datamodules.stream import GazeStream, StreamOptions

log = logging.getLogger(__name__)

class GazeDataModule(L.LightningDataModule):
    def __init__(
        self,
        config: DataConfig,
        tokenizer: Any,
        image_transform: ImageTransform,
        visual_grid: tuple[int, int] = (12, 12),
        num_context: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        look_bins: int | None = None,
    ):
        """`rank`/`world_size` default to the trainer's (or 0/1 without one); pass them to simulate ranks.
        `look_bins` (a model with `look.enabled`): records' `boxes` become look spans before the answers."""
        super().__init__()
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        self.config = config
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.visual_grid = (int(visual_grid[0]), int(visual_grid[1]))
        self.num_context = int(num_context)
        self._rank = rank
        self.look_bins = look_bins
        self._world_size = world_size
        self._processor: SampleProcessor | None = None
        self._train_loader: ResumableLoader | None = None
        self._pending_stream_state: dict[str, Any] | None = None
        self._sources_cache: dict = {}
        self.lost_samples: dict[str, int] = {}  # shard directory -> samples of damaged shards left out

    # ------------------------------------------------------------------------------------ pieces
    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return self._rank or 0, self._world_size or 1
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    @property
    def processor(self) -> SampleProcessor:
        if self._processor is None:
            cfg = self.config
            encoder = ChatEncoder(
                self.tokenizer, self.visual_grid, self.num_context, cfg.max_length, cfg.system_prompt,
                look_bins=self.look_bins,
            )
            self._processor = SampleProcessor(encoder, self.image_transform, cfg.max_frames, cfg.fps, cfg.frames_fps)
        return self._processor

    def collator(self) -> Collator:
        return Collator(
            self.tokenizer.pad_token_id,
            self.visual_grid,
            self.num_context,
            self.processor.pixel_shape,
            self.config.pad_to_multiple_of,
            self.config.length_buckets,
        )

    def stream_options(self, batch_size: int, shuffle: bool) -> StreamOptions:
        cfg = self.config
        return StreamOptions(
            batch_size=batch_size,
            seed=cfg.seed,
            shuffle=shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            window_shards=cfg.shuffle_window_shards,
            max_skip_fraction=cfg.max_skip_fraction,
            skip_check_min_samples=cfg.skip_check_min_samples,
        )

    def shard_sources(self, configs: list[SourceConfig]) -> list[ShardSource]:
        """Sources from their manifests, every shard checked against its record (`data.verify`). Damaged
        shards are refused, naming every one, or with `data.damaged_shards: skip` left out: their samples
        are counted as lost (`self.lost_samples`) and the stream positions stay exact."""
        key = tuple((c.path, c.weight, c.name) for c in configs)
        if key in self._sources_cache:
            return self._sources_cache[key]
        cfg = self.config
        sources = []
        for c in configs:
            manifest = Manifest.load(c.path)
            damaged = {} if cfg.verify == "none" else check_shards(manifest, hashes=cfg.verify == "hash")
            if damaged:
                listing = "; ".join(f"{name}: {why}" for name, why in damaged.items())
                if cfg.damaged_shards == "refuse":
                    raise DamagedShardsError(
                        f"{manifest.directory}: {len(damaged)} shard(s) differ from the manifest ({listing}); "
                        "restore them, or set data.damaged_shards=skip to train without them"
                    )
                lost = sum(s.samples for s in manifest.shards if s.name in damaged)
                self.lost_samples[str(manifest.directory)] = lost
                log.warning("%s: leaving out %d damaged shard(s), %d samples lost: %s",
                            manifest.directory, len(damaged), lost, listing)  # fmt: skip
                manifest.shards = [s for s in manifest.shards if s.name not in damaged]
            sources.append(ShardSource.from_loaded_manifest(manifest, c.weight, c.name))
        self._sources_cache[key] = sources
        return sources

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per training epoch."""
        cfg = self.config
        if cfg.steps_per_epoch is not None:
            batches = cfg.steps_per_epoch
        else:
            samples = cfg.samples_per_epoch
            if samples is None:
                samples = sum(s.num_samples for s in self.shard_sources(cfg.sources))
            batches = samples // (cfg.batch_size * self.rank_and_world_size[1])
        if batches < 1:
            raise ValueError(
                f"an epoch would have no batch per rank (batch_size {cfg.batch_size}, world size "
                f"{self.rank_and_world_size[1]}); set samples_per_epoch or steps_per_epoch"
            )
        return batches

    def make_stream(
        self, configs: list[SourceConfig], batch_size: int, shuffle: bool, fixed_length: bool
    ) -> GazeStream:
        """A stream of this rank over `configs`: fixed-length epochs (training) or a single pass."""
        rank, world_size = self.rank_and_world_size
        return GazeStream(
            self.shard_sources(configs),
            self.processor,
            self.collator(),
            self.stream_options(batch_size, shuffle),
            rank=rank,
            world_size=world_size,
            batches_per_epoch=self.batches_per_epoch if fixed_length else None,
        )

    # ------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> ResumableLoader:
        if self._train_loader is None:
            if not self.config.sources:
                raise ValueError("DataConfig.sources is empty: no training data")
            stream = self.make_stream(self.config.sources, self.config.batch_size, shuffle=True, fixed_length=True)
            self._train_loader = ResumableLoader(
                stream, self.config.num_workers, self.config.prefetch_factor, self.config.pin_memory
            )
        if self._pending_stream_state is not None:
            self._train_loader.load_state_dict(self._pending_stream_state)
            self._pending_stream_state = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        return self._single_pass_loader(self.config.val_sources)

    def test_dataloader(self) -> DataLoader | list:
        return self._single_pass_loader(self.config.test_sources)

    def _single_pass_loader(self, sources: list[SourceConfig]) -> DataLoader | list:
        if not sources:
            return []
        batch_size = self.config.val_batch_size or self.config.batch_size
        stream = self.make_stream(sources, batch_size, shuffle=False, fixed_length=False)
        workers = self.config.num_workers
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=init_worker if workers > 0 else None,
            collate_fn=already_collated,
            pin_memory=self.config.pin_memory,
        )

    def teardown(self, stage: str) -> None:
        if self._train_loader is not None:
            self._train_loader.close()

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_stream": self._train_loader.state_dict()}
        if self._pending_stream_state is not None:
            return {"train_stream": dict(self._pending_stream_state)}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream_state = state_dict.get("train_stream")
        if not stream_state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(stream_state)
        else:
            self._pending_stream_state = dict(stream_state)
