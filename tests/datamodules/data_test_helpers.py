"""Helpers shared by the data tests: building small shards and media by hand."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from gazelit.datamodules.demo_data import encode_gif, encode_mp4
from gazelit.datamodules.manifest import Manifest

GRID = (4, 4)  # visual tokens per unit in the tests
NUM_CONTEXT = 2
IMAGE_SIZE = 32


def raw_samples(shard_dir: Path) -> list[dict]:
    """Every sample of a shard directory, as webdataset yields them, in shard order."""
    samples = []
    for path in Manifest.load(shard_dir).shard_paths():
        with open(path, "rb") as stream:
            samples += list(group_by_keys(tar_file_expander(iter([{"url": str(path), "stream": stream}]))))
    return samples


def ids_of(batches) -> list[str]:
    return [m["id"] for b in batches for m in b["meta"]]


def png(colour=(200, 30, 30), size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def frames_rgb(count: int, size: int = 32) -> list[np.ndarray]:
    """Frames whose red channel encodes the frame index (index * 20), to check which frames were taken."""
    frames = []
    for index in range(count):
        frame = np.zeros((size, size, 3), np.uint8)
        frame[..., 0] = index * 20
        frames.append(frame)
    return frames


def conversation(question="<image>\nWhat colour?", answer="red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_shard(path: Path, samples: list[dict]) -> None:
    """Write samples {"key", "record" (or raw "json" bytes), members...} bypassing the converter's checks."""
    with TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            members = {k: v for k, v in sample.items() if k not in ("key", "record")}
            if "record" in sample:
                members["json"] = json.dumps(sample["record"]).encode()
            tar.write({"__key__": sample["key"], **members})


def write_manifest(directory: Path, counts: dict[str, int]) -> None:
    shards = [{"name": name, "samples": n} for name, n in counts.items()]
    (directory / "manifest.json").write_text(json.dumps({"version": 1, "shards": shards, "skipped": []}))


def build_raw_dataset(root: Path) -> tuple[Path, Path, list[dict]]:
    """Media of every kind plus records, one bad record per reason. Returns (jsonl, media_root, lines)."""
    media, outside = root / "media", root / "outside"
    for folder in (media / "img", media / "vid" / "frames", media / "bad", outside):
        folder.mkdir(parents=True, exist_ok=True)
    (media / "img" / "a.png").write_bytes(png((200, 0, 0)))
    Image.new("RGB", (20, 12), (0, 90, 200)).save(media / "img" / "b.jpg", format="JPEG")
    (media / "vid" / "clip.mp4").write_bytes(encode_mp4(frames_rgb(8), fps=4))
    for index, frame in enumerate(frames_rgb(5)):
        Image.fromarray(frame).save(media / "vid" / "frames" / f"{index:04d}.png")
    gif_frames = [Image.fromarray(f) for f in frames_rgb(6)]
    (media / "vid" / "anim.gif").write_bytes(encode_gif(gif_frames, seconds_per_frame=0.5))
    (media / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (media / "vid" / "cut.mp4").write_bytes((media / "vid" / "clip.mp4").read_bytes()[:300])
    (outside / "secret.png").write_bytes(png())
    os.symlink(outside / "secret.png", media / "link.png")
    os.symlink(media / "img" / "a.png", media / "inside_link.png")
    (media / "vid" / "linked_frames").mkdir()
    (media / "vid" / "linked_frames" / "0000.png").write_bytes(png())
    os.symlink(outside / "secret.png", media / "vid" / "linked_frames" / "0001.png")

    conv = conversation()
    lines: list = [
        {"id": "img-png", "image": "img/a.png", "conversations": conv},  # 1
        {"id": "img-jpg", "image": "img/b.jpg", "conversations": conv, "source": "unit"},  # 2
        {"id": "text", "image": "", "conversations": conversation("Hi?", "Hello.")},  # 3
        {"id": "mp4", "video": "vid/clip.mp4", "conversations": conv, "start": 0.0, "end": 2.0},  # 4
        {"id": "frames", "video": "vid/frames", "fps": 2, "conversations": conv},  # 5
        {"id": "gif", "video": "vid/anim.gif", "conversations": conv},  # 6
        "{not json",  # 7
        {"id": "missing", "image": "img/nope.png", "conversations": conv},  # 8
        {"id": "corrupt", "image": "bad/corrupt.png", "conversations": conv},  # 9
        {"id": "absolute", "image": str(outside / "secret.png"), "conversations": conv},  # 10
        {"id": "dotdot", "image": "../outside/secret.png", "conversations": conv},  # 11
        {"id": "symlink", "image": "link.png", "conversations": conv},  # 12
        {"id": "no-answer", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]},  # 13
        {"id": "both", "image": "img/a.png", "video": "vid/clip.mp4", "conversations": conv},  # 14
        {"id": "inside-link", "image": "inside_link.png", "conversations": conv},  # 15
        "",  # 16: blank lines are ignored
        {"id": "cut-mp4", "video": "vid/cut.mp4", "conversations": conv},  # 17
        {"id": "frame-links-outside", "video": "vid/linked_frames", "conversations": conv},  # 18
    ]
    jsonl = root / "data.jsonl"
    jsonl.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return jsonl, media, lines


