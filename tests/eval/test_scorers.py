"""Scorers: Cambrian prompts, per-sample scores and the grouped metrics (torchmetrics) on hand-made cases."""

import pytest

from gazelit.eval.data import BenchSample
from gazelit.eval.metrics import BenchmarkScores
from gazelit.eval.scorers import SCORERS, get_scorer


def _metrics(scorer, samples, predictions):
    metric = scorer.metric()
    scores = [scorer.score(s, p) for s, p in zip(samples, predictions)]
    metric.update(scores, [scorer.category(s) for s in samples], [scorer.group(s) for s in samples])
    return scorer.summarize(metric.compute())


def test_every_benchmark_of_the_issue_has_a_scorer():
    assert {"gqa", "mme", "mmbench", "scienceqa", "mmvp", "chartqa", "textvqa", "ocrbench", "mc",
            "video_mc"} <= set(SCORERS)
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_scorer("vqa9000")


def test_prompts_as_cambrian_builds_them():
    s = BenchSample("1", "What is it?", "B", options=["cat", "dog"], hint="A pet.")
    assert get_scorer("mmbench").prompt(s) == (
        "A pet.\nWhat is it? Options:\nA. cat\nB. dog\n"
        "Answer with the option's letter from the given choices directly.")
    assert get_scorer("scienceqa").prompt(s) == (
        "A pet. What is it?\nA. cat\nB. dog\n"
        "Please answer directly with only the letter of the correct option and nothing else.")
    assert get_scorer("gqa").prompt(s) == "What is it?\nAnswer the question using a single word or phrase."
    assert get_scorer("chartqa").prompt(s).endswith("\nAnswer the question using a single number or phrase.")
    assert get_scorer("ocrbench").prompt(s) == "What is it?\nGive the short answer directly."
    t = BenchSample("2", "What does it say?", ["stop"] * 10, extra={"ocr_tokens": ["STOP", "ahead"]})
    assert get_scorer("textvqa").prompt(t) == (
        "What does it say?\nReference OCR tokens: STOP, ahead\nAnswer the question using a single word or phrase.")


def test_mme_acc_plus_needs_both_questions_of_an_image():
    rows = [("existence", "img1", "yes"), ("existence", "img1", "no"), ("existence", "img2", "yes"),
            ("existence", "img2", "no"), ("code_reasoning", "c1", "yes"), ("code_reasoning", "c1", "no")]
    samples = [BenchSample(str(i), "q", a, category=c, extra={"question_id": q}) for i, (c, q, a) in enumerate(rows)]
    predictions = ["Yes", "No.", "yes", "yes", "no", "no"]  # img1 both right, img2 one wrong, c1 one wrong
    m = _metrics(get_scorer("mme"), samples, predictions)
    assert m["existence/acc"] == pytest.approx(75.0) and m["existence/acc+"] == pytest.approx(50.0)
    assert m["code_reasoning/acc"] == pytest.approx(50.0) and m["code_reasoning/acc+"] == pytest.approx(0.0)
    assert m["perception"] == pytest.approx(125.0) and m["cognition"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(175.0)


def test_mmvp_pairs_are_consecutive_rows():
    samples = [BenchSample(str(i), "q", "(a)", options=["Open", "Closed"], index=i) for i in range(4)]
    m = _metrics(get_scorer("mmvp"), samples, ["(a)", "open", "a", "Closed"])
    assert m == {"pair_accuracy": pytest.approx(50.0), "accuracy": pytest.approx(75.0)}


def test_mmbench_circular_accuracy_over_rotated_copies():
    samples = [BenchSample(str(i), "Which?", letter, options=["x", "y", "z"], image=b"img", extra={"source": "s"})
               for i, letter in enumerate("ABC")]
    samples.append(BenchSample("3", "Other?", "A", options=["x", "y"], image=b"img2"))
    m = _metrics(get_scorer("mmbench"), samples, ["A", "B", "A", "A"])
    assert m["accuracy"] == pytest.approx(75.0) and m["circular_accuracy"] == pytest.approx(50.0)


def test_scienceqa_reports_image_questions_apart():
    samples = [BenchSample("0", "q", 0, options=["a dog", "a cat"], image=b"x"),
               BenchSample("1", "q", 1, options=["a dog", "a cat"], image=b"y"),
               BenchSample("2", "q", 1, options=["a dog", "a cat"])]
    m = _metrics(get_scorer("scienceqa"), samples, ["A", "a dog", "B"])
    assert m["img_accuracy"] == pytest.approx(50.0) and m["accuracy"] == pytest.approx(200 / 3)


def test_ocrbench_counts_and_categories():
    rows = [("stop", "Scene Text"), ("42", "Scene Text"), ("x^2", "Handwritten Mathematical Expression Recognition")]
    samples = [BenchSample(str(i), "q", [a], category=c) for i, (a, c) in enumerate(rows)]
    m = _metrics(get_scorer("ocrbench"), samples, ["STOP sign", "41", "x ^ 2"])
    assert m["correct"] == 2 and m["accuracy"] == pytest.approx(200 / 3)
    assert m["Scene Text/accuracy"] == pytest.approx(50.0)


def test_chartqa_and_textvqa_average_per_sample_scores():
    chart = [BenchSample("0", "q", "100"), BenchSample("1", "q", ["Blue"])]
    assert _metrics(get_scorer("chartqa"), chart, ["104", "blue"]) == {"relaxed_accuracy": pytest.approx(100.0)}
    vqa = [BenchSample("0", "q", ["stop"] * 2 + ["go"] * 8)]
    assert _metrics(get_scorer("textvqa"), vqa, ["stop"]) == {"accuracy": pytest.approx(60.0)}


def test_benchmark_scores_metric_groups_and_resets():
    metric = BenchmarkScores()
    metric.update([1.0, 0.0], ["a", "b"], ["g1", "g1"])
    metric.update([1.0], ["a"], ["g2"])
    out = metric.compute()
    assert out["mean"] == pytest.approx(2 / 3) and out["count"] == 3
    assert out["per_category"] == {"a": (1.0, 2), "b": (0.0, 1)}
    assert out["group_accuracy"] == pytest.approx(0.5) and out["groups"] == 2
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["count"] == 0
