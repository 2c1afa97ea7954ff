"""Scoring rules on hand-made cases, including the boundaries each benchmark's rule draws."""

import pytest

from gazelit.eval import answers as rules


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Yes.", "yes", True), ("yes", "Yes", True), (" no", "no", True), ("yes it is", "yes", False),
    ("tables.", "table", False), ("Left", "left", True),
])
def test_exact_match_gqa_mme(prediction, answer, expected):
    assert rules.exact_match(prediction, answer) is expected


@pytest.mark.parametrize("text, choice", [
    ("B", "b"), ("(B)", "b"), ("B.", "b"), ("The answer is C.", "c"), ("answer: (d)", "d"),
    ("Bicycle", "b"),  # MMBench keeps only the first character (Cambrian's rule)
])
def test_extract_choice(text, choice):
    assert rules.extract_choice(text) == choice


def test_choice_rules_of_mmbench_mmvp_scienceqa():
    assert rules.choice_match("(A) red", "A") and not rules.choice_match("B", "A")
    options = ["Open", "Closed"]
    assert rules.mmvp_match("(a)", "A", options) and rules.mmvp_match("open", "A", options)
    assert not rules.mmvp_match("Closed", "A", options) and not rules.mmvp_match("b", "A", options)
    assert rules.scienceqa_match("A. a dog", "A", "a dog") and rules.scienceqa_match("A dog!", "A", "a dog")
    assert not rules.scienceqa_match("B", "A", "a dog")
    assert [rules.letter_of(x, ["red", "blue"]) for x in ("B", "(b)", 1, "blue", "a.")] == ["B", "B", "B", "B", "A"]
    with pytest.raises(ValueError):
        rules.letter_of("purple", ["red", "blue"])


@pytest.mark.parametrize("prediction, answer, expected", [
    ("105", "100", True), ("95", "100", True),  # exactly 5%: inclusive
    ("105.01", "100", False), ("94.99", "100", False),
    ("-52.5", "-50", True), ("-53", "-50", False),
    ("0", "0", True), ("0.0", "0", True), ("0.1", "0", False),  # 5% of 0 is 0
    ("Yes", "yes", True), ("12%", "12", False),  # non-numbers: strings (Cambrian does not parse '%')
    ("1e2", "100", True),
])
def test_chartqa_relaxed_accuracy(prediction, answer, expected):
    assert rules.relaxed_match(prediction, answer) is expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_textvqa_soft_accuracy_is_the_leave_one_out_mean(matches, expected):
    answers = ["stop"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert rules.vqa_soft_accuracy("stop", answers) == pytest.approx(expected)


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("the cat", "cat"), ("dont", "don't"), ("coca-cola", "coca cola"), ("10,000", "10000"),
    ("Stop!", "stop"), ("3.5", "3.5"), ("end.", "end"), ("a b - c", "b c"),
])
def test_vqa_answer_normalisation(raw, normal):
    assert rules.vqa_normalize(raw) == normal


def test_textvqa_matches_after_normalisation():
    assert rules.vqa_soft_accuracy("Two", ["2"] * 10) == 1.0
    assert rules.vqa_soft_accuracy("The Stop sign.", ["stop sign"] * 3 + ["x"] * 7) == pytest.approx(0.9)


def test_ocrbench_contains_exact_and_handwritten_maths():
    assert rules.ocrbench_match("The text says HELLO world", ["hello"])
    assert not rules.ocrbench_match("The text says HELLO world", ["hello"], exact=True)
    assert rules.ocrbench_match("Hello", ["hello"], exact=True)
    hmer = "Handwritten Mathematical Expression Recognition"
    assert rules.ocrbench_match("x ^ 2 + 1", ["x^2+1"], hmer)
    assert not rules.ocrbench_match("X^2+1", ["x^2+1"], hmer)  # case kept for maths
    assert rules.ocrbench_match("it is 42", ["41", "42"])


@pytest.mark.parametrize(
    "prediction,letter",
    [("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("b", "B"), ("Option B", "B"), ("The answer is B", "B"),
     ("The answer is (C).", "C"), ("C: a cat", "C"), ("bird", "A"), ("Bird.", "A"), ("a dog", None), ("cat", "C"),
     ("blue whale", None)],
)
def test_choice_letters_come_from_answer_forms_or_option_texts(prediction, letter):
    from gazelit.eval.answers import choice_letter, choice_match

    options = ["bird", "dog", "cat"]
    assert choice_letter(prediction, options) == letter
    assert choice_match("bird", "B", options) is False  # "bird" starts with b but is option A
