"""Graders against the real gold answers of the shared benchmark copies (skipped when they are absent).

For every gold answer: it is accepted against itself and against a common rewriting ("1,000" for 1000,
"a/b" for ``\\frac{a}{b}``, "27" for 27.0, "(3, \\frac{\\pi}{2})" without ``\\left``/``\\right``, ...), and a
perturbed answer (the number + 1, or the expression + 1) is rejected. QA golds and aliases are accepted by
exact match, with case/article/punctuation noise, and an unrelated string is rejected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from branchwise.verifiers import (
    MathGrader,
    NumericGrader,
    QAGrader,
    YesNoGrader,
    close_default_pool,
    default_math_pool,
    extract_gsm8k,
    math_verify_equal,
    normalize_number,
    parse_number,
)

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"

pytestmark = pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"no shared benchmark data at {BENCHMARKS}")


def load(name: str) -> list[dict[str, Any]]:
    path = BENCHMARKS / name
    assert path.is_file(), f"{path} is missing from the shared benchmark folder"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def math_grader() -> Iterator[MathGrader]:
    grader = MathGrader(timeout=10.0)
    yield grader
    close_default_pool()


def number_rewrite(value: Fraction) -> str:
    """Another spelling of the same number: thousands separators, a trailing ".0", or a decimal/fraction."""
    if value.denominator == 1:
        return f"{int(value):,}" if abs(value) >= 1000 else f"{int(value)}.0"
    decimal = float(value)
    return repr(decimal) if Fraction(repr(decimal)) == value else f"{value.numerator}/{value.denominator}"


def number_perturbation(value: Fraction) -> str:
    shifted = value + 1
    return str(shifted.numerator) if shifted.denominator == 1 else f"{shifted.numerator}/{shifted.denominator}"


_LATEX_REWRITES = [
    (re.compile(r"\\(?:left|right)\b"), ""),  # \left( 3, \frac{\pi}{2} \right) -> ( 3, \frac{\pi}{2} )
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\text\{([^{}]*)\}"), r"\1"),  # \text{Evelyn} -> Evelyn
    (re.compile(r"\^\\circ|\^\{\\circ\}"), ""),  # 90^\circ -> 90
    (re.compile(r"\\frac\{(\d+)\}\{(\d+)\}"), r"(\1/\2)"),  # 3\frac{1}{2}... -> (1/2)
    (re.compile(r"\\sqrt\{(\d)\}"), r"\\sqrt\1"),  # \sqrt{2} -> \sqrt2
]


def latex_rewrites(gold: str) -> list[str]:
    out = []
    for pattern, replacement in _LATEX_REWRITES:
        rewritten = pattern.sub(replacement, gold)
        if rewritten != gold:
            out.append(rewritten)
    return out


def check_math_golds(grader: MathGrader, golds: list[str]) -> None:
    accepted: list[tuple[str | None, str]] = []
    rejected: list[tuple[str | None, str]] = []
    for gold in golds:
        value = parse_number(gold)
        accepted.append((gold, gold))
        if value is not None:
            accepted.append((number_rewrite(value), gold))
            rejected.append((number_perturbation(value), gold))
        else:
            accepted.extend((rewritten, gold) for rewritten in latex_rewrites(gold))
            rejected.append((f"{gold}+1", gold))
    results = grader.grade_many(accepted + rejected)
    wrong_rejects = [
        (p, g, r.detail) for (p, g), r in zip(accepted, results[: len(accepted)], strict=True) if not r.correct
    ]
    wrong_accepts = [
        (p, g, r.detail) for (p, g), r in zip(rejected, results[len(accepted) :], strict=True) if r.correct
    ]
    assert not wrong_rejects, f"rejected equivalent answers: {wrong_rejects[:10]}"
    assert not wrong_accepts, f"accepted perturbed answers: {wrong_accepts[:10]}"


def test_gsm8k_golds() -> None:
    rows = load("gsm8k_test.jsonl")
    assert len(rows) == 1319
    golds = [row["answer"].split("####")[-1].strip().replace(",", "") for row in rows]
    assert all(parse_number(g) is not None for g in golds)
    # the extractor reads the gold off the reference solution exactly
    assert [extract_gsm8k(row["answer"]) for row in rows] == [normalize_number(g) for g in golds]
    for grader in (NumericGrader(), MathGrader()):
        accepted: list[tuple[str | None, str]] = []
        rejected: list[tuple[str | None, str]] = []
        for gold in golds:
            value = parse_number(gold)
            assert value is not None
            accepted += [(gold, gold), (number_rewrite(value), gold), (f"{int(value):,}", gold)]
            rejected.append((number_perturbation(value), gold))
        assert all(r.correct for r in grader.grade_many(accepted)), grader
        assert not any(r.correct for r in grader.grade_many(rejected)), grader


def test_math500_golds(math_grader: MathGrader) -> None:
    golds = [row["answer"] for row in load("math500.jsonl")]
    assert len(golds) == 500
    # Each gold parses and verifies against itself in math-verify (the grader itself would short-cut
    # identical text), run through the shared pool with its hard timeout.
    pool = default_math_pool()
    futures = [pool.submit(math_verify_equal, gold, (gold,), timeout=10.0) for gold in golds]
    not_self_equal = [gold for gold, future in zip(golds, futures, strict=True) if future.result() is not True]
    assert not not_self_equal, not_self_equal[:10]
    check_math_golds(math_grader, golds)
    latex = [g for g in golds if parse_number(g) is None]
    assert sum(len(latex_rewrites(g)) for g in latex) >= 25  # the symbolic rewrites really were exercised


def test_aime24_golds(math_grader: MathGrader) -> None:
    golds = [str(row["answer"]) for row in load("aime24.jsonl")]
    assert len(golds) == 30
    check_math_golds(math_grader, golds)
    leading_zero = [g for g in golds if g.startswith("0")]
    assert leading_zero  # "025" style golds exist and must match "25"
    assert all(math_grader.grade_sync(g.lstrip("0"), g).correct for g in leading_zero)


def test_amc23_golds(math_grader: MathGrader) -> None:
    golds = [str(row["answer"]) for row in load("amc23.jsonl")]
    assert len(golds) == 40
    check_math_golds(math_grader, golds)
    assert all(math_grader.grade_sync(str(int(float(g))), g).correct for g in golds)  # 27.0 vs 27


UNRELATED = "zzyzx quarantine banana 12345"


def check_qa(golds_per_question: list[list[str]]) -> None:
    grader = QAGrader()
    for golds in golds_per_question:
        for gold in golds:
            result = grader.grade_sync(gold, golds)
            assert result.correct and result.score == 1.0, (gold, golds)
            shouted = gold.upper() if gold.upper().lower() == gold.lower() else gold  # case maps can be lossy
            noisy = f"The {shouted}!"
            assert grader.grade_sync(noisy, golds).correct, (noisy, golds)
        assert not grader.grade_sync(UNRELATED, golds).correct, golds


def test_nq_open_golds() -> None:
    rows = load("nq_open_dev.jsonl")
    assert len(rows) == 3610
    check_qa([list(row["answer"]) for row in rows])


def test_triviaqa_golds() -> None:
    rows = load("triviaqa_sub.jsonl")
    assert len(rows) == 3000
    check_qa([[row["answer"], *row["aliases"]] for row in rows])


def test_strategyqa_golds() -> None:
    rows = load("strategyqa.jsonl")
    grader = YesNoGrader()
    for row in rows:
        gold = row["choices"][row["gold"]]
        other = row["choices"][1 - row["gold"]]
        assert grader.grade_sync(gold, gold).correct
        assert grader.grade_sync(f"({'A' if row['gold'] == 0 else 'B'})", gold).correct
        assert not grader.grade_sync(other, gold).correct


# ---------------------------------------------------------------------------------------------------------
# Through the loaders: each benchmark's own prompt format, extraction rules and grader, end to end


def _loaded(name: str) -> Any:
    from branchwise.evals.datasets import load_benchmark

    filenames = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500.jsonl", "aime24": "aime24.jsonl",
                 "amc23": "amc23.jsonl", "nq_open": "nq_open_dev.jsonl", "triviaqa": "triviaqa_sub.jsonl",
                 "strategyqa": "strategyqa.jsonl"}  # fmt: skip
    return load_benchmark(name, BENCHMARKS / filenames[name])


@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime24", "amc23"])
def test_loader_math_golds_survive_extraction(name: str) -> None:
    """A model-style answer carrying each gold (boxed, or "The answer is ...") is extracted and graded right by the
    benchmark's own grader; a number one off is extracted and graded wrong (cheap paths: no math-verify work)."""
    bench = _loaded(name)
    grader, extractor = bench.make_grader(), bench.extractor()
    for problem in bench.problems:
        gold = problem.gold[0]
        text = (f"Adding it up gives the result.\nThe answer is {gold}." if bench.grader == "numeric"
                else f"So we get $\\boxed{{{gold}}}$.")  # fmt: skip
        extracted = extractor.extract(text)
        assert extracted is not None and grader.grade_sync(extracted, problem.gold).correct, (problem.id, text)
        value = parse_number(gold)
        if value is not None:
            wrong = extractor.extract(f"Thus the final answer is {number_perturbation(value)}.")
            assert not grader.grade_sync(wrong, problem.gold).correct, (problem.id, wrong)


