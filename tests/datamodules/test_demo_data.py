"""Generated demo data: deterministic, answers right, target boxes on the object the question is about."""

from __future__ import annotations

import json
import re

from PIL import Image

from gazelit.datamodules.demo_data import BACKGROUND, COLOURS, SHAPES, generate_demo_data
from gazelit.datamodules.manifest import Manifest
from gazelit.datamodules.media import decode_gif_frames, decode_image, decode_video_frames


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def colour_named(text: str) -> str:
    return next(c for c in COLOURS if re.search(rf"\b{c}\b", text))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(train=12, val=3, test=3, video_fraction=0.4, video_format="mixed", shard_size=5)
    a = generate_demo_data(tmp_path / "a", seed=3, **kwargs)
    b = generate_demo_data(tmp_path / "b", seed=3, **kwargs)
    c = generate_demo_data(tmp_path / "c", seed=4, **kwargs)
    for split in ("train", "val", "test"):
        assert a.jsonl[split].read_bytes() == b.jsonl[split].read_bytes()
        assert a.jsonl[split].read_bytes() != c.jsonl[split].read_bytes()
        names = [s.name for s in Manifest.load(a.shards[split]).shards]
        assert names == [s.name for s in Manifest.load(b.shards[split]).shards]
        for name in names:
            assert (a.shards[split] / name).read_bytes() == (b.shards[split] / name).read_bytes()
    assert a.corpus == b.corpus and a.corpus_path.read_text() == b.corpus_path.read_text()


def test_questions_answers_and_target_boxes_agree_with_the_pixels(demo):
    rows = records(demo.jsonl["train"])
    assert Manifest.load(demo.shards["train"]).num_samples == len(rows) == 240
    kinds = {"image": 0, "video": 0}
    for record in rows:
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        assert question.startswith("<image>\n") and answer == record["answer"]
        assert question.removeprefix("<image>\n") in demo.corpus and answer in demo.corpus
        x0, y0, x1, y1 = record["target_box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        if "image" in record:
            kinds["image"] += 1
            image = decode_image((demo.media_root / record["image"]).read_bytes())
            # the other objects' boxes hold the rest of the board's shapes, and every cell is one of them
            named = record["target_boxes"] + record["other_boxes"]
            assert len({tuple(b) for b in named}) == len(named)
            occupied = {
                (r, c) for r in range(4) for c in range(4)
                if image.getpixel((int((c + 0.5) * image.size[0] / 4), int((r + 0.5) * image.size[0] / 4))) != BACKGROUND
            }
            assert occupied == {(int(b[1] * 4), int(b[0] * 4)) for b in named}, record["id"]
        else:
            kinds["video"] += 1
            image = video_frame(demo.media_root / record["video"], record["target_frame"])
        size = image.size[0]
        centre = image.getpixel((int((x0 + x1) / 2 * size), int((y0 + y1) / 2 * size)))
        expected_colour = colour_named(answer if record["task"] in ("colour_at", "video_colour") else question)
        assert max(abs(a - b) for a, b in zip(centre, COLOURS[expected_colour])) < 40, record["id"]
        cell = (int(y0 * 4) + 1, int(x0 * 4) + 1)  # 4x4 grid: (row, column), 1-based
        # the question's words naming the target (routing is also measured at them)
        phrase = record["target_phrase"]
        assert phrase in question, record["id"]
        if record["task"] == "colour_at":
            assert phrase == f"row {cell[0]}, column {cell[1]}"
        elif record["task"] == "video_colour":
            assert phrase == f"frame {record['target_frame'] + 1}"
        else:  # shape_of, locate, video_when: the target's colour (checked against the pixels above) first
            assert phrase.split()[0] == expected_colour
        if record["task"] == "locate":
            assert answer == f"row {cell[0]}, column {cell[1]}"
        elif record["task"] == "colour_at":
            assert f"row {cell[0]}, column {cell[1]}" in question
        elif record["task"] == "shape_of":
            assert answer in SHAPES
        elif record["task"] == "video_when":
            assert answer == f"frame {record['target_frame'] + 1}"
        else:
            assert f"frame {record['target_frame'] + 1}" in question
    assert kinds["image"] > 150 and kinds["video"] > 30


def video_frame(path, index: int) -> Image.Image:
    if path.is_dir():
        return decode_image(sorted(path.iterdir())[index].read_bytes())
    if path.suffix == ".gif":
        return decode_gif_frames(path.read_bytes(), [index])[0]
    return decode_video_frames(path.read_bytes(), [index])[0]


def test_two_object_questions_name_both_objects_in_answer_order(tmp_path):
    data = generate_demo_data(tmp_path / "two", train=40, val=0, test=0, video_fraction=0.0, tasks=["shapes_of_two"],
                              shard_size=50)  # fmt: skip
    for record in records(data.jsonl["train"]):
        question = record["conversations"][0]["value"]
        first, second = re.match(r"<image>\nWhat shapes are the (\w+) and the (\w+) objects\?", question).groups()
        shapes = record["answer"].split(" and ")
        assert first != second and len(shapes) == 2 and set(shapes) <= set(SHAPES)
        assert record["target_box"] == record["target_boxes"][0] and len(record["target_boxes"]) == 2
        image = decode_image((data.media_root / record["image"]).read_bytes())
        for colour, (x0, y0, x1, y1) in zip((first, second), record["target_boxes"]):
            centre = image.getpixel((int((x0 + x1) / 2 * image.size[0]), int((y0 + y1) / 2 * image.size[1])))
            assert max(abs(a - b) for a, b in zip(centre, COLOURS[colour])) < 40, record["id"]


def test_crowded_boards_draw_every_object_in_its_own_colour(tmp_path):
    """min_objects / colours: 6-8 objects from 8 colours, each drawn where its box says, all named."""
    data = generate_demo_data(tmp_path / "d", train=40, val=0, test=0, video_fraction=0.0, shard_size=20,
                              tasks=["shape_of"], min_objects=6, max_objects=8, colours=8)  # fmt: skip
    counts, used = set(), set()
    for record in records(data.jsonl["train"]):
        boxes = record["target_boxes"] + record["other_boxes"]
        counts.add(len(boxes))
        image = decode_image((data.media_root / record["image"]).read_bytes())
        named = colour_named(record["conversations"][0]["value"])
        used.add(named)
        x0, y0, x1, y1 = record["target_box"]
        centre = image.getpixel((int((x0 + x1) / 2 * image.size[0]), int((y0 + y1) / 2 * image.size[1])))
        assert max(abs(a - b) for a, b in zip(centre, COLOURS[named])) < 40, record["id"]
        for x0, y0, x1, y1 in boxes:
            assert image.getpixel((int((x0 + x1) / 2 * 64), int((y0 + y1) / 2 * 64))) != BACKGROUND
    assert counts <= {6, 7, 8} and len(counts) > 1
    assert used - set(list(COLOURS)[:5])  # the added colours are asked about too
