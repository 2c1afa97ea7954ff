"""One scorer per benchmark: its prompt (as the Cambrian-1 evaluation builds it), its per-sample rule
(gazelit.eval.answers) and the reported metrics.

    gqa        exact match after normalisation                          accuracy
    mme        exact yes/no match; per category acc and acc+ (both      perception, cognition (sums of
               questions of an image right), score = 100 (acc + acc+)   category scores), total
    mmbench    option letter (answer forms only) or the option's text     accuracy, circular_accuracy
    scienceqa  option letter or the option's text                       img_accuracy (SQA-I), accuracy
    mmvp       option letter or text; pairs of images                   pair_accuracy, accuracy
    chartqa    relaxed accuracy: numbers within 5%                      relaxed_accuracy
    textvqa    VQA soft accuracy over the human answers                 accuracy
    ocrbench   answer contained in the prediction, by question type     accuracy, correct
    mc         generic image multiple choice (letter)                   accuracy, circular_accuracy
    video_mc   multiple choice over video frames (letter)               accuracy, circular_accuracy

Scores are percentages (MME: sums of per-category scores, as the benchmark reports them). Groups (MME
image pairs, MMVP pairs, MMBench circular sets) come from the row's `group`/`pair` when given, else from
the scorer's convention (documented on each class).
"""

from __future__ import annotations

from typing import Any, ClassVar

from gazelit.eval import answers as rules
from gazelit.eval.data import BenchSample

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _options_block(options: list[str]) -> str:
    return "".join(f"\n{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))


class Scorer:
    """Base class: `prompt(sample)`, `score(sample, prediction)` in [0, 1], the sample's category and
    group for the metric, and `summarize(stats)` -> the reported metrics (the first one is the headline)."""

    name: ClassVar[str]
    video: ClassVar[bool] = False
    max_new_tokens: ClassVar[int] = 32
    # every row must carry this medium ("image" / "video"); None: rows without one are legitimate
    requires: ClassVar[str | None] = "image"

    def check_samples(self, samples: list[BenchSample], source: str = "") -> None:
        """Refuse a file whose rows lack the medium the benchmark is about (a model would answer blind)."""
        if self.requires is None:
            return
        missing = [s.index for s in samples if getattr(s, self.requires) is None]
        if missing:
            rows = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{source or self.name}: {len(missing)} of {len(samples)} rows have no {self.requires} "
                f"(rows {rows}); {self.name} is a{'n' if self.requires == 'image' else ''} {self.requires} "
                f"benchmark and is not scored blind"
            )

    def prompt(self, sample: BenchSample) -> str:
        raise NotImplementedError

    def score(self, sample: BenchSample, prediction: str) -> float:
        raise NotImplementedError

    def category(self, sample: BenchSample) -> str:
        return sample.category

    def group(self, sample: BenchSample) -> str:
        return sample.group if sample.group is not None else f"sample:{sample.id}"

    def metric(self):
        """A fresh `gazelit.eval.metrics.BenchmarkScores` (torchmetrics) for this benchmark's samples."""
        from gazelit.eval.metrics import BenchmarkScores

        return BenchmarkScores()

    def summarize(self, stats: dict[str, Any]) -> dict[str, float]:
        return {"accuracy": 100 * stats["mean"]}


class GQAScorer(Scorer):
    name = "gqa"

    def prompt(self, sample):
        return f"{sample.question}\n{SHORT_ANSWER}"

    def score(self, sample, prediction):
        return float(rules.exact_match(prediction, str(sample.answer)))