@pytest.mark.parametrize("name", ["nq_open", "triviaqa"])
def test_loader_qa_aliases_survive_extraction(name: str) -> None:
    """Every accepted answer (NQ answers, TriviaQA answer and aliases), stated the way the QA prompt asks, is
    extracted and accepted; a near miss (an extra word, or a number one off) is rejected."""
    bench = _loaded(name)
    grader, extractor = bench.make_grader(), bench.extractor()
    near_misses = checked = skipped = 0
    for problem in bench.problems:
        for gold in problem.gold:
            if re.search(r"[.!?;](\s|$)|\n", gold):  # an extracted answer ends at its sentence's end
                skipped += 1
                continue
            checked += 1
            extracted = extractor.extract(f"Let me recall.\nThe answer is {gold}.")
            assert extracted is not None and grader.grade_sync(extracted, problem.gold).correct, (problem.id, gold)
        first = problem.gold[0]
        value = parse_number(first)
        wrong = number_perturbation(value) if value is not None else f"{first} zzyzx"
        if not any(normalize_number(g) == normalize_number(wrong) for g in problem.gold if parse_number(g)):
            assert not grader.grade_sync(wrong, problem.gold).correct, (problem.id, wrong)
            near_misses += 1
    assert near_misses > 0.9 * len(bench.problems) and skipped < 0.05 * checked


def test_loader_strategyqa_labels_survive_extraction() -> None:
    bench = _loaded("strategyqa")
    grader, extractor = bench.make_grader(), bench.extractor()
    assert {p.gold for p in bench.problems} == {("Yes",), ("No",)}
    for problem in bench.problems:
        gold = problem.gold[0].lower()
        other = "no" if gold == "yes" else "yes"
        for text in (f"Thinking it over, the answer is {gold}.", f"Hmm. {gold.capitalize()}, I believe."):
            assert grader.grade_sync(extractor.extract(text), problem.gold).correct, (problem.id, text)
        assert not grader.grade_sync(extractor.extract(f"The answer is {other}."), problem.gold).correct
