"""Generated demo data: a small localized VQA task, written as JSONL + media and converted to shards.

Images: a `grid` x `grid` board of `image_size` pixels with a few coloured shapes in random cells (each
colour at most once per image). Every question is about one object and needs looking at the right place:
  colour_at  "What colour is the shape in row 2, column 3?"  -> "red"
  shape_of   "What shape is the blue object?"                -> "circle"
  locate     "Where is the green triangle?"                  -> "row 1, column 4"
  shapes_of_two  "What shapes are the red and the blue objects?" -> "circle and square"
                 (an answer that names two objects in turn: "target_boxes" lists their boxes in answer order)
Videos: `video_frames` frames at 1 fps, one object per frame (each colour+shape once per video):
  video_when    "In which frame does the red square appear?" -> "frame 3"
  video_colour  "What colour is the shape in frame 2?"       -> "yellow"
Every record carries "task", "answer", "target_box" ([x0, y0, x1, y1] in 0..1, the queried object's
box; videos add "target_frame"), "target_phrase" (the question's words that name that object: "red",
"row 2, column 3"), "other_boxes" (images: the board's objects the first answer does not name), and
"boxes" (per answer, the looks at the objects it names, for `model.look`), so routing hit rate and
accuracy can be measured. The splits are
converted with the same converter as real data, so the demo exercises exactly the real code path.

    python -m gazelit.datamodules.demo_data --out DIR [--train 2000 --val 200 --test 200 --video-fraction 0.2]
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gazelit.datamodules.convert import convert

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
    # more colours for crowded boards (`colours` > 5): the first five keep earlier data sets reproducible
    "orange": (240, 130, 20),
    "cyan": (40, 200, 210),
    "black": (30, 30, 30),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (235, 235, 235)
IMAGE_TASKS = ("colour_at", "shape_of", "locate", "shapes_of_two")  # every kind the generator writes
DEFAULT_IMAGE_TASKS = ("colour_at", "shape_of", "locate")  # without `tasks`: one object per question
VIDEO_TASKS = ("video_when", "video_colour")
VIDEO_FORMATS = ("mp4", "gif", "frames")
SYSTEM_PROMPT = "You are a helpful assistant."
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DemoObject:
    shape: str
    colour: str
    row: int  # 0-based, row 0 at the top
    col: int


@dataclass
class DemoData:
    """Where a generated demo data set lives."""

    root: Path
    shards: dict[str, Path] = field(default_factory=dict)  # split -> shard directory (with manifest.json)
    jsonl: dict[str, Path] = field(default_factory=dict)  # split -> raw JSONL
    media_root: Path | None = None
    corpus: list[str] = field(default_factory=list)  # every prompt and answer, for build_tiny_tokenizer
    corpus_path: Path | None = None


# ---------------------------------------------------------------------------------------------- drawing
def object_box(obj: DemoObject, grid: int) -> list[float]:
    """Normalised [x0, y0, x1, y1] of the drawn shape (its cell shrunk by the drawing margin)."""
    margin = 0.15 / grid
    x0, y0, x1, y1 = obj.col / grid, obj.row / grid, (obj.col + 1) / grid, (obj.row + 1) / grid
    return [round(x0 + margin, 4), round(y0 + margin, 4), round(x1 - margin, 4), round(y1 - margin, 4)]


def draw_board(objects: list[DemoObject], image_size: int, grid: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = (v * image_size for v in object_box(obj, grid))
        colour = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif obj.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    return image


def cell_name(obj: DemoObject) -> str:
    return f"row {obj.row + 1}, column {obj.col + 1}"


# ---------------------------------------------------------------------------------------------- tasks
def image_sample(
    rng: np.random.Generator, grid: int, max_objects: int, questions: int = 1,
    tasks: tuple[str, ...] = DEFAULT_IMAGE_TASKS, min_objects: int = 2, colours: int = 5,
) -> tuple[list[DemoObject], list[dict]]:
    """Objects on one board (min_objects..max_objects of them, distinct colours among the first `colours`)
    and `questions` questions, each about one of them (distinct while they last)."""
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(grid * grid, size=count, replace=False)
    colours = rng.choice(list(COLOURS)[:colours], size=count, replace=False)
    objects = [
        DemoObject(SHAPES[int(rng.integers(len(SHAPES)))], str(colour), int(cell) // grid, int(cell) % grid)
        for cell, colour in zip(cells, colours)
    ]
    order = [int(i) for i in rng.permutation(count)]
    questions_ = []
    for i in range(questions):
        target, second = objects[order[i % count]], objects[order[(i + 1) % count]]
        questions_.append(image_question(rng, target, tasks, second))
    return objects, questions_


def image_question(
    rng: np.random.Generator, target: DemoObject, tasks: tuple[str, ...] = DEFAULT_IMAGE_TASKS,
    second: DemoObject | None = None,
) -> dict:  # fmt: skip
    """A question about `target` (and, for shapes_of_two, then about `second`, another object)."""
    task = tasks[int(rng.integers(len(tasks)))]
    where = cell_name(target)
    targets = [target]
    if task == "colour_at":
        question, answer, phrase = f"What colour is the shape in {where}?", target.colour, where
    elif task == "shape_of":
        question, answer, phrase = f"What shape is the {target.colour} object?", target.shape, target.colour
    elif task == "shapes_of_two":
        if second is None or second == target:
            raise ValueError("shapes_of_two needs a second object on the board")
        question = f"What shapes are the {target.colour} and the {second.colour} objects?"
        answer, targets, phrase = f"{target.shape} and {second.shape}", [target, second], target.colour
    else:
        phrase = f"{target.colour} {target.shape}"
        question, answer = f"Where is the {phrase}?", where
    return {"task": task, "question": question, "answer": answer, "target": target, "targets": targets,
            "phrase": phrase}  # fmt: skip


def video_sample(rng: np.random.Generator, grid: int, frames: int) -> tuple[list[DemoObject], dict]:
    """One object per frame (each colour+shape pair once) and a question about one frame's object."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = rng.choice(len(pairs), size=frames, replace=False)
    cells = rng.integers(grid * grid, size=frames)
    objects = [DemoObject(*pairs[int(p)], int(cell) // grid, int(cell) % grid) for p, cell in zip(chosen, cells)]
    target_frame = int(rng.integers(frames))
    target = objects[target_frame]
    task = VIDEO_TASKS[int(rng.integers(len(VIDEO_TASKS)))]
    if task == "video_when":
        phrase = f"{target.colour} {target.shape}"
        question = f"In which frame does the {phrase} appear?"
        answer = f"frame {target_frame + 1}"
    else:
        phrase = f"frame {target_frame + 1}"
        question, answer = f"What colour is the shape in {phrase}?", target.colour
    return objects, {"task": task, "question": question, "answer": answer, "target": target, "frame": target_frame,
                     "phrase": phrase}  # fmt: skip


# ---------------------------------------------------------------------------------------------- media
def encode_mp4(frames: list[np.ndarray], fps: int = 1) -> bytes:
    """H x W x 3 uint8 frames -> mp4 bytes (MPEG-4 part 2, yuv420p), deterministic. Needs PyAV (`av`)."""
    try:
        import av
    except ImportError as exc:
        raise RuntimeError("writing mp4 needs PyAV: `pip install av` (or use --video-format gif/frames)") from exc
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_gif(frames: list[Image.Image], seconds_per_frame: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format="GIF", save_all=True, append_images=frames[1:], duration=int(seconds_per_frame * 1000), loop=0
    )
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_video(frames: list[Image.Image], fmt: str, media_root: Path, stem: str) -> str:
    """Write frames as an mp4, a gif or a folder of PNG frames (1 fps); returns the relative path."""
    if fmt == "mp4":
        relative = f"{stem}.mp4"
        data = encode_mp4([np.asarray(f) for f in frames], fps=1)
    elif fmt == "gif":
        relative = f"{stem}.gif"
        data = encode_gif(frames)
    elif fmt == "frames":
        folder = media_root / stem
        folder.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(frames):
            (folder / f"{index:04d}.png").write_bytes(png_bytes(frame))
        return stem
    else:
        raise ValueError(f"unknown video format {fmt!r}; choose from {VIDEO_FORMATS}")
    path = media_root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return relative


# ---------------------------------------------------------------------------------------------- splits
def write_split(
    split: str,
    count: int,
    media_root: Path,
    jsonl: Path,
    seed: int,
    video_fraction: float = 0.2,
    image_size: int = 64,
    grid: int = 4,
    max_objects: int = 4,
    video_frames: int = 6,
    video_format: str = "mp4",
    questions: int = 1,
    tasks: tuple[str, ...] = DEFAULT_IMAGE_TASKS,
    min_objects: int = 2,
    colours: int = 5,
) -> list[str]:
    """Write `count` records of one split (JSONL + media); returns the split's prompts and answers.

    Image records hold `questions` question/answer turns (more supervision per image); "task", "answer" and
    "target_box" describe the first. video_format "mixed" cycles mp4, gif and frame folders over videos."""
    rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else len(split)])
    texts: list[str] = []
    with jsonl.open("w") as out:
        for index in range(count):
            is_video = rng.random() < video_fraction
            record: dict = {"id": f"{split}-{index:06d}", "source": "demo-video" if is_video else "demo-vqa"}
            if is_video:
                objects, qa = video_sample(rng, grid, video_frames)
                turns = [qa]
                frames = [draw_board([obj], image_size, grid) for obj in objects]
                fmt = VIDEO_FORMATS[index % 3] if video_format == "mixed" else video_format
                record["video"] = write_video(frames, fmt, media_root, f"videos/{split}/{index:06d}")
                record["target_frame"] = qa["frame"]
            else:
                objects, turns = image_sample(rng, grid, max_objects, questions, tasks, min_objects, colours)
                qa = turns[0]
                relative = f"images/{split}/{index:06d}.png"
                (media_root / relative).parent.mkdir(parents=True, exist_ok=True)
                (media_root / relative).write_bytes(png_bytes(draw_board(objects, image_size, grid)))
                record["image"] = relative
            record.update(
                task=qa["task"],
                answer=qa["answer"],
                target_box=object_box(qa["target"], grid),
                # the question's words that name that object: routing is also measured at their last token
                target_phrase=qa["phrase"],
                # every object the answer names, in answer order (one for all tasks but shapes_of_two)
                target_boxes=[object_box(t, grid) for t in qa.get("targets", [qa["target"]])],
                # the board's other objects: a head that merely finds objects hits these as often as the
                # named one, so routing that follows the question shows as a gap between the two
                other_boxes=[] if is_video else [
                    object_box(o, grid) for o in objects if o not in qa.get("targets", [qa["target"]])
                ],
                # look spans for models with model.look (GazeVLM): per answer, each named object's box and
                # what is there; videos have none (a look names the last unit before it, not a chosen frame)
                boxes=[None] * len(turns) if is_video else [
                    [{"box": object_box(t, grid), "text": f"{t.colour} {t.shape}"} for t in turn.get("targets", [turn["target"]])]
                    for turn in turns
                ],
                conversations=[
                    message
                    for i, turn in enumerate(turns)
                    for message in (
                        {"from": "human", "value": ("<image>\n" if i == 0 else "") + turn["question"]},
                        {"from": "gpt", "value": turn["answer"]},
                    )
                ],
            )
            out.write(json.dumps(record) + "\n")
            texts += [text for turn in turns for text in (turn["question"], turn["answer"])]
    return texts