class MMEScorer(Scorer):
    """Both questions about one image form a pair (group: `group`/`pair`, else `question_id`, which is the
    image file in the lmms-lab release, else the image itself)."""

    name = "mme"

    def prompt(self, sample):
        return f"{sample.question}\n{SHORT_ANSWER}"

    def score(self, sample, prediction):
        return float(rules.exact_match(prediction, str(sample.answer)))

    def group(self, sample):
        if sample.group is not None:
            return sample.group
        key = sample.extra.get("question_id") or sample.media_key() or sample.id
        return f"{sample.category}/{key}"

    def summarize(self, stats):
        out = {"perception": 0.0, "cognition": 0.0}
        for category, (acc, _count) in stats["per_category"].items():
            acc_plus = stats["per_category_group_accuracy"][category][0]
            score = 100 * (acc + acc_plus)
            out[f"{category}/acc"] = 100 * acc
            out[f"{category}/acc+"] = 100 * acc_plus
            out[f"{category}/score"] = score
            if category in MME_PERCEPTION:
                out["perception"] += score
            elif category in MME_COGNITION:
                out["cognition"] += score
        out["total"] = out["perception"] + out["cognition"]
        out["accuracy"] = 100 * stats["mean"]
        return out


class MultipleChoiceScorer(Scorer):
    """Letter answers: the letter of an answer form ("B", "(B)", "Option B", ...) or of the option whose
    text the answer is must be the right one. Circular sets
    (MMBench's rotated copies of a question) are the rows sharing `group`, else the same question about
    the same image from the same source."""

    name = "mc"
    instruction: ClassVar[str] = LETTER_ANSWER

    def prompt(self, sample):
        hint = f"{sample.hint}\n" if sample.hint else ""
        return f"{hint}{sample.question} Options:{_options_block(sample.options)}\n{self.instruction}"

    def score(self, sample, prediction):
        return float(rules.choice_match(prediction, rules.letter_of(sample.answer, sample.options), sample.options))

    def group(self, sample):
        if sample.group is not None:
            return sample.group
        return f"{sample.question}|{sample.media_key()}|{sample.extra.get('source', '')}"

    def summarize(self, stats):
        return {"accuracy": 100 * stats["mean"], "circular_accuracy": 100 * stats["group_accuracy"]}


class MMBenchScorer(MultipleChoiceScorer):
    name = "mmbench"


class VideoMultipleChoiceScorer(MultipleChoiceScorer):
    name = "video_mc"
    requires = "video"
    video = True


class ScienceQAScorer(Scorer):
    """Correct when the answer before its first '.' is the letter, or it is the option's text. The paper's
    SQA-I is `img_accuracy` (questions with an image)."""

    name = "scienceqa"
    requires = None  # ScienceQA holds text-only questions (SQA-I is the subset with images)
    instruction = "Please answer directly with only the letter of the correct option and nothing else."

    def prompt(self, sample):
        question = f"{sample.hint} {sample.question}" if sample.hint else sample.question
        return f"{question}{_options_block(sample.options)}\n{self.instruction}"

    def score(self, sample, prediction):
        letter = rules.letter_of(sample.answer, sample.options)
        text = sample.options[ord(letter) - ord("A")]
        return float(rules.scienceqa_match(prediction, letter, text))

    def category(self, sample):
        return "image" if sample.image is not None else "text"

    def summarize(self, stats):
        image = stats["per_category"].get("image")
        return {"img_accuracy": 100 * image[0] if image else float("nan"), "accuracy": 100 * stats["mean"]}


class MMVPScorer(Scorer):
    """Pairs are consecutive rows (MMVP's 150 image pairs, rows 2i and 2i+1) unless `group`/`pair` says."""

    name = "mmvp"

    def prompt(self, sample):
        return f"{sample.question} Options:{_options_block(sample.options)}\n{LETTER_ANSWER}"

    def score(self, sample, prediction):
        letter = rules.letter_of(sample.answer, sample.options)
        return float(rules.mmvp_match(prediction, letter, sample.options))

    def group(self, sample):
        return sample.group if sample.group is not None else f"pair:{sample.index // 2}"

    def summarize(self, stats):
        return {"pair_accuracy": 100 * stats["group_accuracy"], "accuracy": 100 * stats["mean"]}


