"""Answer normalisation and matching rules of the benchmarks, as the Cambrian-1 evaluation applies them.

Pure functions of (prediction, ground truth) strings; the scorers in gazelit.eval.scorers call them per
sample. Sources of the rules (Cambrian-1 `eval/eval/<bench>/<bench>_test.py`, and the official VQA
answer processing for TextVQA):

  exact_match          GQA, MME: prediction lower-cased, trailing '.' removed, equal to the lower-cased answer
  extract_choice       MMVP / ScienceQA: lower-case, keep what follows "answer is" / "answer:",
                       strip '.:,' and brackets
  choice_letter        MMBench / mc / video_mc: a letter only from answer forms ("B", "(B)", "B.", "B)",
                       "Option B", "The answer is B"), else the option whose text the answer is (our rule:
                       Cambrian takes the first character, which reads "bird" as option B)
  relaxed_match        ChartQA: both numbers -> |pred - gt| <= 5% of |gt| (inclusive); else equal strings
  vqa_normalize        TextVQA: the EvalAI answer processor (punctuation, number words, articles, contractions)
  vqa_soft_accuracy    TextVQA: mean over the leave-one-out subsets of the human answers of
                       min(1, #matches / 3)
  ocrbench_match       OCRBench: ground truth contained in the prediction (or equal with `exact`);
                       handwritten maths compares with all whitespace removed, case kept
"""

from __future__ import annotations

import re
import string

ANSWER_KEYWORDS = ("answer is", "answer is:", "answer:")


def exact_match(prediction: str, answer: str) -> bool:
    """GQA / MME: `prediction.lower().rstrip('.') == answer.lower()` (the prediction already stripped)."""
    return prediction.strip().lower().rstrip(".") == answer.lower()


def _after_answer_keyword(text: str) -> str:
    text = text.lower().strip()
    for keyword in ANSWER_KEYWORDS:
        if keyword in text:
            text = text.split(keyword)[-1]
    return text


def extract_choice(text: str, first_char: bool = True) -> str:
    """The chosen option as the model wrote it, lower-cased: "(B) cat." -> "b". With `first_char` (MMBench)
    only its first character is kept; MMVP keeps the whole text so that the option text can match too."""
    text = _after_answer_keyword(text).strip().rstrip(".:,").lstrip("(").rstrip(")")
    return text[:1] if first_char and len(text) > 1 else text


def letter_of(answer: str | int, options: list[str] | None = None) -> str:
    """An upper-case option letter from a letter ("B", "(b)", "b."), a 0-based index, or an option text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return chr(ord("A") + answer)
    text = str(answer).strip()
    bare = text.strip("().: ").upper()
    if len(bare) == 1 and bare.isalpha():
        return bare
    if options:
        lowered = [o.strip().lower() for o in options]
        if text.lower() in lowered:
            return chr(ord("A") + lowered.index(text.lower()))
    raise ValueError(f"cannot read an option letter from answer {answer!r}")


_LETTER_FORMS = re.compile(r"^(?:option\s+)?\(?([a-z])\)?(?:[.):,]|$)")


def choice_letter(prediction: str, options: list[str] | None = None) -> str | None:
    """The option letter a prediction chooses, upper-case, or None.

    A letter is read only from answer forms: "B", "(B)", "B.", "B)", "B: ...", "Option B", "The answer is
    B". Anything else is matched against the option texts ("bird" is the option "bird", never option B
    because it starts with a b).
    """
    text = _after_answer_keyword(prediction).strip()
    match = _LETTER_FORMS.match(text)
    if match:
        return match.group(1).upper()
    if options:
        bare = text.rstrip(".:,").strip().lower()
        lowered = [o.strip().rstrip(".").lower() for o in options]
        if bare in lowered:
            return chr(ord("A") + lowered.index(bare))
    return None


def choice_match(prediction: str, letter: str, options: list[str] | None = None) -> bool:
    """MMBench / generic multiple choice: the prediction names the letter (see `choice_letter`)."""
    return choice_letter(prediction, options) == letter.upper()


def mmvp_match(prediction: str, letter: str, options: list[str]) -> bool:
    """MMVP: the extracted choice is the letter or the full text of the right option."""
    answer = extract_choice(prediction, first_char=False)
    return answer == letter.lower() or answer == options[ord(letter.upper()) - ord("A")].lower()


def scienceqa_match(prediction: str, letter: str, option_text: str) -> bool:
    """ScienceQA: the answer (text before the first '.') is the letter, or the whole answer equals the
    option text ignoring case and punctuation."""
    answer = _after_answer_keyword(prediction).strip().rstrip(".")

    def norm(s: str) -> str:
        return s.translate(str.maketrans("", "", string.punctuation)).lower().strip()

    return norm(answer) == norm(option_text) or answer.split(".")[0] == letter.lower()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy: numbers within `tolerance` of |answer| (inclusive; an answer of 0 needs 0),
    anything else equal after lower-casing and stripping."""
    pred, gt = prediction.strip().lower(), answer.strip().lower()
    p, g = _number(pred), _number(gt)
    if p is not None and g is not None:
        return abs(p - g) <= abs(g) * tolerance
    return pred == gt


# ---------------------------------------------------------------------------------------------- VQA
# The official VQA / EvalAI answer processing (as in MMF's EvalAIAnswerProcessor).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as in the official code: a '.' not followed by a digit
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def vqa_normalize(answer: str) -> str:
    """The official VQA answer processing: lower-case, punctuation, number words, articles, contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against N human answers (10 in TextVQA / VQAv2): the mean, over the
    N subsets leaving one answer out, of min(1, matches among the other N-1 / 3)."""
    if not answers:
        raise ValueError("VQA accuracy needs the human answers")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    matches = sum(g == pred for g in gts)
    # leaving out a matching answer removes one match, leaving out another one keeps them all
    scores = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return sum(scores) / len(scores)


def ocrbench_match(prediction: str, answers: list[str], category: str = "", exact: bool = False) -> bool:
    """OCRBench: some answer is contained in the prediction (`exact`: equal to it). Handwritten mathematical
    expressions compare with all spaces and newlines removed, case kept; others lower-cased."""
    if category == "Handwritten Mathematical Expression Recognition":
        def norm(s: str) -> str:
            return s.strip().replace("\n", " ").replace(" ", "")
    else:
        def norm(s: str) -> str:
            return s.lower().strip().replace("\n", " ")
    pred = norm(prediction)
    return any((norm(a) == pred) if exact else (norm(a) in pred) for a in answers)
