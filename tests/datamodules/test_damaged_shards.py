"""Damaged shards and exact skip accounting: the manifest's size and sha256 per shard, refusing or leaving
out damaged shards with positions (and resume) kept exact, lost samples counted per sample, the skip
guard from the first draw and over the whole run, and byte-identical manifests."""

from __future__ import annotations

import shutil

import pytest

from .data_test_helpers import build_raw_dataset, conversation, png, write_manifest, write_shard
from gazelit.datamodules.convert import convert
from gazelit.datamodules.manifest import DamagedShardsError, Manifest, check_shards
from gazelit.datamodules.skips import SkipFractionExceeded, SkipTally


@pytest.fixture()
def shards(demo, tmp_path):
    """A private copy of the demo training shards (8 shards of 30 samples)."""
    target = tmp_path / "train"
    shutil.copytree(demo.shards["train"], target)
    return target


def ids(batches) -> list[str]:
    return [m["id"] for b in batches for m in b["meta"]]


def shard_ids(directory, name) -> set[str]:
    import json
    import tarfile

    with tarfile.open(directory / name) as tar:
        return {json.loads(tar.extractfile(m).read())["id"] for m in tar.getmembers() if m.name.endswith(".json")}


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_the_manifest_records_size_and_sha256_of_every_shard(shards):
    manifest = Manifest.load(shards)
    for shard in manifest.shards:
        assert shard.bytes == (shards / shard.name).stat().st_size and len(shard.sha256) == 64
    assert check_shards(manifest, hashes=True) == {}


def test_a_damaged_shard_is_refused_naming_it_and_hash_mode_sees_same_size_damage(make_datamodule, shards):
    names = [s.name for s in Manifest.load(shards).shards]
    truncate(shards / names[2])
    (shards / names[5]).unlink()
    with pytest.raises(DamagedShardsError) as error:
        make_datamodule([shards]).train_dataloader()
    assert names[2] in str(error.value) and names[5] in str(error.value) and "missing" in str(error.value)
def test_hash_mode_sees_damage_that_keeps_the_size(shards):
    names = [s.name for s in Manifest.load(shards).shards]
    path = shards / names[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert names[0] not in check_shards(Manifest.load(shards), hashes=False)
    assert "sha256" in check_shards(Manifest.load(shards), hashes=True)[names[0]]


def test_damaged_shards_left_out_keep_resume_exact(make_datamodule, shards):
    """data.damaged_shards=skip: the damaged shard's samples are lost (counted), none is trained twice, and
    an interrupted + resumed stream consumes exactly what the uninterrupted one does."""
    name = Manifest.load(shards).shards[3].name
    gone = shard_ids(shards, name)
    truncate(shards / name)

    def loader():
        dm = make_datamodule([shards], batch_size=8, num_workers=2, seed=3, damaged_shards="skip")
        return dm, dm.train_dataloader()

    dm, full = loader()
    reference = ids(full)
    assert dm.lost_samples == {str(shards): 30}
    assert len(reference) == 208 and not gone & set(reference)  # 26 batches of 8 from the 210 left

    _, interrupted = loader()
    before = []
    for batch in interrupted:
        before.append(batch)
        if len(before) == 9:
            break
    state = interrupted.state_dict()
    _, resumed = loader()
    resumed.load_state_dict(state)
    assert ids(before) + ids(resumed) == reference


def test_a_shard_that_fails_at_read_time_counts_every_lost_sample(make_datamodule, shards):
    """With the start-up check off, a deleted shard costs its manifest count in shard_error skips (not 1),
    and the stream positions of the other shards do not move."""
    names = [s.name for s in Manifest.load(shards).shards]
    dm = make_datamodule([shards], batch_size=8, verify="none", max_skip_fraction=1.0)
    stream = dm.make_stream(dm.config.sources, 8, shuffle=False, fixed_length=False)
    before = list(stream)
    (shards / names[1]).unlink()
    truncate(shards / names[4], keep=0.4)
    after = list(stream)
    lost = sum(b["skipped"].get("shard_error", 0) for b in after)
    skipped = sum(sum(b["skipped"].values()) for b in after)  # a cut sample may also be a bad_record
    good = len(ids(after))
    assert good + skipped == 240 == len(ids(before)) == sum(b["draws"] for b in after)
    assert lost >= 30 + 1
    assert sum(b["skipped_shards"].get(str(shards / names[1]), 0) for b in after) == 30


def test_the_skip_guard_acts_from_the_first_draw():
    tally = SkipTally(max_fraction=0.05, min_draws=200)
    with pytest.raises(SkipFractionExceeded, match="11 of 11"):
        for _ in range(80):  # 80 corrupt samples first: stopped at the 11th (5% of 200)
            tally.record_skip("decode_error", "shard-000.tar")
    tolerant = SkipTally(max_fraction=0.05, min_draws=200)
    for _ in range(10):
        tolerant.record_skip("decode_error", "shard-000.tar")  # up to 10 early skips are tolerated
    tolerant.record_good(400)


def write_mostly_good_shards(directory, bad_per_shard: int, good_per_shard: int, shards: int = 2):
    directory.mkdir(parents=True)
    conv = conversation()
    counts = {}
    for s in range(shards):
        samples = [{"key": f"g{s}-{i}", "record": {"id": f"good-{s}-{i}", "image": "a.png", "conversations": conv},
                    "png": png()} for i in range(good_per_shard)]  # fmt: skip
        samples += [{"key": f"b{s}-{i}", "record": {"id": f"bad-{s}-{i}", "image": "a.png", "conversations": conv},
                     "png": b"\x89PNG\r\n\x1a\nnot an image"} for i in range(bad_per_shard)]  # fmt: skip
        write_shard(directory / f"s-{s:03d}.tar", samples)
        counts[f"s-{s:03d}.tar"] = len(samples)
    write_manifest(directory, counts)


def test_the_skip_guard_counts_over_the_whole_run_and_across_a_resume(make_datamodule, tmp_path):
    """9% bad samples: never above 5% of max(draws, 200) within one epoch of 100 draws, but over the run
    the rank's tally passes it, and the count survives a resume through the loader state."""
    write_mostly_good_shards(tmp_path / "d", bad_per_shard=9, good_per_shard=91, shards=1)

    def loader():
        return make_datamodule([tmp_path / "d"], batch_size=4, skip_check_min_samples=200, max_skip_fraction=0.05,
                               shuffle_window_shards=1).train_dataloader()  # fmt: skip

    first = loader()
    assert len(ids(first)) == 91  # epoch 0 passes (9 skips <= 5% of 200)
    state = first.state_dict()
    assert state["run_skips"]["skips"] == {"decode_error": 9}
    resumed = loader()
    resumed.load_state_dict(state)
    with pytest.raises(SkipFractionExceeded, match=r"whole run.*s-000.tar"):
        list(resumed)  # epoch 1: the run's tally passes 5% of its draws


def test_convert_writes_a_byte_identical_manifest_for_identical_input(tmp_path):
    jsonl, media, _ = build_raw_dataset(tmp_path)
    first = convert(jsonl, media, tmp_path / "a", shard_size=3, progress=False)
    second = convert(jsonl, media, tmp_path / "b", shard_size=3, progress=False)
    a, b = (tmp_path / "a" / "manifest.json").read_bytes(), (tmp_path / "b" / "manifest.json").read_bytes()
    assert a == b
    assert b" at 0x" not in a
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
