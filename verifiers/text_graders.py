"""Graders of short text answers: `QAGrader` (SQuAD exact match and token F1) and `YesNoGrader`."""

from __future__ import annotations

import collections
import functools
import re
import unicodedata
from typing import Literal

from ..errors import ConfigError
from .grader_base import NO_ANSWER, BaseGrader, GoldAnswer, GradeResult, as_golds

__all__ = ["QAGrader", "YesNoGrader", "normalize_qa_answer", "qa_exact_match", "qa_f1"]


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


@functools.lru_cache(maxsize=65536)
def normalize_qa_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (any Unicode punctuation), articles and extra spaces."""
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES_RE.sub(" ", no_punct).split())


def qa_exact_match(prediction: str, gold: str) -> bool:
    """Normalised exact match."""
    return normalize_qa_answer(prediction) == normalize_qa_answer(gold)


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between normalised answers (1.0 if both normalise to nothing)."""
    return _token_f1(normalize_qa_answer(prediction).split(), normalize_qa_answer(gold).split())


class QAGrader(BaseGrader):
    """Short-answer QA: SQuAD-normalised exact match and token F1, maximised over accepted answers/aliases.

    ``score`` is the best token F1; ``correct`` is exact match, or ``F1 >= f1_threshold`` when a threshold
    is set.

    Args:
        f1_threshold: accept on token F1 at or above this value instead of requiring exact match.
    """

    name = "qa"

    def __init__(self, *, f1_threshold: float | None = None) -> None:
        if f1_threshold is not None and not 0.0 < f1_threshold <= 1.0:
            raise ConfigError(f"f1_threshold must be in (0, 1], got {f1_threshold}")
        self.f1_threshold = f1_threshold

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        if prediction is None:
            return NO_ANSWER
        golds = as_golds(gold)
        pred = normalize_qa_answer(prediction)
        normalized = [normalize_qa_answer(g) for g in golds]
        if pred in normalized:
            return GradeResult(True, 1.0, "exact match")
        pred_tokens = pred.split()
        f1 = max(_token_f1(pred_tokens, g.split()) for g in normalized)
        correct = self.f1_threshold is not None and f1 >= self.f1_threshold
        return GradeResult(correct, f1, f"f1={f1:.3f}")

    def __repr__(self) -> str:
        return f"QAGrader(f1_threshold={self.f1_threshold})"


# ---------------------------------------------------------------------------------------------------------
# Yes / no


_YES = frozenset({"yes", "y", "true", "correct"})
_NO = frozenset({"no", "n", "false", "incorrect"})
_CHOICE_RE = re.compile(r"^(?:\(([a-z])\)|([a-z])(?:[.:)]|$))")


class YesNoGrader(BaseGrader):
    """Binary answers: "Yes", "no.", "True", "false", "(A)" / "B)" all map to yes or no.

    Letters map in order of ``letters``: by default A is yes and B is no (the StrategyQA choice order).
    Beyond the first word, a text that mentions exactly one of "yes"/"no" maps to it.

    Args:
        letters: the option letters meaning (yes, no).
    """

    name = "yesno"

    def __init__(self, *, letters: tuple[str, str] = ("a", "b")) -> None:
        if len(letters) != 2 or any(len(x) != 1 or not x.isalpha() for x in letters):
            raise ConfigError(f"letters must be two single letters, got {letters!r}")
        self.letters = (letters[0].lower(), letters[1].lower())

    def label(self, text: str) -> Literal["yes", "no"] | None:
        """ "yes", "no" or None when the text is neither."""
        s = text.strip().lower().replace("*", "").strip()
        choice = _CHOICE_RE.match(s)
        letter = (choice.group(1) or choice.group(2)) if choice is not None else None
        if letter in self.letters:
            return "yes" if letter == self.letters[0] else "no"
        words = re.findall(r"[a-z]+", s)
        if not words:
            return None
        if words[0] in _YES:
            return "yes"
        if words[0] in _NO:
            return "no"
        has_yes, has_no = "yes" in words, "no" in words
        if has_yes != has_no:
            return "yes" if has_yes else "no"
        return None

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        if prediction is None:
            return NO_ANSWER
        label = self.label(prediction)
        if label is None:
            return GradeResult(False, 0.0, "not yes/no")
        golds = {self.label(g) for g in as_golds(gold)} - {None}
        if not golds:
            raise ConfigError(f"gold {gold!r} is not a yes/no answer")
        correct = label in golds
        return GradeResult(correct, 1.0 if correct else 0.0, label)

    def equivalent(self, a: str, b: str) -> bool:
        label = self.label(a)
        return label is not None and label == self.label(b)

    def __repr__(self) -> str:
        return f"YesNoGrader(letters={self.letters!r})"
