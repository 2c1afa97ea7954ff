"""Benchmark files: JSONL / parquet rows, option layouts, image references."""

import io
import json
from pathlib import Path

import pytest

from gazelit.eval.data import load_benchmark, parse_options

from ..builders import picture


def test_option_layouts():
    assert parse_options({"options": ["x", "y"]}) == ["x", "y"]
    assert parse_options({"options": {"B": "y", "A": "x"}}) == ["x", "y"]
    assert parse_options({"A": "x", "B": "y", "C": "nan", "D": None}) == ["x", "y"]  # MMBench columns
    assert parse_options({"choices": ["p", "q", "r"]}) == ["p", "q", "r"]  # ScienceQA
    assert parse_options({"options": "(a) Open (b) Closed"}) == ["Open", "Closed"]  # MMVP
    assert parse_options({}) == []


def test_jsonl_rows_with_images_relative_to_the_file(tmp_path):
    picture().save(tmp_path / "a.png")
    rows = [
        {"question": "q0", "answer": "yes", "image": "a.png", "category": "color", "question_id": "a.png"},
        {"id": "x", "question": "q1", "answers": ["stop"] * 10, "image": None, "ocr_tokens": ["STOP"]},
        {"question": "q2", "answer": "(b)", "options": "(a) Open (b) Closed", "pair": 0},
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_benchmark(tmp_path / "b.jsonl")
    assert [s.id for s in samples] == ["0", "x", "2"]
    assert samples[0].load_image().size == (64, 48) and samples[0].extra["question_id"] == "a.png"
    assert samples[1].image is None and samples[1].answer == ["stop"] * 10
    assert samples[1].extra["ocr_tokens"] == ["STOP"]
    assert samples[2].group == "0" and samples[2].options == ["Open", "Closed"]
    assert len(load_benchmark(tmp_path / "b.jsonl", limit=2)) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "missing.png"}))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_benchmark(tmp_path / "bad.jsonl")
    (tmp_path / "noanswer.jsonl").write_text(json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match="no 'answer'"):
        load_benchmark(tmp_path / "noanswer.jsonl")


def test_parquet_with_embedded_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet benchmark files need pyarrow")
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    picture((10, 200, 10)).save(buffer, format="PNG")
    table = pa.table({
        "question": ["Is it green?", "Is it red?"],
        "answer": ["Yes", "No"],
        "image": [{"bytes": buffer.getvalue(), "path": "g.png"}, {"bytes": buffer.getvalue(), "path": "g.png"}],
        "category": ["color", "color"],
    })
    pq.write_table(table, tmp_path / "mme.parquet")
    samples = load_benchmark(tmp_path / "mme.parquet")
    assert len(samples) == 2 and samples[0].answer == "Yes"
    assert samples[0].load_image().getpixel((32, 24)) == (10, 200, 10)
    assert samples[0].media_key() == samples[1].media_key()  # the same embedded image


def test_an_image_benchmark_without_images_is_refused(tmp_path, capsys):
    import json

    from gazelit.cli import main
    from gazelit.eval.data import load_benchmark
    from gazelit.eval.scorers import get_scorer

    rows = [{"question": "What is it?", "answer": "cat"}, {"question": "And this?", "answer": "dog"}]
    path = tmp_path / "gqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_benchmark(path)
    with pytest.raises(ValueError, match="2 of 2 rows have no image"):
        get_scorer("gqa").check_samples(samples, str(path))
    get_scorer("scienceqa").check_samples(samples)  # text-only questions are part of ScienceQA
    assert main(["eval", "no-model-needed", "--bench", "gqa", "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image" in err[0]


def _png_bytes():
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_mmvp_authors_csv_loads_as_published(tmp_path):
    from gazelit.eval.answers import letter_of

    (tmp_path / "Questions.csv").write_text(
        "Index,Question,Options,Correct Answer\n"
        '1,Are the butterfly\'s wings closer to being open or closed?,(a) Open (b) Closed,(a)\n'
        '2,Is the dog facing left or right?,(a) Left (b) Right,(b)\n'
    )
    for i in (1, 2):
        picture().save(tmp_path / f"{i}.jpg")
    samples = load_benchmark(tmp_path / "Questions.csv")
    assert [s.options for s in samples] == [["Open", "Closed"], ["Left", "Right"]]
    assert [letter_of(s.answer, s.options) for s in samples] == ["A", "B"]
    assert [Path(s.image).name for s in samples] == ["1.jpg", "2.jpg"] and samples[0].id == "1"


def test_gqa_instructions_join_the_images_config_by_image_id(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = _png_bytes()
    pq.write_table(pa.Table.from_pylist([{"id": "n1", "image": {"bytes": image, "path": None}},
                                         {"id": "n2", "image": {"bytes": image, "path": None}}]),
                   tmp_path / "images.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{"id": "q1", "imageId": "n2", "question": "What colour?", "answer": "red"}]),
                   tmp_path / "instructions.parquet")  # fmt: skip
    (sample,) = load_benchmark(tmp_path / "instructions.parquet", images=tmp_path / "images.parquet")
    assert sample.image == image and sample.answer == "red"
    with pytest.raises(ValueError, match="imageId 'n9'"):
        pq.write_table(pa.Table.from_pylist([{"imageId": "n9", "question": "?", "answer": "x"}]), tmp_path / "bad.parquet")
        load_benchmark(tmp_path / "bad.parquet", images=tmp_path / "images.parquet")


def test_a_split_sharded_over_several_files_loads_from_a_directory_or_a_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "test"
    shards.mkdir()
    for part in range(3):
        rows = [{"question": f"q{part}-{i}", "answer": "a", "image": {"bytes": _png_bytes(), "path": None}} for i in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), shards / f"test-{part:05d}-of-00003.parquet")
    by_dir = load_benchmark(shards)
    by_glob = load_benchmark(str(shards / "test-*.parquet"))
    assert [s.question for s in by_dir] == [s.question for s in by_glob] == [f"q{p}-{i}" for p in range(3) for i in range(2)]


def test_the_demo_test_split_loads_from_its_conversation_records(tmp_path):
    from gazelit.datamodules.demo_data import generate_demo_data

    demo = generate_demo_data(tmp_path, train=0, val=0, test=6, shard_size=10, seed=3, video_fraction=0.0)
    samples = load_benchmark(demo.jsonl["test"], media_root=demo.media_root)
    assert len(samples) == 6 and all(s.image is not None and s.question and s.answer for s in samples)
    assert "<image>" not in samples[0].question


def test_chartqa_reports_its_human_and_augmented_parts():
    from gazelit.eval.scorers import get_scorer

    scorer = get_scorer("chartqa")
    stats = {"mean": 0.5, "per_category": {"human": (0.25, 4), "augmented": (0.75, 4)}}
    assert scorer.summarize(stats) == {"relaxed_accuracy": 50.0, "human/relaxed_accuracy": 25.0,
                                       "augmented/relaxed_accuracy": 75.0}  # fmt: skip
    from gazelit.eval.data import BenchSample

    assert scorer.category(BenchSample("1", "q", "1", category="human_test")) == "human"
