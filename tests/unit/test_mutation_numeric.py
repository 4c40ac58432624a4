"""NumericGrader's scores (gaps found by mutation testing, `make mutation`): a wrong or non-numeric answer scores 0."""

from __future__ import annotations

from branchwise.verifiers.grading import NumericGrader


def test_scores_are_one_for_a_match_and_zero_otherwise() -> None:
    grader = NumericGrader()
    right, wrong, words = grader.grade_sync("42", "42.0"), grader.grade_sync("41", "42"), grader.grade_sync("x", "42")
    assert (right.correct, right.score, right.detail) == (True, 1.0, "numeric")
    assert (wrong.correct, wrong.score, wrong.detail) == (False, 0.0, "numeric")
    assert (words.correct, words.score, words.detail) == (False, 0.0, "not a number")
