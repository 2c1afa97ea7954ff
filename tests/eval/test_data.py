"""Benchmark files: JSONL / parquet rows, option layouts, image references."""

import io
import json

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