def check_board(grid: int, min_objects: int, max_objects: int, colours: int, tasks=DEFAULT_IMAGE_TASKS) -> None:
    """Board settings the generator can honour (every colour at most once per board), or a ValueError
    naming the setting."""
    if not 1 <= colours <= len(COLOURS):
        raise ValueError(f"demo.colours must be in 1..{len(COLOURS)}, got {colours}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"demo.min_objects must be in 1..max_objects ({max_objects}), got {min_objects}")
    if max_objects > min(colours, grid * grid):
        raise ValueError(f"demo.max_objects {max_objects} exceeds the distinct colours ({colours}) or cells "
                         f"({grid * grid}) of a board")  # fmt: skip
    if "shapes_of_two" in tasks and min_objects < 2:
        raise ValueError("demo.min_objects must be >= 2 for shapes_of_two (it names two objects)")


def generate_demo_data(
    out: str | Path,
    train: int = 2000,
    val: int = 200,
    test: int = 200,
    video_fraction: float = 0.2,
    image_size: int = 64,
    grid: int = 4,
    max_objects: int = 4,
    video_frames: int = 6,
    video_format: str = "mp4",
    seed: int = 0,
    shard_size: int = 500,
    workers: int = 1,
    progress: bool = False,
    train_questions: int = 1,
    tasks: tuple[str, ...] | list[str] = DEFAULT_IMAGE_TASKS,
    min_objects: int = 2,
    colours: int = 5,
) -> DemoData:
    """Write raw splits under `out/raw`, shards under `out/shards/<split>` and `out/corpus.txt`.

    Training images carry `train_questions` question turns each; validation and test images one, so
    their metrics read one answer per image."""
    tasks = tuple(tasks)
    unknown = sorted(set(tasks) - set(IMAGE_TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown image task(s) {unknown}; choose from {IMAGE_TASKS}")
    check_board(grid, min_objects, max_objects, colours, tasks)
    if video_frames > len(COLOURS) * len(SHAPES):
        raise ValueError("too many video frames for the distinct colour/shape pairs the questions rely on")
    root = Path(out)
    media_root = root / "raw" / "media"
    media_root.mkdir(parents=True, exist_ok=True)
    data = DemoData(root=root, media_root=media_root, corpus=[SYSTEM_PROMPT])
    for split, count in zip(SPLITS, (train, val, test)):
        if count <= 0:
            continue
        jsonl = root / "raw" / f"{split}.jsonl"
        data.corpus += write_split(
            split, count, media_root, jsonl, seed, video_fraction, image_size, grid, max_objects, video_frames,
            video_format, train_questions if split == "train" else 1, tasks, min_objects, colours,
        )  # fmt: skip
        shards = root / "shards" / split
        convert(jsonl, media_root, shards, shard_size=shard_size, workers=workers, overwrite=True, progress=progress)
        data.jsonl[split], data.shards[split] = jsonl, shards
    data.corpus_path = root / "corpus.txt"
    data.corpus_path.write_text("\n".join(data.corpus) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gazelit.datamodules.demo_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--video-fraction", type=float, default=0.2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--colours", type=int, default=5, help=f"colours used, at most {len(COLOURS)}")
    parser.add_argument("--video-frames", type=int, default=6)
    parser.add_argument("--video-format", choices=[*VIDEO_FORMATS, "mixed"], default="mp4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-questions", type=int, default=1, help="question turns per training image")
    parser.add_argument("--tasks", default=",".join(DEFAULT_IMAGE_TASKS),
                        help=f"image question kinds, comma-separated, of {','.join(IMAGE_TASKS)}")
    args = parser.parse_args(argv)
    data = generate_demo_data(
        args.out, args.train, args.val, args.test, args.video_fraction, args.image_size, args.grid,
        args.max_objects, args.video_frames, args.video_format, args.seed, args.shard_size, args.workers,
        progress=True, train_questions=args.train_questions, tasks=args.tasks.split(","),
        min_objects=args.min_objects, colours=args.colours,
    )  # fmt: skip
    for split, path in data.shards.items():
        print(f"{split}: shards in {path}")
    print(f"corpus ({len(data.corpus)} lines): {data.corpus_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