class ChartQAScorer(Scorer):
    name = "chartqa"

    def prompt(self, sample):
        return f"{sample.question}\nAnswer the question using a single number or phrase."

    def score(self, sample, prediction):
        answer = sample.answer[0] if isinstance(sample.answer, list) else sample.answer
        return float(rules.relaxed_match(prediction, str(answer)))

    def category(self, sample):
        """ChartQA's two parts (lmms-lab's `type`: human_test / augmented_test), reported apart."""
        kind = sample.category.lower()
        return "human" if "human" in kind else "augmented" if "augment" in kind else kind

    def summarize(self, stats):
        out = {"relaxed_accuracy": 100 * stats["mean"]}
        for part in ("human", "augmented"):
            if part in stats["per_category"]:
                out[f"{part}/relaxed_accuracy"] = 100 * stats["per_category"][part][0]
        return out


class TextVQAScorer(Scorer):
    """The prompt lists the row's `ocr_tokens` when it has them, as Cambrian's TextVQA prompt does."""

    name = "textvqa"

    def prompt(self, sample):
        question = sample.question
        if "ocr_tokens" in sample.extra:
            question += "\nReference OCR tokens:" + ",".join(f" {t}" for t in sample.extra["ocr_tokens"] or [])
        return f"{question}\n{SHORT_ANSWER}"

    def score(self, sample, prediction):
        answers = sample.answer if isinstance(sample.answer, list) else [sample.answer]
        return rules.vqa_soft_accuracy(prediction, [str(a) for a in answers])


class OCRBenchScorer(Scorer):
    """Contains-match per OCRBench question type (the row's `question_type` / `category`)."""

    name = "ocrbench"

    def __init__(self, exact: bool = False):
        self.exact = exact

    def prompt(self, sample):
        return f"{sample.question}\nGive the short answer directly."

    def score(self, sample, prediction):
        answers = sample.answer if isinstance(sample.answer, list) else [sample.answer]
        return float(rules.ocrbench_match(prediction, [str(a) for a in answers], sample.category, self.exact))

    def summarize(self, stats):
        out = {"accuracy": 100 * stats["mean"], "correct": round(stats["mean"] * stats["count"])}
        out.update({f"{c}/accuracy": 100 * m for c, (m, _n) in stats["per_category"].items()})
        return out


# What each benchmark reads and where users get it (`gazelit eval --help`, README)
SOURCES = {
    "gqa": ("question, answer, image (or imageId + --images)", "lmms-lab/GQA: testdev_balanced_instructions "
            "parquet, joined to testdev_balanced_images by imageId"),
    "mme": ("question, answer (Yes/No), category, image", "lmms-lab/MME parquet"),
    "mmbench": ("question, A-D option columns, answer (letter), hint, category, image", "lmms-lab/MMBench (en) parquet"),
    "scienceqa": ("question, choices, answer (index), hint, image (optional)", "lmms-lab/ScienceQA (ScienceQA-IMG) parquet"),
    "mmvp": ("Question, Options '(a) x (b) y', Correct Answer, image (or <Index>.jpg)", "lmms-lab/MMVP parquet, or the "
             "authors' Questions.csv with the 'MMVP Images' folder as --media-root"),
    "chartqa": ("question, answer, type (human_test / augmented_test), image", "lmms-lab/ChartQA parquet"),
    "textvqa": ("question, answers (10 human answers), image", "lmms-lab/textvqa (validation) parquet"),
    "ocrbench": ("question, answer (list), question_type, image", "echo840/OCRBench parquet"),
    "mc": ("question, options (list or A-D columns), answer (letter, index or text), image", "any image "
           "multiple-choice file in this form"),
    "video_mc": ("question, options, answer, video (file, gif or frame folder)", "any video multiple-choice "
                 "file in this form"),
}  # fmt: skip

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (GQAScorer, MMEScorer, MMBenchScorer, ScienceQAScorer, MMVPScorer, ChartQAScorer, TextVQAScorer,
                OCRBenchScorer, MultipleChoiceScorer, VideoMultipleChoiceScorer)
}


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(SCORERS)}") from None