def write_bad_sample_shards(directory: Path) -> tuple[list[str], dict[str, int]]:
    """Two shards mixing good samples with one sample per stream skip reason (written without the
    converter, which would refuse most of them). Returns (good ids, expected skip counts by reason)."""
    directory.mkdir(parents=True, exist_ok=True)
    conv = conversation()
    mp4 = encode_mp4(frames_rgb(8), fps=4)
    frame_members = {f"frame_{i:05d}.png": png((i * 40, 0, 0)) for i in range(2)}
    long_question = "What colour is it? " * 200
    good = [
        {"key": "g0", "record": {"id": "good-image", "image": "a.png", "conversations": conv}, "png": png()},
        {"key": "g1", "record": {"id": "good-text", "conversations": conversation("Hi?", "Hello.")}},
        {"key": "g2", "record": {"id": "good-frames", "video": "f", "conversations": conv,
                                 "media_info": {"kind": "frames", "members": sorted(frame_members), "fps": 1.0}},
         **frame_members},
        {"key": "g3", "record": {"id": "good-mp4", "video": "v.mp4", "conversations": conv,
                                 "media_info": {"kind": "video", "members": ["mp4"], "num_frames": 8, "fps": 4.0}},
         "mp4": mp4},
    ]  # fmt: skip
    bad = [
        {"key": "b0", "record": {"id": "corrupt", "image": "x.png", "conversations": conv},
         "png": b"\x89PNG\r\n\x1a\nnot an image"},
        {"key": "b1", "record": {"id": "truncated", "video": "v.mp4", "conversations": conv,
                                 "media_info": {"kind": "video", "members": ["mp4"], "num_frames": 8, "fps": 4.0}},
         "mp4": mp4[: len(mp4) // 2]},
        {"key": "b2", "record": {"id": "two-placeholders", "image": "a.png",
                                 "conversations": conversation("<image> and <image>?")}, "png": png()},
        {"key": "b3", "record": {"id": "empty", "conversations": []}},
        {"key": "b4", "record": {"id": "masked", "conversations": [{"from": "human", "value": "Hi"}]}},
        {"key": "b5", "record": {"id": "too-long", "image": "a.png", "conversations": [
            {"from": "human", "value": long_question}, {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "red"}]}, "png": png()},
    ]  # fmt: skip
    bad.append({"key": "b6", "json": b"{broken"})
    expected = {"decode_error": 1, "video_error": 1, "placeholder_mismatch": 1, "empty_conversation": 1,
                "all_masked": 1, "over_length": 1, "bad_record": 1}  # fmt: skip
    shards = {"bad-000.tar": good[:2] + bad[:3], "bad-001.tar": good[2:] + bad[3:]}
    for name, samples in shards.items():
        write_shard(directory / name, samples)
    write_manifest(directory, {name: len(samples) for name, samples in shards.items()})
    return [s["record"]["id"] for s in good], expected
