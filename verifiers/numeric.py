"""`NumericGrader`: numbers compared exactly as rationals, else within a tolerance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from ..errors import ConfigError
from .extraction import parse_number
from .grader_base import NO_ANSWER, BaseGrader, GoldAnswer, GradeResult, as_golds

__all__ = ["NumericGrader"]


class NumericGrader(BaseGrader):
    """Compares numbers: exactly as rationals, else (unless both are integers) within tolerance.

    Understands "1,000", "-3.5", "3/4", ``\\frac{3}{4}``, "$12", "1e-3". A percent sign on either side is
    read both ways ("50%" matches 50 and 0.5), since models and datasets disagree on which is meant.

    Args:
        rel_tol: relative tolerance of the float comparison.
        abs_tol: absolute tolerance of the float comparison.
        percent: read "p%" as either p or p/100 (True) or only as p (False).
    """

    name = "numeric"

    def __init__(self, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9, percent: bool = True) -> None:
        if rel_tol < 0 or abs_tol < 0:
            raise ConfigError("rel_tol and abs_tol must be >= 0")
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.percent = percent

    def values(self, text: str) -> tuple[Fraction, ...]:
        """The readings of ``text`` as a number (none if it is not a plain number)."""
        value = parse_number(text)
        if value is None:
            return ()
        if self.percent and text.rstrip().rstrip("$").rstrip().endswith("%"):
            return (value, value / 100)
        return (value,)

    def close_enough(self, a: Fraction, b: Fraction) -> bool:
        """Exact equality, or `math.isclose` within the tolerances when either value is not an integer.

        Two integers must be equal: a relative tolerance would otherwise accept 7,000,001 for 7,000,000.
        """
        if a == b:
            return True
        if a.denominator == 1 and b.denominator == 1:
            return False
        try:
            return math.isclose(float(a), float(b), rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        except OverflowError:  # beyond float range: only exact equality counts
            return False

    def match(self, prediction: str, golds: Sequence[str]) -> bool | None:
        """True/False when the prediction and every gold are numbers, None when something is not a number."""
        pred_values = self.values(prediction)
        if not pred_values:
            return None
        all_numeric = True
        for gold in golds:
            gold_values = self.values(gold)
            if not gold_values:
                all_numeric = False
                continue
            if any(self.close_enough(p, g) for p in pred_values for g in gold_values):
                return True
        return False if all_numeric else None

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        if prediction is None:
            return NO_ANSWER
        golds = as_golds(gold)
        if not self.values(prediction):
            return GradeResult(False, 0.0, "not a number")
        verdict = self.match(prediction, golds)
        return GradeResult(bool(verdict), 1.0 if verdict else 0.0, "numeric")

    def __repr__(self) -> str:
        return f"NumericGrader(rel_tol={self.rel_tol}, abs_tol={self.abs_tol}, percent={self.percent})"
