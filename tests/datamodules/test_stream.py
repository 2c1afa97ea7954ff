"""The stream: batch contract, decoding, split across ranks x workers, epochs, mixing, bad samples."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from .data_test_helpers import (
    GRID,
    IMAGE_SIZE,
    NUM_CONTEXT,
    build_raw_dataset,
    ids_of,
    raw_samples,
    write_bad_sample_shards,
)
from gazelit.datamodules.chat import IGNORE_INDEX
from gazelit.schema import SourceConfig
from gazelit.datamodules.convert import convert
from gazelit.datamodules.skips import SkipFractionExceeded
from gazelit.attention.layout import CONTEXT, PAD, VISUAL, GazeLayout
from gazelit.batch import check_batch


def single_pass(dm, sources, num_workers=0, shuffle=True, batch_size=4) -> list[dict]:
    stream = dm.make_stream([SourceConfig(str(s)) for s in sources], batch_size, shuffle, fixed_length=False)
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def all_ids(shard_dir) -> list[str]:
    return [json.loads(s["json"])["id"] for s in raw_samples(shard_dir)]


@pytest.fixture(scope="module")
def media_shards(tmp_path_factory):
    """Converted shards holding every media form (png, jpg, text-only, mp4 with a clip, frames, gif)."""
    root = tmp_path_factory.mktemp("media")
    jsonl, media, _ = build_raw_dataset(root)
    convert(jsonl, media, root / "shards", shard_size=3, progress=False)
    return root / "shards"


def test_batches_follow_the_contract_and_the_layout(make_datamodule, demo, media_shards):
    dm = make_datamodule([demo.shards["train"]])
    batches = single_pass(dm, [demo.shards["train"], media_shards], batch_size=8)
    kinds_seen = Counter()
    for batch in batches:
        check_batch(batch)
        layout = GazeLayout.from_token_kinds(
            batch["token_kind"], batch["unit_sample"], batch["unit_start"], batch["unit_grid"],
            batch["num_context"], unit_video=batch["unit_video"], unit_time=batch["unit_time"],
        )  # fmt: skip
        assert (layout.kind == VISUAL).sum() == len(batch["unit_start"]) * GRID[0] * GRID[1]
        kind = batch["token_kind"]
        assert (batch["labels"][(kind == VISUAL) | (kind == CONTEXT) | (kind == PAD)] == IGNORE_INDEX).all()
        assert (batch["labels"] != IGNORE_INDEX).sum(1).min() > 0  # every sample has something to learn
        assert batch["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["num_context"] == NUM_CONTEXT
        for i, meta in enumerate(batch["meta"]):
            units = batch["unit_sample"] == i
            videos = batch["unit_video"][units]
            if "video" in meta:
                kinds_seen["video"] += 1
                assert len(set(videos.tolist())) == 1 and videos[0] >= 0
                assert batch["unit_time"][units].tolist() == list(range(int(units.sum())))
            elif meta.get("image"):
                kinds_seen["image"] += 1
                assert videos.tolist() == [-1]
            else:
                kinds_seen["text"] += 1
                assert units.sum() == 0
        real_videos = batch["unit_video"][batch["unit_video"] >= 0]
        per_sample = {(int(s), int(v)) for s, v in zip(batch["unit_sample"], batch["unit_video"]) if v >= 0}
        assert len({v for _, v in per_sample}) == len(per_sample) == len(set(real_videos.tolist()))
    assert kinds_seen["video"] > 0 and kinds_seen["image"] > 0 and kinds_seen["text"] > 0
    assert len(ids_of(batches)) == 240 + 7


def test_text_only_batch_has_empty_pixels(make_datamodule, media_shards):
    dm = make_datamodule([media_shards])
    processor, collator = dm.processor, dm.collator()
    text = [processor(r) for r in raw_samples(media_shards) if json.loads(r["json"])["id"] == "text"]
    batch = collator(text)
    check_batch(batch)
    assert batch["pixel_values"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_video_frames_decoded_are_the_sampled_ones(make_datamodule, media_shards):
    """Frames encode their index in the red channel (index * 20): check what each video form decoded."""
    dm = make_datamodule([media_shards])
    samples = {m["id"]: (b, i) for b in single_pass(dm, [media_shards], shuffle=False) for i, m in enumerate(b["meta"])}
    expected = {
        "mp4": [0, 4],  # 8 frames at 4 fps, clip [0 s, 2 s): every 4th frame
        "frames": [0, 2, 4],  # 5 frames at the record's 2 fps
        "gif": [0, 2, 4],  # 6 frames of 0.5 s
    }
    for sample_id, frames in expected.items():
        batch, i = samples[sample_id]
        assert batch["meta"][i]["frame_indices"] == frames
        pixels = batch["pixel_values"][batch["unit_sample"] == i]
        red = (pixels[:, 0].mean((1, 2)) * 0.5 + 0.5) * 255  # undo ResizeNormalize
        assert torch.allclose(red, torch.tensor([f * 20.0 for f in frames]), atol=6), (sample_id, red)
    assert samples["mp4"][0]["meta"][samples["mp4"][1]]["frame_times"] == [0.0, 1.0]


def test_two_ranks_two_workers_cover_every_sample_once(make_datamodule, demo):
    seen = []
    for rank in range(2):
        dm = make_datamodule([demo.shards["train"]], rank=rank, world_size=2)
        seen += ids_of(single_pass(dm, [demo.shards["train"]], num_workers=2))
    assert len(seen) == len(set(seen)) == 240
    assert sorted(seen) == sorted(all_ids(demo.shards["train"]))


def test_fixed_epochs_have_known_length_and_are_deterministic(make_datamodule, demo):
    def epoch_ids(seed, rank=0, world_size=1):
        dm = make_datamodule([demo.shards["train"]], rank=rank, world_size=world_size, seed=seed, num_workers=2)
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)
        return ids_of(batches), loader

    first, loader = epoch_ids(seed=1)
    assert len(loader) == 60
    # 8 shards over 2 worker slots, 30 per shard: one epoch is one pass, every sample exactly once
    assert len(first) == len(set(first)) == 240
    assert epoch_ids(seed=1)[0] == first
    assert epoch_ids(seed=2)[0] != first
    second_epoch = ids_of(loader)  # iterating again starts the next epoch, in another order
    assert sorted(second_epoch) == sorted(first) and second_epoch != first
    rank_ids = [epoch_ids(seed=1, rank=r, world_size=2) for r in range(2)]
    assert [len(loader) for _, loader in rank_ids] == [30, 30]
    both = rank_ids[0][0] + rank_ids[1][0]
    assert len(both) == len(set(both)) == 240


def test_sources_are_mixed_by_weight(make_datamodule, demo, media_shards):
    sources = [SourceConfig(str(demo.shards["train"]), 3.0, "demo"), SourceConfig(str(demo.shards["val"]), 1.0, "val")]
    dm = make_datamodule(sources, samples_per_epoch=400, seed=3)
    metas = [m for b in dm.train_dataloader() for m in b["meta"]]
    share = Counter(m["stream_source"] for m in metas)
    assert len(metas) == 400
    assert 0.68 < share["demo"] / 400 < 0.82, share
    again = make_datamodule(sources, samples_per_epoch=400, seed=3)
    assert [m["id"] for b in again.train_dataloader() for m in b["meta"]] == [m["id"] for m in metas]


def test_bad_samples_are_skipped_counted_and_good_ones_kept(make_datamodule, tmp_path):
    good, expected = write_bad_sample_shards(tmp_path / "bad")
    dm = make_datamodule([tmp_path / "bad"], max_skip_fraction=1.0, max_length=256)
    batches = single_pass(dm, [tmp_path / "bad"], num_workers=2, batch_size=3)
    assert sorted(ids_of(batches)) == sorted(good)
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    assert dict(skipped) == expected


def test_all_bad_batch_repeats_the_last_good_sample(make_datamodule, tmp_path):
    good, expected = write_bad_sample_shards(tmp_path / "bad")
    dm = make_datamodule([tmp_path / "bad"], max_skip_fraction=1.0, max_length=256, batch_size=1, shuffle_buffer=1,
                         samples_per_epoch=11)  # fmt: skip
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 11
    real = [m["id"] for b in batches for m in b["meta"] if not m.get("filler")]
    fillers = [m["id"] for b in batches for m in b["meta"] if m.get("filler")]
    assert sorted(real) == sorted(good)  # every good sample exactly once
    assert len(fillers) == 7 and set(fillers) <= set(good)
    assert sum(sum(b["skipped"].values()) for b in batches) == sum(expected.values())


def test_skip_fraction_guard_names_the_shards(make_datamodule, tmp_path):
    write_bad_sample_shards(tmp_path / "bad")
    dm = make_datamodule([tmp_path / "bad"], max_skip_fraction=0.3, skip_check_min_samples=5, max_length=256,
                         samples_per_epoch=24, num_workers=2)  # fmt: skip
    with pytest.raises(SkipFractionExceeded) as info:
        list(dm.train_dataloader())
    message = str(info.value)
    assert "max_skip_fraction=0.3" in message and "bad-00" in message and ".tar" in message


