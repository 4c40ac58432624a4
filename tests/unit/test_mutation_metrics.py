"""Metrics in detail (gaps found by mutation testing, `make mutation`): vote weights and near-ties, the subset
regimes and their seeds, curve arguments, summaries of empty and short runs, levels, comparisons and their
dictionaries, and the paired interval's inputs (z, the correlation and its continuity correction)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from branchwise.errors import ConfigError
from branchwise.evals.metrics import (
    _vote_weight,
    compare,
    mcnemar_p,
    paired_difference_interval,
    pass_at_k,
    sample_curves,
    subset_vote_accuracy,
    summarize,
    wilson_interval,
)
from branchwise.evals.store import ResultRow


def row(
    pid: str, correct: bool, *, level: str | None = None, cands: list[dict[str, Any]] | None = None, **kw: Any
) -> ResultRow:
    fields: dict[str, Any] = {
        "config_id": "c",
        "problem_id": pid,
        "level": level,
        "gold": ("1",),
        "answer": "1" if correct else "2",
        "correct": correct,
        "score": float(correct),
        "candidates": cands or [],
        "votes": {},
        "usage": {},
        "latency_s": 1.0,
    }
    fields.update(kw)
    return ResultRow(**fields)


def mixed(n: int) -> list[dict[str, Any]]:
    """n candidates over three clusters (0 right), with varied confidences."""
    return [{"cluster": i % 3, "correct": i % 3 == 0, "confidence": -0.1 * (i % 5)} for i in range(n)]


# -- votes ----------------------------------------------------------------------------------------------------------


def test_vote_weights() -> None:
    assert _vote_weight({"confidence": 3.0}, False) == 1.0
    assert _vote_weight({}, True) == 1.0 and _vote_weight({"confidence": math.nan}, True) == 1.0
    assert _vote_weight({"confidence": 2.5}, True) == 2.5 and _vote_weight({"confidence": 0.5}, True) == 0.5
    assert _vote_weight({"confidence": 0.0}, True) == 1.0  # a mean logprob of 0: probability 1
    assert _vote_weight({"confidence": -1.0}, True) == math.exp(-1.0)


def test_near_ties_are_ties_only_within_a_tight_tolerance() -> None:
    two = [{"cluster": 0, "correct": True}, {"cluster": 1, "correct": False}]
    apart = [{**two[0], "confidence": 1.0 + 1e-10}, {**two[1], "confidence": 1.0}]
    assert subset_vote_accuracy(apart, 2, weighted=True) == 1.0  # 1e-10 apart: no tie
    tiny = [{**two[0], "confidence": -30.0}, {**two[1], "confidence": -30.0 + math.log(2)}]
    assert subset_vote_accuracy(tiny, 2, weighted=True) == 0.5  # weights ~1e-13 apart in absolute terms: a tie


def test_exact_enumeration_up_to_400_subsets_and_seeded_sampling_beyond() -> None:
    pool = [{"cluster": int(i % 8 == 0), "correct": i % 8 == 0} for i in range(400)]  # 50 of 400 right
    assert subset_vote_accuracy(pool, 1) == 50 / 400  # C(400, 1) = 400 subsets: exact
    big = mixed(12)  # C(12, 6) = 924 subsets: sampled
    assert subset_vote_accuracy(big, 6) == subset_vote_accuracy(big, 6, seed="")
    assert subset_vote_accuracy(big, 6, seed="p1") != subset_vote_accuracy(big, 6, seed="p2")


def test_messages() -> None:
    for call, message in [
        (lambda: subset_vote_accuracy(mixed(3), 4), "k must be in 1..3, got 4"),
        (lambda: pass_at_k(3, 4, 1), "pass@k needs 0 <= c <= n and 1 <= k <= n, got n=3 c=4 k=1"),
        (lambda: mcnemar_p(-1, 2), "discordant counts must be >= 0"),
        (lambda: wilson_interval(1, 0), "need 0 <= successes <= n, got 1 of 0"),
        (lambda: paired_difference_interval(0, 0, 0, 0), "paired counts are all zero: no problem to compare"),
        (lambda: compare([row("a", True)], [row("b", True)]), "the two runs share no problem: nothing to compare"),
    ]:
        with pytest.raises(ConfigError) as caught:
            call()
        assert str(caught.value) == message


def test_wilson_bounds_at_zero_and_one_success() -> None:
    assert all(wilson_interval(0, n)[0] == 0.0 for n in (3, 6, 7, 12, 14))  # exactly 0, not rounding noise
    assert wilson_interval(1, 10)[0] > 0.0


# -- curves ---------------------------------------------------------------------------------------------------------


def test_curves_use_the_given_ks_skip_k_below_one_and_seed_by_problem() -> None:
    rows = [row("p1", True, cands=mixed(12)), row("p2", False, cands=mixed(12)[::-1])]
    curves = sample_curves(rows, ks=[6, 0, 2])
    assert sorted(curves["maj@k"]) == [2, 6] and curves["count@k"] == {2: 2.0, 6: 2.0}
    for name, weighted in (("maj@k", False), ("weighted@k", True)):
        expected = [subset_vote_accuracy(r.candidates, 6, weighted=weighted, seed=r.problem_id) for r in rows]
        assert curves[name][6] == pytest.approx(sum(expected) / 2, abs=0, rel=0)
    assert curves["weighted@k"][6] != curves["maj@k"][6]


# -- summaries ------------------------------------------------------------------------------------------------------


def test_an_empty_run_summarises_to_nans() -> None:
    metrics = summarize([])
    assert metrics.n == 0 and math.isnan(metrics.accuracy) and math.isnan(metrics.mean_completion_tokens)
    assert math.isnan(metrics.latency_mean_s) and math.isnan(metrics.samples_per_problem)
    assert math.isnan(metrics.tokens_per_s) and math.isnan(metrics.problems_per_min)


def test_summary_figures_levels_and_curve_options() -> None:
    rows = [
        row("a", True, level="10", usage={"completion_tokens": 30}, started_at=0.0, finished_at=0.25, cands=mixed(2)),
        row("b", False, level="2", usage={"completion_tokens": 10}, started_at=0.1, finished_at=0.5),
        row("c", True, level="hard", usage={"completion_tokens": 20}, started_at=0.2, finished_at=0.3),
        row("d", True, level="easy", usage={"completion_tokens": 40}, started_at=0.0, finished_at=0.0, run_id=2),
    ]
    metrics = summarize(rows, ks=[1])
    assert metrics.mean_completion_tokens == 25.0
    assert metrics.wall_time_s == 0.5  # run None spans 0..0.5, run 2 spans nothing
    assert metrics.tokens_per_s == 100 / 0.5 and metrics.problems_per_min == 60 * 4 / 0.5
    assert list(metrics.by_level) == ["2", "10", "easy", "hard"]  # numbers in order, then names
    two = metrics.by_level["2"]
    assert (two.level, two.n, two.correct, two.accuracy, two.mean_completion_tokens) == ("2", 1, 0, 0.0, 10.0)
    assert two.ci == wilson_interval(0, 1)
    assert sorted(metrics.curves["pass@k"]) == [1]
    assert summarize(rows, curves=False).curves == {}
    short = summarize([row("x", True, usage={"completion_tokens": 5}, started_at=0.0, finished_at=0.0)])
    assert math.isnan(short.tokens_per_s) and math.isnan(short.problems_per_min)  # no wall time to divide by
    out = metrics.to_dict()
    assert out["ci"] == list(metrics.ci) and out["by_level"]["2"]["ci"] == list(two.ci)
    assert out["curves"]["pass@k"] == {"1": metrics.curves["pass@k"][1]}
    assert set(out) >= {"n", "correct", "accuracy", "by_level", "curves", "wall_time_s"}


# -- comparisons ----------------------------------------------------------------------------------------------------


def test_a_comparison_counts_every_figure() -> None:
    usage_a, usage_b = {"completion_tokens": 10, "prompt_tokens": 3}, {"completion_tokens": 20, "prompt_tokens": 4}
    a = [row(p, c, usage=usage_a) for p, c in [("1", True), ("2", True), ("3", False), ("4", False), ("5", True)]]
    b = [row(p, c, usage=usage_b) for p, c in [("1", True), ("2", False), ("3", True), ("4", True), ("9", True)]]
    result = compare(a, b)
    assert (result.shared, result.a_only_right, result.b_only_right) == (4, 1, 2)
    assert (result.accuracy_a, result.accuracy_b, result.diff) == (0.5, 0.75, -0.25)
    assert result.ci == paired_difference_interval(1, 1, 2, 0)
    assert (result.tokens_a, result.tokens_b, result.total_tokens_a, result.total_tokens_b) == (40, 80, 52, 96)
    assert result.p_value == mcnemar_p(1, 2) and result.significant is False
    assert result.to_dict() == {**result.__dict__, "ci": list(result.ci)}


@pytest.mark.parametrize(
    ("table", "default", "z_one"),
    [
        ((5, 3, 1, 1), (-0.18696208287039134, 0.5210862318923275), (-0.0051105692261665114, 0.3842897507810936)),
        ((2, 3, 4, 1), (-0.5159100995993696, 0.36231488895171504), (-0.34314036480019183, 0.15833445840637844)),
        ((10, 1, 1, 10), (-0.14237668090249866, 0.14237668090249866), (-0.0769990503509018, 0.0769990503509018)),
        ((1, 0, 0, 1), (-0.5734194679697172, 0.5734194679697172), (-0.408248290463863, 0.408248290463863)),
        ((3, 2, 5, 0), (-0.657315151144281, 0.19698676021174177), (-0.5157433194171839, -0.0387390610806822)),
    ],
)
def test_paired_intervals_regression(
    table: tuple[int, int, int, int], default: tuple[float, float], z_one: tuple[float, float]
) -> None:
    assert paired_difference_interval(*table) == pytest.approx(default, abs=1e-12)
    assert paired_difference_interval(*table, z=1.0) == pytest.approx(z_one, abs=1e-12)


def test_the_paired_interval_takes_no_correlation_when_a_margin_is_empty() -> None:
    # A is right on all 10 problems, B on 5: A's outcomes do not vary, so their correlation is taken as 0
    # (Newcombe 1998) and the interval combines the two Wilson intervals' half-widths as if independent.
    lo_a, hi_a = wilson_interval(10, 10)
    lo_b, hi_b = wilson_interval(5, 10)
    lower, upper = paired_difference_interval(5, 5, 0, 0)
    assert lower == pytest.approx(0.5 - math.hypot(1.0 - lo_a, hi_b - 0.5))
    assert upper == pytest.approx(0.5 + math.hypot(0.5 - lo_b, hi_a - 1.0))
