"""End to end: a tiny model on generated benchmark files whose answers are known."""

import json

import pytest

from gazelit.cli import main
from gazelit.eval.data import load_benchmark
from gazelit.eval.runner import evaluate, format_table
from gazelit.eval.scorers import get_scorer

from ..builders import picture, tiny_vlm

QUESTIONS = ["Is there a red square?", "What colour is the circle?", "Is it blue?", "yes or no?",
             "Is there a circle?", "What is left of the square?"]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_mme_scores_known_answers_through_the_cli(tmp_path, capsys):
    model = tiny_vlm(top_k=2)
    model.save_pretrained(tmp_path / "model")
    for i in range(4):
        picture((60 * i, 40, 200 - 40 * i), shape="square" if i % 2 else "circle").save(tmp_path / f"{i}.png")
    # two images, two questions each (MME pairs share question_id)
    rows = [{"id": i, "image": f"{i // 2}.png", "question_id": f"{i // 2}.png", "question": QUESTIONS[i],
             "answer": "placeholder", "category": "color"} for i in range(4)]
    _write(tmp_path / "probe.jsonl", rows)
    first = evaluate(model, get_scorer("mme"), load_benchmark(tmp_path / "probe.jsonl"), batch_size=4,
                     max_new_tokens=4)
    predictions = [p["prediction"] for p in first.predictions]
    assert len(set(predictions)) == 4  # distinct answers: a mix-up of samples and predictions would show
    # the known answers: the model's greedy answers for image 0's pair and the first question of image 1
    for row, pred in zip(rows, predictions):
        row["answer"] = pred.strip().lower().rstrip(".")
    rows[3]["answer"] = "definitely-not-" + rows[3]["answer"]
    _write(tmp_path / "mme.jsonl", rows)

    main(["eval", str(tmp_path / "model"), "--bench", "mme", "--data", str(tmp_path / "mme.jsonl"),
          "--batch-size", "4", "--max-new-tokens", "4", "--name", "tiny-gaze", "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert [p["prediction"] for p in result["predictions"]] == predictions
    assert result["metrics"]["color/acc"] == pytest.approx(75.0)
    assert result["metrics"]["color/acc+"] == pytest.approx(50.0)
    assert result["metrics"]["perception"] == pytest.approx(125.0)
    assert result["kv_size"] == "8+2"  # k=2 regions of 2x2 tokens + 2 context tokens
    out = capsys.readouterr().out
    assert "tiny-gaze" in out and "8+2" in out and "perception 125.0" in out


def test_video_multiple_choice_and_the_dense_kv_label(tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(3):
        picture((80 * i, 0, 0)).save(frames / f"{i:02d}.png")
    rows = [{"question": "What colour appears?", "options": ["red", "blue"], "answer": "A", "video": "clip"},
            {"question": "Which shape?", "options": ["circle", "square"], "answer": 1, "video": "clip"}]
    _write(tmp_path / "video.jsonl", rows)
    samples = load_benchmark(tmp_path / "video.jsonl")
    gaze = evaluate(tiny_vlm(top_k=1), get_scorer("video_mc"), samples, max_new_tokens=2, model_name="gaze")
    assert gaze.kv_size == "4+6"  # one 2x2 region + 2 context tokens for each of 3 frames
    assert {p["score"] for p in gaze.predictions} <= {0.0, 1.0} and gaze.count == 2
    dense = evaluate(tiny_vlm(enabled=False), get_scorer("video_mc"), samples, max_new_tokens=2, model_name="dense")
    assert dense.kv_size == "48"  # every visual token of the 3 frames, no context tokens
    table = format_table([dense.to_dict(), gaze.to_dict()])
    assert table.splitlines()[1].split()[:3] == ["dense", "video_mc", "48"]
    assert table.splitlines()[2].split()[:3] == ["gaze", "video_mc", "4+6"]
    with pytest.raises(ValueError, match="no video"):
        evaluate(tiny_vlm(), get_scorer("video_mc"), load_benchmark(_image_bench(tmp_path)), max_new_tokens=1)


def _image_bench(tmp_path):
    picture().save(tmp_path / "p.png")
    _write(tmp_path / "img.jsonl", [{"question": "q", "options": ["a", "b"], "answer": "A", "image": "p.png"}])
    return tmp_path / "img.jsonl"
