"""The shard converter: round trip of every media form, each bad-record reason, determinism, CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from .data_test_helpers import build_raw_dataset, raw_samples
from gazelit.datamodules.convert import add_convert_arguments, convert, run_convert
from gazelit.datamodules.manifest import Manifest
from gazelit.schema import SourceConfig


EXPECTED_SKIPS = {
    7: "bad_json", 8: "missing_media", 9: "unreadable_media", 10: "path_escape", 11: "path_escape",
    12: "path_escape", 13: "no_assistant_turn", 14: "invalid_record", 17: "unreadable_media", 18: "path_escape",
}  # fmt: skip
GOOD_LINES = [1, 2, 3, 4, 5, 6, 15]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    jsonl, media, lines = build_raw_dataset(root)
    manifest = convert(jsonl, media, root / "out", shard_size=3, progress=False)
    return root, jsonl, media, lines, manifest


def test_good_records_round_trip(converted):
    root, _, media, lines, manifest = converted
    assert [s.samples for s in manifest.shards] == [3, 3, 1]
    samples = raw_samples(root / "out")
    assert [s["__key__"] for s in samples] == [f"{n:09d}" for n in GOOD_LINES]
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    for line in GOOD_LINES:
        original = lines[line - 1]
        stored = json.loads(by_id[original["id"]]["json"])
        assert {k: v for k, v in stored.items() if k != "media_info"} == original
    assert by_id["img-png"]["png"] == (media / "img" / "a.png").read_bytes()
    assert by_id["img-jpg"]["jpg"] == (media / "img" / "b.jpg").read_bytes()
    assert by_id["inside-link"]["png"] == (media / "img" / "a.png").read_bytes()
    assert set(by_id["text"]) == {"__key__", "__url__", "json"}
    assert by_id["mp4"]["mp4"] == (media / "vid" / "clip.mp4").read_bytes()
    assert by_id["gif"]["gif"] == (media / "vid" / "anim.gif").read_bytes()
    frame_files = sorted((media / "vid" / "frames").iterdir())
    assert [by_id["frames"][f"frame_{i:05d}.png"] for i in range(5)] == [f.read_bytes() for f in frame_files]

    info = {i: json.loads(by_id[i]["json"])["media_info"] for i in ("img-jpg", "mp4", "frames", "gif")}
    assert info["img-jpg"] == {"kind": "image", "members": ["jpg"], "width": 20, "height": 12}
    assert info["mp4"] == {"kind": "video", "members": ["mp4"], "num_frames": 8, "fps": 4.0}
    assert info["frames"]["num_frames"] == 5 and info["frames"]["fps"] == 2.0
    assert info["gif"]["num_frames"] == 6 and info["gif"]["durations_s"] == [0.5] * 6


def test_every_bad_record_is_listed_with_its_reason(converted):
    *_, manifest = converted
    assert {r.line: r.reason for r in manifest.skipped} == EXPECTED_SKIPS
    assert manifest.skipped_by_reason == {
        "bad_json": 1, "invalid_record": 1, "missing_media": 1, "no_assistant_turn": 1, "path_escape": 4,
        "unreadable_media": 2,
    }  # fmt: skip
    ids = {r.line: r.id for r in manifest.skipped}
    assert ids[7] is None and ids[12] == "symlink"
    assert manifest.num_samples == len(GOOD_LINES)


def test_output_is_deterministic_whatever_the_worker_count(converted, tmp_path):
    root, jsonl, media, _, _ = converted
    convert(jsonl, media, tmp_path / "again", shard_size=3, workers=2, progress=False)
    first = sorted(p.name for p in (root / "out").iterdir())
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == first
    for name in first:
        assert (tmp_path / "again" / name).read_bytes() == (root / "out" / name).read_bytes(), name


def test_cli_entry_points_and_overwrite_guard(converted, tmp_path, capsys):
    _, jsonl, media, _, _ = converted
    parser = add_convert_arguments(argparse.ArgumentParser())
    argv = ["--jsonl", str(jsonl), "--media-root", str(media), "--out", str(tmp_path / "cli"), "--no-progress"]
    assert run_convert(parser.parse_args(argv + ["--shard-size", "4"])) == 0
    assert "wrote 7 samples in 2 shards" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        run_convert(parser.parse_args(argv))
    assert run_convert(parser.parse_args(argv + ["--overwrite"])) == 0
    assert len(Manifest.load(tmp_path / "cli").shards) == 1  # default shard size 1000, old shards removed


def test_manifest_shard_names_cannot_leave_their_directory(tmp_path):
    for name in ("../elsewhere.tar", "/abs/shard.tar"):
        (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": [{"name": name, "samples": 1}]}))
        with pytest.raises(ValueError, match="inside the manifest's directory"):
            Manifest.load(tmp_path)


def test_gazelit_index_makes_stock_webdataset_shards_streamable(tmp_path, make_datamodule, capsys):
    import json as _json

    from webdataset import ShardWriter

    from gazelit.cli import main
    from gazelit.datamodules.manifest import check_shards

    from .data_test_helpers import conversation, png

    out = tmp_path / "stock"
    out.mkdir()
    with ShardWriter(str(out / "part-%04d.tar"), maxcount=7, verbose=0) as sink:
        for i in range(17):
            record = {"id": f"s{i}", "image": "a.png", "conversations": conversation()}
            sink.write({"__key__": f"k{i:05d}", "json": _json.dumps(record).encode(), "png": png()})
    assert main(["index", str(out)]) == 0
    manifest = Manifest.load(out)
    assert [s.samples for s in manifest.shards] == [7, 7, 3]
    assert check_shards(manifest, hashes=True) == {}
    assert main(["index", str(out)]) == 2  # an existing manifest is kept unless --overwrite
    assert "exists" in capsys.readouterr().err
    stream = make_datamodule([out], batch_size=4).make_stream([SourceConfig(str(out))], 4, shuffle=False,
                                                            fixed_length=False)  # fmt: skip
    ids = sorted(m["id"] for b in stream for m in b["meta"])
    assert ids == sorted(f"s{i}" for i in range(17))


def test_several_blocks_in_flight_keep_line_order(tmp_path):
    """More lines than two pool blocks (2 workers x 64): the output equals the single-process output."""
    from .data_test_helpers import conversation, png

    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(png())
    lines = [json.dumps({"id": f"r{i}", "image": "a.png" if i % 7 else "missing.png", "conversations": conversation()})
             for i in range(300)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    one = convert(tmp_path / "d.jsonl", media, tmp_path / "one", shard_size=50, workers=1, progress=False)
    two = convert(tmp_path / "d.jsonl", media, tmp_path / "two", shard_size=50, workers=2, progress=False)
    assert one.num_samples == two.num_samples == 300 - 43
    assert [r.line for r in one.skipped] == [r.line for r in two.skipped]
    for shard in one.shards:
        assert (tmp_path / "one" / shard.name).read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def test_gazelit_index_refuses_empty_folders_and_damaged_shards_in_one_line(tmp_path, capsys):
    from gazelit.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty")]) == 2
    assert "no .tar shards" in capsys.readouterr().err
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "part-0000.tar").write_bytes(b"not a tar archive at all" * 40)
    assert main(["index", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-0000.tar" in err[0]
    assert not (tmp_path / "cut" / "manifest.json").exists()
